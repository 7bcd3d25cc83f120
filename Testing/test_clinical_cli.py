"""The clinical command line: default/installed models, the measurement table, measure, reports and DICOM SEG."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from helpers import oblique_image, varied_bundle

from IDEALTrain.cli import main
from IDEALTrain.errors import IdealError
from IDEALTrain.io.dicom_series import frame_files, read_dicom_frames
from IDEALTrain.io.dicom_write import write_dicom_cine, write_dicom_series
from IDEALTrain.io.sample_data import load_sample
from IDEALTrain.io.volume_files import read_image, read_label
from IDEALTrain.labels import CARDIAC_LABELS
from IDEALTrain.model.bundle import save_bundle
from IDEALTrain.model.registry import DEFAULT_MODEL_ID, ModelRegistry, resolve_model


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("idealtrain: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def segmented_sample(tmp_path_factory):
    """The shipped sample's cine (its ED and ES phases) segmented by the default model, with table and report."""
    out = tmp_path_factory.mktemp("sample")
    args = ["segment", "--input", str(load_sample().dicom_dir), "--all-frames", "--output", str(out / "case.seg.nrrd"),
            "--table", str(out / "table.json"), "--report", str(out / "report.png"), "--device", "cpu"]
    return out, args


def test_segment_without_model_uses_the_default_and_prints_the_table(segmented_sample, capsys):
    out, args = segmented_sample
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert [p.name for p in sorted(out.glob("case_frame*"))] == ["case_frame00.seg.nrrd", "case_frame01.seg.nrrd"]
    for text in ("measurements of", "LV EDV", "LV ESV", "LV EF", "myocardial mass", "QC:"):
        assert text in printed
    assert "np.float" not in printed
    table = json.loads((out / "table.json").read_text())
    ef = table["measurements"]["lv_ef_percent"]
    assert f"LV EF {ef:.1f} %" in " ".join(printed.split())  # the printed figure is the written one
    assert 10 < ef < 80 and table["source"] == str(load_sample().dicom_dir)
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000  # overlays, not an empty page


def test_measure_recomputes_the_table_from_label_files(segmented_sample, tmp_path, capsys):
    out, _ = segmented_sample
    frames = [str(p) for p in sorted(out.glob("case_frame*.seg.nrrd"))]
    table = json.loads((out / "table.json").read_text())["measurements"]
    args = ["measure", "--labels", *frames, "--image", str(load_sample().dicom_dir), "--out", str(tmp_path / "m.csv"),
            "--report", str(tmp_path / "m.pdf")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"LV EF {table['lv_ef_percent']:.1f} %" in " ".join(printed.split())
    rows = (tmp_path / "m.csv").read_text().splitlines()
    assert rows[0].startswith("row_type,case,frame,slice,name,value,unit")
    assert any(row.startswith("summary,") and ",lv_ef_percent," in row for row in rows)
    assert (tmp_path / "m.pdf").read_bytes()[:5] == b"%PDF-"
    # a corrected label: remove the LV blood pool from the ED frame's basal slice -> EDV falls
    ed = int(table["ed_frame"])
    corrected = read_label(frames[ed])
    array = corrected.array.copy()
    basal = int(np.argmax((array == 3).sum(axis=(1, 2))))
    removed_ml = (array[basal] == 3).sum() * np.prod(corrected.spacing) / 1000
    array[basal][array[basal] == 3] = 0
    from IDEALTrain.io.volume_files import write_image

    write_image(corrected.with_array(array), tmp_path / "ed_fixed.nii.gz")
    fixed = list(frames)
    fixed[ed] = str(tmp_path / "ed_fixed.nii.gz")
    assert main(["measure", "--labels", *fixed, "--ed", str(ed), "--es", str(1 - ed), "--out", str(tmp_path / "m.json")]) == 0
    capsys.readouterr()
    again = json.loads((tmp_path / "m.json").read_text())["measurements"]
    assert again["lv_edv_ml"] == pytest.approx(table["lv_edv_ml"] - removed_ml, abs=1e-3)  # NIfTI keeps float32 spacing
    assert main(["measure", "--labels", frames[0]]) == 2
    assert "is one volume" in _error_line(capsys)
    assert main(["measure", "--labels", *frames, "--image", str(tmp_path / "ed_fixed.nii.gz")]) == 2
    assert "--image has 1 frame(s) but --labels 2" in _error_line(capsys)


def test_models_by_id_and_bundle_list(tmp_path, capsys):
    registry = ModelRegistry(user_dir=tmp_path / "none")
    default = registry.default()
    assert default.model_id == DEFAULT_MODEL_ID and resolve_model(None, registry) == default.path
    assert resolve_model(DEFAULT_MODEL_ID, registry) == default.path
    assert resolve_model(f"{DEFAULT_MODEL_ID}@{default.version}", registry) == default.path
    with pytest.raises(IdealError, match="no such bundle folder or .zip, and no installed model"):
        resolve_model("idealsegment-acdcc", registry)
    with pytest.raises(IdealError, match="has no version 9.9"):
        resolve_model(f"{DEFAULT_MODEL_ID}@9.9", registry)
    mine = save_bundle(varied_bundle(), tmp_path / "mine")
    user = ModelRegistry(user_dir=tmp_path / "models").register(mine)
    assert main(["bundle", "list", "--models-dir", str(tmp_path / "models")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"* {DEFAULT_MODEL_ID}") and any(line.startswith("  tiny-test") for line in lines)
    assert main(["bundle", "list", "--models-dir", str(tmp_path / "models"), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["models"]
    assert [(m["id"], m["default"]) for m in listed] == [(DEFAULT_MODEL_ID, True), ("tiny-test", False)]
    assert listed[1]["path"] == str(user.path)
    assert main(["segment", "--model", "no-such-model", "--input", str(tmp_path)]) == 2
    assert "idealtrain bundle list" in _error_line(capsys)


# -- DICOM SEG --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dicom_cases(tmp_path_factory):
    """A small oblique cine (3 frames) and a single volume written as DICOM series, and a tiny model that labels all classes."""
    root = tmp_path_factory.mktemp("dicom")
    first = oblique_image(shape=(4, 40, 48))
    frames = [first.with_array(np.round(oblique_image(shape=(4, 40, 48), seed=t).array)) for t in range(3)]
    write_dicom_cine(frames, root / "cine", patient_id="P1")
    write_dicom_series(first.with_array(np.round(first.array)), root / "volume", patient_id="P1")
    return root, save_bundle(varied_bundle(), root / "model")


def _seg_checks(seg_path, sources, labels_path):
    """The SEG reads back voxel-exact with highdicom, references its sources, and carries the terminology."""
    highdicom = pytest.importorskip("highdicom")
    seg = highdicom.seg.segread(str(seg_path))
    source = [pydicom.dcmread(str(p), stop_before_pixels=True) for p in sources]
    uids = [str(ds.SOPInstanceUID) for ds in source]
    back = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)
    expected = read_label(labels_path).array
    assert np.array_equal(back, expected) and expected.any()
    referenced = {str(item.ReferencedSOPInstanceUID) for series in seg.ReferencedSeriesSequence
                  for item in series.ReferencedInstanceSequence}
    assert referenced == set(uids)
    assert {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence} == {str(source[0].SeriesInstanceUID)}
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID and seg.StudyInstanceUID == source[0].StudyInstanceUID
    codes = [(d.SegmentedPropertyTypeCodeSequence[0].CodeValue, d.SegmentedPropertyCategoryCodeSequence[0].CodeValue)
             for d in seg.SegmentSequence]
    assert codes == [(label.snomed_code, "123037004") for label in CARDIAC_LABELS]
    return seg


def _validate(path):
    """dciodvfy reports no errors; skipped with the reason where the validator is not installed (never on CI)."""
    if shutil.which("dciodvfy") is None:
        if os.environ.get("IDEAL_REQUIRE_DCIODVFY"):
            pytest.fail("dciodvfy (dicom3tools) was installed by .ci/run but is not on PATH")
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools): DICOM SEG not validated")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    report = result.stdout + result.stderr
    assert "Segmentation" in report, report  # it recognised the IOD it checked
    assert [line for line in report.splitlines() if line.startswith("Error")] == [], report


def test_dicom_seg_of_a_cine_frame_a_volume_and_a_pair(dicom_cases, tmp_path, capsys):
    root, model = dicom_cases
    run = ["segment", "--model", str(model), "--device", "cpu"]
    # a cine frame: the .dcm output next to a .seg.nrrd of the same frame
    assert main([*run, "--input", str(root / "cine"), "--frame", "2", "--output", str(tmp_path / "frame.seg.nrrd")]) == 0
    assert main([*run, "--input", str(root / "cine"), "--frame", "2", "--output", str(tmp_path / "frame.dcm")]) == 0
    seg = _seg_checks(tmp_path / "frame.dcm", frame_files(root / "cine", None, 2), tmp_path / "frame.seg.nrrd")
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "tiny-test"
    _validate(tmp_path / "frame.dcm")
    # a volume, by --format
    assert main([*run, "--input", str(root / "volume"), "--output", str(tmp_path / "volume.seg.nrrd")]) == 0
    assert main([*run, "--input", str(root / "volume"), "--format", "dicom-seg", "--output", str(tmp_path / "volume")]) == 0
    _seg_checks(tmp_path / "volume", frame_files(root / "volume"), tmp_path / "volume.seg.nrrd")
    # an ED/ES pair of DICOM folders: two SEGs, each over its own series, and the table
    capsys.readouterr()
    assert main([*run, "--input", str(root / "volume"), str(root / "cine"), "--output", str(tmp_path / "pair.dcm")]) == 2
    assert "choose one with --frame" in _error_line(capsys)
    assert main([*run, "--input", str(root / "volume"), str(root / "volume"), "--output", str(tmp_path / "pair.dcm")]) == 0
    assert "LV EF" in capsys.readouterr().out
    for phase in ("ED", "ES"):
        _seg_checks(tmp_path / f"pair_{phase}.dcm", frame_files(root / "volume"), tmp_path / "volume.seg.nrrd")
    # a volume file has no DICOM images to reference: one clear line, nothing written
    image_file = tmp_path / "image.nrrd"
    from IDEALTrain.io.volume_files import write_image

    write_image(read_dicom_frames(root / "volume")[0], image_file)
    assert main([*run, "--input", str(image_file), "--output", str(tmp_path / "file.dcm")]) == 2
    assert "give a DICOM folder as --input" in _error_line(capsys) and not (tmp_path / "file.dcm").exists()


def test_dicom_seg_refuses_sources_without_one_frame_of_reference(tmp_path, monkeypatch, capsys):
    """The Sunnybrook anonymiser gave every image its own FrameOfReferenceUID: a SEG cannot reference that geometry."""
    from IDEALTrain.io.dicom_seg import write_dicom_seg

    sample = load_sample()
    image = read_image(sample.dicom_dir, 0)
    with pytest.raises(IdealError, match="different FrameOfReferenceUIDs"):
        write_dicom_seg(image.with_array(np.zeros(image.array.shape, np.uint8)), frame_files(sample.dicom_dir, None, 0),
                        tmp_path / "x.dcm", CARDIAC_LABELS)
    assert not (tmp_path / "x.dcm").exists()
    import IDEALTrain.inference.predictor as predictor_module

    def no_network(*args, **kwargs):
        raise AssertionError("the model was loaded for a SEG that cannot be written")

    monkeypatch.setattr(predictor_module, "Predictor", no_network)  # the command line refuses before the network runs
    assert main(["segment", "--input", str(sample.dicom_dir), "--frame", "0", "--output", str(tmp_path / "x.dcm")]) == 2
    assert f"{len(frame_files(sample.dicom_dir, None, 0))} different FrameOfReferenceUIDs" in _error_line(capsys) and not (tmp_path / "x.dcm").exists()


def test_table_and_report_need_a_cine_or_pair(dicom_cases, tmp_path, capsys):
    root, model = dicom_cases
    args = ["segment", "--model", str(model), "--device", "cpu", "--input", str(root / "volume"),
            "--output", str(tmp_path / "a.seg.nrrd"), "--report", str(tmp_path / "r.png")]
    assert main(args) == 2
    assert "need a cine (--all-frames) or an ED/ES pair" in _error_line(capsys)
    assert main(["segment", "--model", str(model), "--device", "cpu", "--input", str(root / "cine"), "--all-frames",
                 "--output", str(tmp_path / "c.seg.nrrd"), "--report", str(tmp_path / "r.pdf")]) == 0
    assert (tmp_path / "r.pdf").read_bytes()[:5] == b"%PDF-"
    assert "QC:" in capsys.readouterr().out


def test_batch_without_slicer_mrml_says_in_one_line_what_to_install(tmp_path):
    """batch.py run by a plain Python without slicer-core: one line naming what to install (no traceback)."""
    import sys
    from pathlib import Path

    batch = Path(__file__).resolve().parents[1] / "IDEALSegment" / "IDEALSegmentBatch" / "batch.py"
    code = ("import runpy, sys; sys.modules['slicer'] = None; "  # 'import slicer' now fails, as without slicer-core
            f"sys.argv = [{str(batch)!r}, '--model', 'm', '--input', {str(tmp_path)!r}, '--output', {str(tmp_path / 'out')!r}]; "
            f"runpy.run_path({str(batch)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batch: error: batch.py needs Slicer's MRML"), result.stderr
    assert "pip install slicer-core==5.11.0.6" in lines[0] and "idealtrain segment --all-frames" in lines[0]
    assert not (tmp_path / "out").exists()


def test_bundle_edit_keeps_the_refinement_network_and_the_weights_precision(tmp_path, capsys):
    from helpers import tiny_refinement_bundle

    from IDEALTrain.model.bundle import load_bundle, read_card
    from IDEALTrain.model.card import REFINEMENT_FOLDER

    source = save_bundle(varied_bundle(), tmp_path / "half", half_precision=True)
    save_bundle(tiny_refinement_bundle(load_bundle(source)), source / REFINEMENT_FOLDER)
    assert main(["bundle", "edit", str(source), "--out", str(tmp_path / "copy"), "--version", "0.0.2"]) == 0
    assert read_card(tmp_path / "copy")["weights"]["dtype"] == "float16"  # not silently float32
    assert load_bundle(tmp_path / "copy" / REFINEMENT_FOLDER).kind == "refinement"
    capsys.readouterr()
    assert main(["bundle", "edit", str(source), "--out", str(tmp_path / "x.zip")]) == 0
    assert "cannot hold refinement/" in capsys.readouterr().err  # said, not dropped silently
    assert read_card(tmp_path / "x.zip")["weights"]["dtype"] == "float16"
    assert main(["bundle", "edit", str(tmp_path / "x.zip"), "--out", str(tmp_path / "full"), "--float32"]) == 0
    assert read_card(tmp_path / "full")["weights"]["dtype"] == "float32"


def test_score_and_evaluate_help_describe_their_arguments(capsys):
    from IDEALTrain.cli import build_parser

    for command, texts in (("score", ["reference label map", "the label map to score", "as JSON"]),
                           ("evaluate", ["installed model's id"]), ("segment", ["default: the default model", "--report"]),
                           ("measure", ["--labels", "--image"])):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for expected in texts:
            assert expected in text, (command, expected)
