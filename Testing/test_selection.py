"""Labelled/unlabelled training sets: the SSL4MIS and IDEAL protocols, no label leaks, clear errors."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest

from IDEALTrain.errors import IdealError
from IDEALTrain.io.datasets import Case, load_cases
from IDEALTrain.io.image import Image
from IDEALTrain.io.phantom import write_phantom_dataset
from IDEALTrain.io.ssl4mis import read_list
from IDEALTrain.training import selection as selection_module
from IDEALTrain.training.selection import (
    LabelSelection,
    add_selection_arguments,
    patient_of,
    select_training_cases,
    selection_from_args,
    split_labeled,
)


def _check_disjoint_and_unlabelled(labeled: list[Case], unlabeled: list[Case]) -> None:
    assert all(case.label is not None for case in labeled)
    assert all(case.label is None for case in unlabeled)  # labels can never reach training
    assert not {c.name for c in labeled} & {c.name for c in unlabeled}


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(root, 8, seed=0)
    return root


@pytest.fixture(scope="module")
def acdc_train(acdc_dir: Path) -> list[Case]:
    """Every ACDC training slice, read once for the whole module."""
    return load_cases(f"ssl4mis:{acdc_dir}", default_list="train_slices.list")


def _fake_cases(names: list[str]) -> list[Case]:
    image = Image(np.zeros((1, 2, 2), np.float32))
    return [Case(name, image, image.with_array(np.ones((1, 2, 2), np.uint8))) for name in names]


# -- real ACDC: the SSL4MIS protocol -----------------------------------------------------------
def test_acdc_68_slices_are_3_patients_and_the_rest_is_unlabelled(
    acdc_dir: Path, acdc_train: list[Case], monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = []

    def load_once(spec: str, **options) -> list[Case]:
        loads.append((spec, options))
        return acdc_train

    monkeypatch.setattr(selection_module, "load_cases", load_once)
    spec = f"ssl4mis:{acdc_dir}"
    labeled, unlabeled = select_training_cases(spec, f"{spec}/:train_slices", LabelSelection(slices=68), require_unlabeled=True)
    assert loads == [(spec, {"default_list": "train_slices.list"})]  # the same data is read once
    assert [c.name for c in labeled] == read_list(acdc_dir, "train_slices")[:68]
    assert len({patient_of(c.name) for c in labeled}) == 3
    assert len(unlabeled) == 1244
    _check_disjoint_and_unlabelled(labeled, unlabeled)


@pytest.mark.parametrize("patients, slices", [(3, 68), (7, 136)])
def test_acdc_patients_match_the_slice_protocol(acdc_dir: Path, acdc_train: list[Case], patients: int, slices: int) -> None:
    labeled, rest = split_labeled(acdc_train, LabelSelection(patients=patients))
    assert [c.name for c in labeled] == read_list(acdc_dir, "train_slices")[:slices]
    assert len(rest) == 1312 - slices


def test_acdc_names_file_selects_whole_patients(acdc_train: list[Case], tmp_path: Path) -> None:
    names = tmp_path / "labelled.txt"
    names.write_text("# two patients and one slice\npatient099\n\npatient050\npatient100_frame01_slice_3\n")
    labeled, _ = split_labeled(acdc_train, LabelSelection(names_file=names))
    assert {patient_of(c.name) for c in labeled} == {"patient099", "patient050", "patient100"}
    for patient in ("patient099", "patient050"):  # every slice of a named patient
        assert sum(patient_of(c.name) == patient for c in labeled) == sum(patient_of(c.name) == patient for c in acdc_train)
    assert [c.name for c in labeled if c.name.startswith("patient100")] == ["patient100_frame01_slice_3"]


# -- generated volumes: the IDEAL fraction protocol --------------------------------------------
def test_fraction_of_volumes_labels_the_first_ones(phantom_dir: Path) -> None:
    labeled, unlabeled = select_training_cases(f"folder:{phantom_dir}", None, LabelSelection(fraction=0.25), require_unlabeled=True)
    assert [c.name for c in labeled] == ["phantom_0000", "phantom_0001"]
    assert len(unlabeled) == 6
    _check_disjoint_and_unlabelled(labeled, unlabeled)


def test_small_fraction_still_labels_one_volume(phantom_dir: Path) -> None:
    labeled, unlabeled = select_training_cases(f"folder:{phantom_dir}", None, LabelSelection(fraction=0.0125), require_unlabeled=True)
    assert [c.name for c in labeled] == ["phantom_0000"] and len(unlabeled) == 7


def test_names_file_on_volumes(phantom_dir: Path, tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("phantom_0005\nphantom_0002\n")
    labeled, unlabeled = select_training_cases(f"folder:{phantom_dir}", None, LabelSelection(names_file=names), require_unlabeled=True)
    assert [c.name for c in labeled] == ["phantom_0002", "phantom_0005"] and len(unlabeled) == 6


def test_other_unlabelled_spec_replaces_the_left_out_cases(phantom_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / "images").mkdir(parents=True)
    for path in sorted((phantom_dir / "images").iterdir())[:3]:
        shutil.copy(path, other / "images" / f"scan_{path.name}")  # images only, no labels
    shutil.copy(phantom_dir / "images" / "phantom_0000.nii.gz", other / "images")  # also labelled: dropped
    labeled, unlabeled = select_training_cases(f"folder:{phantom_dir}", f"folder:{other}", LabelSelection(slices=2), require_unlabeled=True)
    assert [c.name for c in labeled] == ["phantom_0000", "phantom_0001"]
    assert [c.name for c in unlabeled] == ["scan_phantom_0000", "scan_phantom_0001", "scan_phantom_0002"]


def test_patient_of() -> None:
    assert patient_of("patient007_frame12_slice_3") == "patient007"
    assert patient_of("patient007_frame12") == "patient007"
    assert patient_of("phantom_0001") == "phantom_0001"
    assert patient_of("SCD0000101_ED") == "SCD0000101_ED"


def test_patients_keep_list_order_even_when_interleaved() -> None:
    cases = _fake_cases(["patient002_frame01_slice_1", "patient001_frame01_slice_1", "patient002_frame02_slice_1", "patient003_frame01_slice_1"])
    labeled, rest = split_labeled(cases, LabelSelection(patients=1))
    assert [c.name for c in labeled] == ["patient002_frame01_slice_1", "patient002_frame02_slice_1"]
    assert len(rest) == 2


def test_no_option_labels_everything() -> None:
    cases = _fake_cases(["a", "b"])
    assert split_labeled(cases, LabelSelection()) == (cases, [])


# -- clear errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        ({"fraction": 0.0}, "above 0 and at most 1"),
        ({"fraction": 1.5}, "above 0 and at most 1"),
        ({"fraction": float("nan")}, "above 0 and at most 1"),
        ({"slices": 0}, "at least 1"),
        ({"patients": -2}, "at least 1"),
        ({"slices": 68, "patients": 3}, "one way only"),
    ],
)
def test_invalid_options(options: dict, message: str) -> None:
    with pytest.raises(IdealError, match=message):
        LabelSelection(**options)


def test_more_than_exist_names_both_numbers(phantom_dir: Path) -> None:
    spec = f"folder:{phantom_dir}"
    with pytest.raises(IdealError, match=r"--labeled-slices 9 asks for more than the 8 cases"):
        select_training_cases(spec, None, LabelSelection(slices=9), require_unlabeled=False)
    cases = _fake_cases(["patient001_frame01_slice_1", "patient002_frame01_slice_1"])
    with pytest.raises(IdealError, match=r"--labeled-patients 3 asks for more than the 2 patients"):
        split_labeled(cases, LabelSelection(patients=3))


def test_unknown_missing_or_empty_names_file(tmp_path: Path) -> None:
    cases = _fake_cases(["patient001_frame01_slice_1"])
    names = tmp_path / "names.txt"
    names.write_text("patient001\npatient404\npatient001_frame09\n")
    with pytest.raises(IdealError, match=r"2 name\(s\) match no case.*patient001_frame09, patient404"):
        split_labeled(cases, LabelSelection(names_file=names))
    names.write_text("# nothing\n\n")
    with pytest.raises(IdealError, match="names no case"):
        split_labeled(cases, LabelSelection(names_file=names))
    with pytest.raises(IdealError, match="cannot read the --labeled-list file"):
        split_labeled(cases, LabelSelection(names_file=tmp_path / "absent.txt"))


def test_empty_unlabelled_set_says_what_to_do(phantom_dir: Path) -> None:
    spec = f"folder:{phantom_dir}"
    with pytest.raises(IdealError, match="--unlabeled SPEC.*--supervised-only"):
        select_training_cases(spec, None, LabelSelection(), require_unlabeled=True)
    with pytest.raises(IdealError, match="--supervised-only"):
        select_training_cases(spec, spec, LabelSelection(fraction=1.0), require_unlabeled=True)
    labeled, unlabeled = select_training_cases(spec, None, LabelSelection(), require_unlabeled=False)
    assert len(labeled) == 8 and unlabeled == []


def test_labelled_cases_need_labels(phantom_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(phantom_dir / "images", tmp_path / "images")
    with pytest.raises(IdealError, match="2 labelled case\\(s\\) have no label"):
        select_training_cases(f"folder:{tmp_path}", None, LabelSelection(slices=2), require_unlabeled=True)


def test_bad_unlabelled_spec_fails_before_loading(phantom_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selection_module, "load_cases", lambda *a, **k: pytest.fail("loaded data before checking specs"))
    with pytest.raises(IdealError, match="does not exist"):
        select_training_cases(f"folder:{phantom_dir}", f"folder:{phantom_dir}/missing", LabelSelection(), require_unlabeled=True)


# -- command line ------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune")
    add_selection_arguments(parser)
    return parser


def test_arguments_give_a_selection() -> None:
    assert selection_from_args(_parser().parse_args([])) == LabelSelection()
    assert selection_from_args(_parser().parse_args(["--labeled-slices", "68"])) == LabelSelection(slices=68)
    assert selection_from_args(_parser().parse_args(["--labeled-patients", "7"])) == LabelSelection(patients=7)
    assert selection_from_args(_parser().parse_args(["--labeled-fraction", "0.025"])) == LabelSelection(fraction=0.025)
    assert selection_from_args(_parser().parse_args(["--labeled-list", "x.txt"])) == LabelSelection(names_file=Path("x.txt"))
    with pytest.raises(IdealError, match="above 0"):
        selection_from_args(_parser().parse_args(["--labeled-fraction", "0"]))


def test_arguments_are_mutually_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--labeled-slices", "68", "--labeled-patients", "3"])
    assert "not allowed with argument" in capsys.readouterr().err
    _parser().format_help()  # help text formats (no stray % placeholders)
