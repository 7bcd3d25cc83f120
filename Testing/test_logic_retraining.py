"""Retraining from reviewed cases (IDEALSegmentLib.retraining): the split, the idealtrain plan, old vs new, the table.

Corrections data sets are exported from real MRML nodes (slicer-core); models are tiny bundles; the
planned arguments are parsed by idealtrain's own parser to check they rebuild the old model.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import import_slicer_core, tiny_bundle, varied_bundle

slicer = import_slicer_core()

from IDEALSegmentLib import retraining  # noqa: E402
from IDEALSegmentLib.cancel import Cancelled, CancelToken  # noqa: E402
from IDEALSegmentLib.corrections import add_unlabeled_volume, export_correction  # noqa: E402
from IDEALSegmentLib.registry import ModelEntry  # noqa: E402
from IDEALSegmentLib.retraining import (  # noqa: E402
    FINETUNE_PHASE,
    PRETRAIN_PHASE,
    ModelComparison,
    comparison_from_table,
    comparison_table,
    compare_models,
    prepare_run,
    split_cases,
    training_plan,
)
from IDEALSegmentLib.segmentations import segmentation_from_labels  # noqa: E402
from IDEALSegmentLib.volumes import volume_from_image  # noqa: E402
from IDEALTrain.model.bundle import Bundle, read_card, save_bundle  # noqa: E402
from IDEALTrain.cli import _network_and_plan, build_parser  # noqa: E402
from IDEALTrain.io.datasets import load_cases  # noqa: E402
from IDEALTrain.errors import IdealError  # noqa: E402
from IDEALTrain.evaluation.metrics import dice  # noqa: E402
from IDEALTrain.model.networks import NetworkConfig, SegmentationNetwork  # noqa: E402
from IDEALTrain.io.phantom import make_phantom  # noqa: E402
from IDEALTrain.model.postprocessing import Postprocessing  # noqa: E402
from IDEALTrain.inference.predictor import Predictor  # noqa: E402
from IDEALTrain.model.preprocessing import Preprocessing  # noqa: E402

CASES = [f"case{number}" for number in range(6)]


def write_corrections(folder: Path, case_ids, pool: int = 1) -> Path:
    """A corrections data set exported from MRML nodes: small phantoms as reviewed cases, plus a pool."""
    scene = slicer.vtkMRMLScene()
    for seed, case_id in enumerate(case_ids):
        image, label = make_phantom(seed, size=(32, 32, 3), spacing=(2.5, 2.5, 8.0))
        volume = volume_from_image(image, scene, case_id)
        export_correction(folder, volume, segmentation_from_labels(label, volume), case_id=case_id, reviewer="test")
    for number in range(pool):
        image, _ = make_phantom(100 + number, size=(32, 32, 3), spacing=(2.5, 2.5, 8.0))
        add_unlabeled_volume(folder, volume_from_image(image, scene, f"pool{number}"))
    return folder


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: relative path -> (SHA-256, modification time)."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def corrections(tmp_path_factory) -> Path:
    return write_corrections(tmp_path_factory.mktemp("data") / "corrections", CASES)


def entry(bundle: Bundle, folder: Path, version: str = "1.2.0") -> ModelEntry:
    """A saved bundle as the registry would list it."""
    bundle.model_id, bundle.version = "heart", version
    path = save_bundle(bundle, folder / f"heart-{version}")
    return ModelEntry("heart", version, path, "user", read_card(path))


def idealtrain_like(base: int = 4, depth: int = 3, decoders=("unet",)) -> Bundle:
    """An untrained bundle whose architecture and preprocessing idealtrain's options can rebuild."""
    config = NetworkConfig(base_channels=base, depth=depth, decoders=decoders)
    plan = Preprocessing(inplane="spacing", size=(32, 32), spacing=(2.0, 2.0))
    return Bundle(config, plan, SegmentationNetwork(config).state_dict())


def encoder_bundle(folder: Path, base: int) -> Path:
    config = NetworkConfig(base_channels=base, depth=3)
    weights = {k: v for k, v in SegmentationNetwork(config).state_dict().items() if k.startswith("encoder.")}
    return save_bundle(Bundle(config, Preprocessing(), weights, kind="pretrained-encoder"), folder / f"encoder-{base}")


# -- the split ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "count, held_out",
    [(1, []), (2, []), (3, ["c3"]), (4, ["c4"]), (5, ["c5"]), (9, ["c5"]), (10, ["c5", "c10"]), (12, ["c5", "c10"])],
)
def test_split_holds_out_every_fifth_case_or_the_last(count, held_out):
    ids = [f"c{number}" for number in range(1, count + 1)]
    train, held = split_cases(ids)
    assert held == held_out
    assert train == [case for case in ids if case not in held_out]


def test_split_refuses_holding_out_everything():
    with pytest.raises(IdealError, match="at least 2"):
        split_cases(["a", "b", "c"], hold_out_every=1)


def test_prepare_run_copies_the_split_and_leaves_the_dataset_untouched(corrections, tmp_path):
    before = snapshot(corrections)
    run = prepare_run(corrections, tmp_path / "run")
    assert run.train_cases == ("case0", "case1", "case2", "case3", "case5")
    assert run.held_out_cases == ("case4",)
    assert run.unlabeled_dir == corrections / "unlabeled"
    assert run.held_out_dir == tmp_path / "run" / "held_out" and run.train_dir == tmp_path / "run" / "train"
    for folder, ids in ((run.train_dir, run.train_cases), (run.held_out_dir, run.held_out_cases)):
        for kind in ("images", "labels"):
            assert sorted(p.name for p in (folder / kind).iterdir()) == sorted(f"{case}.nii.gz" for case in ids)
            for case in ids:
                assert (folder / kind / f"{case}.nii.gz").read_bytes() == (corrections / kind / f"{case}.nii.gz").read_bytes()
    assert [case.name for case in load_cases(f"folder:{run.held_out_dir}", require_labels=True)] == ["case4"]
    record = json.loads((run.run_dir / "run.json").read_text())
    assert record["train_cases"] == list(run.train_cases) and record["held_out_cases"] == ["case4"]
    assert snapshot(corrections) == before


def test_prepare_run_with_few_cases_holds_nothing_out(tmp_path):
    data = write_corrections(tmp_path / "two", ["a", "b"], pool=0)
    run = prepare_run(data, tmp_path / "run")
    assert run.train_cases == ("a", "b") and run.held_out_cases == () and run.held_out_dir is None
    assert run.unlabeled_dir is None and not (tmp_path / "run" / "held_out").exists()


def test_prepare_run_refuses_a_folder_with_content(corrections, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(IdealError, match="not an empty folder"):
        prepare_run(corrections, run_dir)
    assert [p.name for p in run_dir.iterdir()] == ["notes.txt"] and (run_dir / "notes.txt").read_text() == "mine"
    prepare_run(corrections, tmp_path / "empty")  # an empty or new folder is fine
    with pytest.raises(IdealError, match="not an empty folder"):
        prepare_run(corrections, tmp_path / "empty")


def test_prepare_run_refuses_data_without_reviewed_cases(tmp_path):
    with pytest.raises(IdealError, match="not a corrections data set"):
        prepare_run(tmp_path / "nothing", tmp_path / "run")
    pool_only = write_corrections(tmp_path / "pool", [], pool=1)
    with pytest.raises(IdealError, match="no reviewed cases"):
        prepare_run(pool_only, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_failed_copy_leaves_the_run_folder_as_it_was(corrections, tmp_path, monkeypatch):
    copies = []

    def failing_copy(source, target):
        if len(copies) == 3:
            raise OSError(28, "No space left on device")
        copies.append(target)
        return shutil.copyfile(source, target)

    monkeypatch.setattr(retraining.shutil, "copy2", failing_copy)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(OSError, match="No space"):
        prepare_run(corrections, run_dir)
    assert len(copies) == 3 and run_dir.is_dir() and list(run_dir.iterdir()) == []
    with pytest.raises(OSError):
        prepare_run(corrections, tmp_path / "new")
    assert not (tmp_path / "new").exists()


# -- the plan -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(corrections, tmp_path_factory):
    return prepare_run(corrections, tmp_path_factory.mktemp("plan") / "run")


def value(arguments, flag):
    assert arguments.count(flag) == 1, (flag, arguments)
    return arguments[arguments.index(flag) + 1]


def test_plan_rebuilds_the_old_models_architecture_and_preprocessing(run, tmp_path):
    old = entry(idealtrain_like(base=4, depth=3, decoders=("unet",)), tmp_path)
    plan = training_plan(run, encoder="pretrain", pretrain_iterations=7, iterations=9, label_budget=2, device="cpu", old_model=old)
    assert [phase for phase, _ in plan] == [PRETRAIN_PHASE, FINETUNE_PHASE]
    (_, pretrain), (_, finetune) = plan

    assert pretrain[0] == "pretrain" and "--decoders" not in pretrain
    assert [pretrain[i + 1] for i, a in enumerate(pretrain) if a == "--data"] == [f"folder:{run.train_dir}", f"folder:{run.unlabeled_dir}"]
    assert value(pretrain, "--iterations") == "7" and value(pretrain, "--out") == str(run.encoder)
    args = build_parser().parse_args(pretrain)
    network, preprocessing = _network_and_plan(args)
    assert (network.base_channels, network.depth) == (4, 3)
    assert preprocessing == old_preprocessing(old)

    assert finetune[0] == "finetune"
    assert value(finetune, "--labeled") == f"folder:{run.train_dir}" and value(finetune, "--unlabeled") == f"folder:{run.unlabeled_dir}"
    assert value(finetune, "--pretrained") == str(run.encoder) and value(finetune, "--out") == str(run.bundle)
    assert value(finetune, "--iterations") == "9" and value(finetune, "--labeled-slices") == "2" and value(finetune, "--device") == "cpu"
    assert value(finetune, "--id") == "heart" and value(finetune, "--version") == "1.2.1"
    # The held-out cases are reported on live but never choose the checkpoint they are then compared on.
    assert value(finetune, "--val") == f"folder:{run.held_out_dir}" and value(finetune, "--keep") == "last"
    assert not any(str(run.run_dir / "held_out") in a for a in pretrain)
    args = build_parser().parse_args(finetune)
    network, preprocessing = _network_and_plan(args)
    assert network == NetworkConfig.from_json(old.card["architecture"])
    assert preprocessing == old_preprocessing(old)


def old_preprocessing(old: ModelEntry) -> Preprocessing:
    return Preprocessing.from_json(old.card["preprocessing"])


def test_plan_without_an_old_model_uses_idealtrains_defaults(run):
    plan = training_plan(run, encoder="none", iterations=3)
    assert [phase for phase, _ in plan] == [FINETUNE_PHASE]
    arguments = plan[0][1]
    for flag in ("--base-channels", "--depth", "--decoders", "--inplane", "--id", "--pretrained"):
        assert flag not in arguments
    assert value(arguments, "--device") == "auto"


def test_plan_refuses_a_model_idealtrain_cannot_rebuild(run, tmp_path):
    old = entry(tiny_bundle(), tmp_path)  # fpn_channels 8 and no dropout: not what idealtrain's options make
    with pytest.raises(IdealError, match="cannot be retrained like-for-like.*fpn_channels 8"):
        training_plan(run, encoder="none", old_model=old)
    square = idealtrain_like()
    square.preprocessing = Preprocessing(inplane="size", size=(32, 64))
    with pytest.raises(IdealError, match=r"size \[32, 64\]"):
        training_plan(run, encoder="none", old_model=entry(square, tmp_path, "2.0.0"))


def test_plan_reuses_an_encoder_only_with_the_old_models_architecture(run, tmp_path):
    old = entry(idealtrain_like(base=4, depth=3), tmp_path)
    matching, wider = encoder_bundle(tmp_path, 4), encoder_bundle(tmp_path, 8)
    plan = training_plan(run, encoder="reuse", encoder_path=matching, old_model=old)
    assert [phase for phase, _ in plan] == [FINETUNE_PHASE] and value(plan[0][1], "--pretrained") == str(matching)
    with pytest.raises(IdealError, match="base_channels 8.*base_channels 4.*old model's architecture"):
        training_plan(run, encoder="reuse", encoder_path=wider, old_model=old)
    assert value(training_plan(run, encoder="reuse", encoder_path=wider)[0][1], "--pretrained") == str(wider)  # no old model
    with pytest.raises(IdealError, match="not a pretrained encoder"):
        training_plan(run, encoder="reuse", encoder_path=old.path, old_model=old)
    with pytest.raises(IdealError, match="choose the pretrained encoder"):
        training_plan(run, encoder="reuse", encoder_path=tmp_path / "missing")


def test_plan_keeps_the_old_models_postprocessing(run, tmp_path):
    cleaned = idealtrain_like()
    cleaned.postprocessing = Postprocessing(largest_heart_component=True)
    old = entry(cleaned, tmp_path, "3.0.0")
    arguments = training_plan(run, encoder="none", old_model=old)[0][1]
    assert value(arguments, "--largest-component") == "on"
    assert value(training_plan(run, encoder="none", old_model=entry(idealtrain_like(), tmp_path, "3.1.0"))[0][1], "--largest-component") == "off"


def test_plan_continues_the_old_model_from_its_weights(run, tmp_path):
    old = entry(tiny_bundle(), tmp_path, "4.0.0")  # not rebuildable from flags, but continuing needs no rebuild
    plan = training_plan(run, encoder="model", iterations=5, old_model=old)
    assert [phase for phase, _ in plan] == [FINETUNE_PHASE]
    arguments = plan[0][1]
    assert value(arguments, "--init-from") == str(old.path) and value(arguments, "--version") == "4.0.1"
    for flag in ("--pretrained", "--base-channels", "--inplane", "--largest-component"):
        assert flag not in arguments  # all of it comes with the model
    with pytest.raises(IdealError, match="continuing needs an old model"):
        training_plan(run, encoder="model")


def test_plan_refuses_bad_options(run):
    with pytest.raises(IdealError, match="unknown encoder start 'random'"):
        training_plan(run, encoder="random")
    with pytest.raises(IdealError, match="at least 1 iteration"):
        training_plan(run, encoder="none", iterations=0)
    with pytest.raises(IdealError, match="label budget"):
        training_plan(run, encoder="none", label_budget=-1)


# -- old vs new -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def comparison_setup(corrections, tmp_path_factory):
    """Three held-out cases and two different tiny models."""
    folder = tmp_path_factory.mktemp("compare")
    run = prepare_run(corrections, folder / "run", hold_out_every=2)
    first = save_bundle(varied_bundle(0), folder / "first")
    second = save_bundle(varied_bundle(5), folder / "second")
    return run, first, second


def test_compare_models_scores_both_models_on_the_held_out_cases(comparison_setup):
    run, first, second = comparison_setup
    assert run.held_out_cases == ("case1", "case3", "case5")
    fractions = []
    comparison = compare_models(first, second, run.held_out_dir, device="cpu", progress=fractions.append)
    assert comparison.cases == ("case1", "case3", "case5")
    assert list(comparison.old_dice) == ["RV", "LV_Myocardium", "LV"] == list(comparison.new_dice)
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0) and fractions[0] < 0.5
    # The numbers are the per-class Dice averaged over the cases, computed here independently.
    cases = load_cases(f"folder:{run.held_out_dir}", require_labels=True)
    for bundle, scores, mean in ((first, comparison.old_dice, comparison.old_mean), (second, comparison.new_dice, comparison.new_mean)):
        predictor = Predictor(bundle, device="cpu")
        predictions = [predictor.predict(case.image).labels.array for case in cases]
        for value_, name in ((1, "RV"), (2, "LV_Myocardium"), (3, "LV")):
            expected = np.mean([dice(p == value_, case.label.array == value_) for p, case in zip(predictions, cases)])
            assert scores[name] == pytest.approx(expected)
        assert mean == pytest.approx(np.mean(list(scores.values())))
    assert comparison.old_dice != comparison.new_dice
    swapped = compare_models(second, first, run.held_out_dir, device="cpu")
    assert (swapped.old_dice, swapped.new_dice) == (comparison.new_dice, comparison.old_dice)
    assert comparison.new_mean != comparison.old_mean
    gain, loss = (comparison, swapped) if comparison.new_mean > comparison.old_mean else (swapped, comparison)
    assert not loss.new_is_better()
    assert gain.new_is_better() is not bool(gain.class_drops())


def test_a_model_compared_with_itself_is_not_better(comparison_setup, tmp_path):
    run, first, _ = comparison_setup
    old = ModelEntry("tiny-test", "0.0.1", first, "user", read_card(first))
    copy = shutil.copytree(first, tmp_path / "copy")
    comparison = compare_models(old, copy, run.held_out_dir, device="cpu")
    assert comparison.old_dice == comparison.new_dice and comparison.old_mean == comparison.new_mean
    assert not comparison.new_is_better()
    assert "not better: its mean Dice is not higher" in comparison.summary()


def test_compare_models_cancels_and_needs_held_out_cases(comparison_setup):
    run, first, second = comparison_setup
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        compare_models(first, second, run.held_out_dir, device="cpu", cancel=token)
    with pytest.raises(IdealError, match="review at least 3 cases"):
        compare_models(first, second, None, device="cpu")


def comparison(old: dict, new: dict) -> ModelComparison:
    return ModelComparison(("a", "b"), old, new, float(np.mean(list(old.values()))), float(np.mean(list(new.values()))))


OLD = {"RV": 0.70, "LV_Myocardium": 0.80, "LV": 0.90}


@pytest.mark.parametrize(
    "new, margin, better",
    [
        ({"RV": 0.75, "LV_Myocardium": 0.80, "LV": 0.90}, 0.0, True),  # higher mean, no class worse
        ({"RV": 0.80, "LV_Myocardium": 0.76, "LV": 0.90}, 0.0, True),  # a small drop (0.04) is tolerated
        (dict(OLD), 0.0, False),  # equal is not better
        ({"RV": 0.69, "LV_Myocardium": 0.80, "LV": 0.90}, 0.0, False),  # lower mean
        ({"RV": 0.95, "LV_Myocardium": 0.70, "LV": 0.90}, 0.0, False),  # higher mean but myocardium drops 0.10
        ({"RV": 0.75, "LV_Myocardium": 0.80, "LV": 0.90}, 0.02, False),  # +0.0167 does not clear a 0.02 margin
        ({"RV": 0.75, "LV_Myocardium": 0.80, "LV": 0.90}, 0.01, True),
        ({"RV": math.nan, "LV_Myocardium": 0.90, "LV": 0.95}, 0.0, False),  # undefined is never better
    ],
)
def test_new_is_better_rule(new, margin, better):
    assert comparison(OLD, new).new_is_better(margin) is better


def test_summary_says_why_and_negative_margins_are_refused():
    worse = comparison(OLD, {"RV": 0.95, "LV_Myocardium": 0.70, "LV": 0.90})
    text = worse.summary()
    assert "old 0.800, new 0.850 (+0.050)" in text and "LV_Myocardium 0.800 -> 0.700" in text
    assert "not better: LV_Myocardium drops by 0.100 (more than 0.05)" in text
    assert comparison(OLD, {"RV": 0.75, "LV_Myocardium": 0.80, "LV": 0.90}).summary().endswith("The new model is better.")
    with pytest.raises(IdealError, match="margin"):
        worse.new_is_better(-0.1)


# -- the table ------------------------------------------------------------------------------------
def test_comparison_table_holds_the_dice_and_reads_back():
    scene = slicer.vtkMRMLScene()
    result = comparison(OLD, {"RV": 0.75, "LV_Myocardium": 0.78, "LV": 0.92})
    table = comparison_table(scene, result, "heart 1.2.0")
    contents = table.GetTable()
    assert [contents.GetColumn(i).GetName() for i in range(contents.GetNumberOfColumns())] == ["Class", "Old (heart 1.2.0)", "New", "Change"]
    rows = [[contents.GetValue(r, c).ToString() if c == 0 else contents.GetValue(r, c).ToDouble() for c in range(4)] for r in range(contents.GetNumberOfRows())]
    assert [row[0] for row in rows] == ["RV", "LV_Myocardium", "LV", "Mean"]
    assert rows[1][1:] == pytest.approx([0.80, 0.78, -0.02])
    assert rows[3][1:] == pytest.approx([0.80, 0.8166667, 0.0166667], abs=1e-6)
    assert comparison_from_table(table) == result
    again = comparison_table(scene, result, "heart 1.2.0")
    assert again.GetName() != table.GetName() and scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 2


def test_comparison_from_table_refuses_other_tables():
    scene = slicer.vtkMRMLScene()
    other = scene.AddNewNodeByClass("vtkMRMLTableNode", "measurements")
    with pytest.raises(IdealError, match="not an old vs new model comparison"):
        comparison_from_table(other)
    with pytest.raises(IdealError, match="no scene"):
        comparison_table(None, comparison(OLD, OLD), "old")
