"""The shipped real-scan sample and ``idealtrain demo`` on it, with the shipped model (no IDEAL_DATA needed)."""
from __future__ import annotations

import json
import shutil
import sys
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage", reason="the expert contours need scikit-image (pip install -e '.[test]')")

from IDEALTrain.cli import main  # noqa: E402
from IDEALTrain.demo.real_scan import overlay_slices, run_sample_demo  # noqa: E402
from IDEALTrain.errors import IdealError  # noqa: E402
from IDEALTrain.evaluation.metrics import cardiac_function  # noqa: E402
from IDEALTrain.io import sample_data  # noqa: E402
from IDEALTrain.io.image import Image  # noqa: E402
from IDEALTrain.io.sample_data import default_model_dir, load_sample, read_sample_phase, resources_dir  # noqa: E402
from IDEALTrain.io.sunnybrook import LV_BLOOD_POOL, read_sunnybrook_patient  # noqa: E402
from IDEALTrain.io.volume_files import read_frames, read_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESOURCES = ROOT / "IDEALSegment" / "Resources"


@pytest.fixture(scope="module")
def sample():
    return load_sample()


@pytest.fixture(scope="module")
def expert(sample):
    return {phase.phase: phase for phase in read_sunnybrook_patient(sample.root, sample.patient)}


def test_the_checkout_finds_the_shipped_sample_and_model():
    assert resources_dir() == RESOURCES
    assert default_model_dir().parent == RESOURCES / "Models" and default_model_dir().name.startswith("idealsegment-acdc-")


def test_an_installed_package_finds_the_data_files(tmp_path, monkeypatch):
    """``pip install .`` puts the resources under <prefix>/share/idealsegment (pyproject data-files)."""
    installed = tmp_path / "prefix" / "share" / "idealsegment" / "Resources"
    shutil.copytree(RESOURCES / "SampleData", installed / "SampleData")
    monkeypatch.setattr(sample_data, "_PACKAGE_ROOT", tmp_path / "site-packages")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    assert resources_dir() == installed
    shutil.rmtree(installed)
    with pytest.raises(IdealError, match="not found"):
        resources_dir()


def test_pyproject_data_files_cover_every_shipped_resource_file():
    """Every file under Models/ and SampleData/ is installed by ``pip install .``, at the same relative place."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    shipped = [p for folder in ("Models", "SampleData") for p in (RESOURCES / folder).rglob("*") if p.is_file()]
    assert len(shipped) > 40
    for path in shipped:
        relative = path.relative_to(ROOT).as_posix()
        targets = [t for t, patterns in data_files.items() if any(fnmatch(relative, p) and "/" not in relative[len(p.rsplit("/", 1)[0]) + 1:] for p in patterns)]
        assert targets == ["share/idealsegment/Resources/" + path.parent.relative_to(RESOURCES).as_posix()], relative


def test_the_manifests_cine_frames_are_the_phases_frames_in_the_full_cine(sample):
    """sample.json's cine_frames: where each phase's files sit in the patient's full cine (IDEAL_DATA's sunnybrook/cine)."""
    import os

    from IDEALTrain.io.dicom_series import group_frames, series_slices

    cine = Path(os.environ.get("IDEAL_DATA", "")) / "sunnybrook" / "cine" / sample.patient
    if not os.environ.get("IDEAL_DATA") or not cine.is_dir():
        pytest.skip(f"the full cine is not here: set IDEAL_DATA to a folder holding sunnybrook/cine/{sample.patient}")
    frames = [{s.path.name for s in frame} for frame in group_frames(series_slices(cine))]
    for phase, files in sample.phase_files.items():
        assert {f.name for f in files} <= frames[sample.cine_frames[phase]], phase


def test_the_manifest_matches_the_expert_contours(sample, expert):
    """sample.json's phase files and figures are what the contours give (so Slicer can load phases without them)."""
    for phase in ("ED", "ES"):  # the whole stack ships; the expert drew 9 contiguous slices of it
        files = sample.phase_files[phase]
        assert len(files) == 12 and set(expert[phase].files) <= set(files)
        start = files.index(expert[phase].files[0])
        assert files[start:start + 9] == expert[phase].files
    figures = cardiac_function(expert["ED"].label, expert["ES"].label)
    assert sample.expert == pytest.approx({key: figures[key] for key in sample.expert}, abs=1e-3)
    assert 20 < sample.expert["lv_ef_percent"] < 30  # a failing heart, not a normal one


def test_each_phase_is_one_frame_of_the_folder_with_true_geometry(sample, expert):
    frames = read_frames(sample.dicom_dir)
    assert len(frames) == 2
    for phase in ("ED", "ES"):
        image = read_sample_phase(sample, phase)
        assert image.array.shape == (12, 256, 256) and image.spacing == pytest.approx((1.367188, 1.367188, 10.0), abs=1e-4)
        assert not np.allclose(np.abs(image.direction), np.eye(3), atol=0.05)  # an oblique short-axis stack
        assert sum(f.same_grid(image) and np.array_equal(f.array, image.array) for f in frames) == 1
        drawn = expert[phase].image.array
        assert any(np.array_equal(image.array[k:k + 9], drawn) for k in range(4))  # the expert's slices, unchanged
    with pytest.raises(IdealError, match="phases ED and ES"):
        read_sample_phase(sample, "mid")


def test_a_broken_sample_is_one_clear_error(tmp_path):
    with pytest.raises(IdealError, match="not a readable sample manifest"):
        load_sample(tmp_path)
    shutil.copytree(RESOURCES / "SampleData", tmp_path / "copy")
    (tmp_path / "copy" / "dicoms" / "SCD0000101" / "59.dcm").unlink()
    with pytest.raises(IdealError, match="1 DICOM file"):
        load_sample(tmp_path / "copy")


def test_overlay_slices_pick_mid_and_base(expert):
    levels = overlay_slices(expert["ED"].label)
    drawn = np.flatnonzero((expert["ED"].label.array == LV_BLOOD_POOL).any(axis=(1, 2)))
    assert levels["basal"] in (drawn[0], drawn[-1]) and levels["mid"] == (drawn[0] + drawn[-1]) // 2
    tapering = np.zeros((6, 20, 20), np.uint8)
    for k, radius in enumerate((0, 8, 6, 4, 2, 0)):  # base at slice 1, apex towards slice 4
        tapering[k, 10 - radius:10 + radius, 10 - radius:10 + radius] = LV_BLOOD_POOL
    assert overlay_slices(Image(tapering, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))) == {"mid": 2, "basal": 1}


def test_demo_segments_the_sample_and_compares_with_the_expert(tmp_path, capsys):
    """The whole demo once (seconds): figures next to the expert's, Dice, files, and the safety rules."""
    out = tmp_path / "demo"
    results = run_sample_demo(out, device="cpu")
    printed = capsys.readouterr().out
    for title in ("LV EDV (ml)", "LV ESV (ml)", "LV EF (%)", "LV mass (g)", "LV Dice", "QC flags", "whole stack"):
        assert title in printed
    assert results["phases"]["ED"]["lv_dice"] > 0.88 and results["phases"]["ES"]["lv_dice"] > 0.85
    assert results["phases"]["ED"]["myocardium_dice"] > 0.6
    # the whole heart (12 slices) by the convention, against the expert's EF from the 9 slices they drew
    assert abs(results["model_figures"]["lv_ef_percent"] - results["expert_figures"]["lv_ef_percent"]) < 3
    assert abs(results["model_figures_expert_slices"]["lv_ef_percent"] - results["expert_figures"]["lv_ef_percent"]) < 3
    assert all({"name", "value", "threshold", "message"} <= set(flag) for flag in results["quality_flags"])
    # The ES basal slice: the model labels atrium as LV blood pool there, the convention leaves it out.
    es = results["phases"]["ES"]["sample_frame"]  # its index among the sample's two phases (whole_heart's frames)
    es_labels = read_image(out / "SCD0000101_ES.seg.nrrd")
    basal_ml = [np.count_nonzero(s == LV_BLOOD_POOL) * np.prod(es_labels.spacing) / 1000 for s in es_labels.array]
    assert basal_ml[11] > 20  # ~28 ml of atrium and outflow tract on the most basal slice
    counted = results["whole_heart"]["counted_slices"][es]
    assert 11 not in counted and 10 not in counted and set(range(1, 10)) <= set(counted)
    assert results["whole_heart"]["slice_volumes"][es][11]["LV"] == 0.0
    # `idealtrain score` on the demo's own files gives the demo's Dice; structures the expert never drew are n/a
    capsys.readouterr()
    assert main(["score", "--pred", str(out / "SCD0000101_ED_on_expert_slices.seg.nrrd"),
                 "--ref", str(out / "SCD0000101_ED_expert.seg.nrrd")]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["classes"]["LV"]["dice"] == pytest.approx(results["phases"]["ED"]["lv_dice"])
    assert scored["classes"]["RV"]["applicable"] is False and scored["classes"]["RV"]["dice"] is None
    assert json.loads((out / "results.json").read_text()) == results
    for phase in ("ED", "ES"):
        written = read_image(out / f"SCD0000101_{phase}.seg.nrrd")
        assert written.same_grid(read_sample_phase(load_sample(), phase), tolerance=1e-4)
        assert "Segment2_Name:=Left ventricle blood pool" in (out / f"SCD0000101_{phase}.seg.nrrd").read_bytes()[:4000].decode("latin-1")
        assert (out / f"SCD0000101_{phase}_expert.seg.nrrd").is_file()
    names = sorted(p.name for p in (out / "overlays").iterdir())
    assert names == ["ED_basal.png", "ED_mid.png", "ES_basal.png", "ES_mid.png", "overview.png"]
    assert read_image_shape(out / "overlays" / "ED_mid.png")[1] == 2 * read_image_shape(out / "overlays" / "ED_mid.png")[0]

    # frame numbers are the full cine's (the sample holds two of its 20 phases)
    assert (results["phases"]["ED"]["frame"], results["phases"]["ES"]["frame"]) == (18, 7)
    assert {results["phases"][p]["sample_frame"] for p in ("ED", "ES")} == {0, 1}
    # the overview names its halves: a white strip of text above the overlays
    from PIL import Image as PILImage

    overview = np.asarray(PILImage.open(out / "overlays" / "overview.png").convert("L"))
    strip = overview[:22]
    assert (strip < 128).any() and (strip == 255).mean() > 0.8
    width = overview.shape[1]
    for quarter in range(4):  # "expert, mid" | "model, mid" | "expert, basal" | "model, basal"
        assert (strip[:, quarter * width // 4:(quarter + 1) * width // 4] < 128).any()
    # a previous demo's results are replaced only with --overwrite
    before = (out / "results.json").read_bytes()
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err and (out / "results.json").read_bytes() == before
    # Any other non-empty folder is refused before anything is written.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(foreign), "--device", "cpu"]) == 2
    assert "not a previous demo's output" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def read_image_shape(path: Path) -> tuple[int, int]:
    """(height, width) of a PNG, from its header."""
    header = path.read_bytes()[16:24]
    return int.from_bytes(header[4:8], "big"), int.from_bytes(header[0:4], "big")
