"""IDEALSegment/IDEALSegmentBatch/batch.py as a program: MRML batch output equals ``idealtrain segment`` voxel for voxel."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import import_slicer_core  # noqa: E402

slicer = import_slicer_core()

from helpers import varied_bundle  # noqa: E402
from IDEALSegmentLib.scene_files import load_scene_bundle  # noqa: E402

from IDEALTrain.cli import main as idealtrain  # noqa: E402
from IDEALTrain.io.phantom import make_phantom_pair  # noqa: E402
from IDEALTrain.io.volume_files import write_image  # noqa: E402
from IDEALTrain.model.bundle import save_bundle  # noqa: E402

BATCH = Path(__file__).resolve().parents[1] / "IDEALSegment" / "IDEALSegmentBatch" / "batch.py"



@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An end-diastole/end-systole pair of small oblique phantoms, one corrupt file, and a tiny bundle."""
    root = tmp_path_factory.mktemp("batch")
    (root / "in").mkdir()
    pair = make_phantom_pair(1, size=(48, 40, 6))
    write_image(pair.ed_image, root / "in" / "heart_ED.nii.gz")
    write_image(pair.es_image, root / "in" / "heart_ES.nii.gz")
    (root / "in" / "corrupt.nii.gz").write_bytes(b"not an image")
    return root, save_bundle(varied_bundle(), root / "model")


def run_batch(*arguments, site=True):
    """Run batch.py as a program; with ``site=False`` as from a source checkout without pip install."""
    command = [sys.executable] + ([] if site else ["-S"]) + [str(BATCH), *map(str, arguments)]
    environment = dict(os.environ)
    if not site:  # no editable-install hook: only third-party libraries, as Slicer's Python has them
        environment["PYTHONPATH"] = sysconfig.get_paths()["purelib"]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)


def read(path):
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def test_batch_matches_idealtrain_segment_and_reports_the_bad_case(inputs, tmp_path):
    root, model = inputs
    out = tmp_path / "out"
    result = run_batch("--model", model, "--input", root / "in", "--output", out, "--device", "cpu", "--mrb",
                       "--measurements-csv", tmp_path / "volumes.csv", site=False)
    assert result.returncode == 1, result.stderr[-3000:]  # one failed case
    assert sorted(p.name for p in out.iterdir()) == ["batch-vtk.log", "heart_ED.mrb", "heart_ED.seg.nrrd", "heart_ES.mrb", "heart_ES.seg.nrrd"]
    # the .mrb writer's hundreds of VTK lines go to the log, not to the terminal
    assert "Zip" in (out / "batch-vtk.log").read_text() and "Zip" not in result.stdout + result.stderr
    assert f"VTK/MRML messages: {out / 'batch-vtk.log'}" in result.stdout
    assert "segmented 2 of 3 case(s)" in result.stdout and "failed: corrupt:" in result.stdout
    assert "FAILED" in result.stderr and "Zip" not in result.stdout
    for name in ("heart_ED", "heart_ES"):
        reference = tmp_path / f"{name}.reference.seg.nrrd"
        assert idealtrain(["segment", "--model", str(model), "--input", str(root / "in" / f"{name}.nii.gz"),
                           "--output", str(reference), "--device", "cpu"]) == 0
        ours, our_image = read(out / f"{name}.seg.nrrd")
        theirs, their_image = read(reference)
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs)
        assert len(np.unique(theirs)) == 4  # every class present
        np.testing.assert_allclose(our_image.GetSpacing(), their_image.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(our_image.GetOrigin(), their_image.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(our_image.GetDirection(), their_image.GetDirection(), atol=1e-6)
        segment_fields = [key for key in their_image.GetMetaDataKeys() if key.startswith("Segment")]
        assert len(segment_fields) > 20 and set(segment_fields) == {k for k in our_image.GetMetaDataKeys() if k.startswith("Segment")}
        for key in segment_fields:  # one writer: the same segments, named, coloured and coded the same
            if not key.endswith(("_Tags", "ConversionParameters")):
                assert our_image.GetMetaData(key) == their_image.GetMetaData(key), key
        assert our_image.GetMetaData("Segment0_Tags").endswith(their_image.GetMetaData("Segment0_Tags"))
        assert "IDEALSegment.ModelId:tiny-test|" in our_image.GetMetaData("Segment0_Tags")  # batch records the model
    scene = load_scene_bundle(out / "heart_ED.mrb")
    names = {scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())}
    assert {"heart_ED", "heart_ED segmentation", "heart_ED segmentation uncertainty"} <= names
    rows = list(csv.DictReader((tmp_path / "volumes.csv").open()))
    assert [(row["row_type"], row["case"]) for row in rows[:2]] == [("frame", "heart_ED"), ("frame", "heart_ES")]
    assert float(rows[0]["LV_ml"]) > 0
    summary = {row["name"]: row["value"] for row in rows if row["row_type"] == "summary" and row["case"] == "heart (ED/ES)"}
    assert summary["lv_ef_percent"] != "" and summary["ed_frame"] == "0" and summary["es_frame"] == "1"
    assert {row["row_type"] for row in rows} >= {"frame", "slice", "summary"}
    assert "measured: heart: LV EF" in result.stdout


def test_existing_outputs_are_never_overwritten(inputs, tmp_path):
    root, model = inputs
    out = tmp_path / "out"
    out.mkdir()
    kept = out / "heart_ED.seg.nrrd"
    kept.write_bytes(b"the user's file")
    result = run_batch("--model", model, "--input", root / "in" / "heart_ED.nii.gz", "--output", out, "--device", "cpu")
    assert result.returncode == 1 and "--overwrite" in result.stdout
    assert kept.read_bytes() == b"the user's file"
    result = run_batch("--model", model, "--input", root / "in" / "heart_ED.nii.gz", "--output", out, "--device", "cpu", "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    assert read(kept)[0].shape == (6, 40, 48)
    result = run_batch("--model", tmp_path / "absent", "--input", root / "in", "--output", out)
    assert result.returncode == 2 and "no such model bundle" in result.stderr


def test_dicom_folders_are_cases_too(inputs, tmp_path):
    import importlib.util

    from IDEALTrain.io.dicom_write import write_dicom_series

    root, model = inputs
    image = make_phantom_pair(3, size=(48, 40, 6)).ed_image
    for name, scale in (("patientA", 1000), ("patientB", 900)):
        write_dicom_series(image.with_array((image.array * scale).astype(np.int16)), tmp_path / "dicom" / name)
    spec = importlib.util.spec_from_file_location("idealsegment_batch", BATCH)
    batch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(batch)
    out = tmp_path / "out"
    assert batch.main(["--model", str(model), "--input", str(tmp_path / "dicom"), "--output", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["patientA.seg.nrrd", "patientB.seg.nrrd"]
    reference = tmp_path / "reference.seg.nrrd"
    assert idealtrain(["segment", "--model", str(model), "--input", str(tmp_path / "dicom" / "patientA"),
                       "--output", str(reference), "--device", "cpu"]) == 0
    ours, our_image = read(out / "patientA.seg.nrrd")
    theirs, their_image = read(reference)
    assert np.array_equal(ours, theirs)
    np.testing.assert_allclose(our_image.GetOrigin(), their_image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(our_image.GetDirection(), their_image.GetDirection(), atol=1e-6)


@pytest.fixture(scope="module")
def batch():
    """batch.py loaded as a module, so cases run in-process (no second slicer-core start-up)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("idealsegment_batch_cine", BATCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cine_file(inputs):
    """A 3-frame oblique phantom cine (ED -> ES intensity blends) as one 4D NIfTI file."""
    root, _ = inputs
    pair = make_phantom_pair(2, size=(48, 40, 6))
    frames = [pair.ed_image.with_array(((1 - w) * pair.ed_image.array + w * pair.es_image.array).astype(np.float32))
              for w in (0.0, 0.6, 1.0)]
    path = root / "cine" / "heart.nii.gz"
    path.parent.mkdir()
    sitk.WriteImage(sitk.JoinSeries([frame.to_sitk() for frame in frames]), str(path))
    assert sitk.ReadImage(str(path)).GetDimension() == 4
    return path


def frame_names(case, count):
    return [f"{case}_frame{n:02d}.seg.nrrd" for n in range(count)]


def test_a_case_file_is_checked_whole_once_and_a_cine_read_once(inputs, cine_file, batch, monkeypatch):
    """The integrity check (a full decompression) runs once per file; a 4D file is then read with its reader."""
    import IDEALTrain.io.volume_files as volume_files

    checks, reads = [], []
    check, execute = volume_files.check_complete, sitk.ImageFileReader.Execute
    monkeypatch.setattr(volume_files, "check_complete", lambda path: checks.append(path) or check(path))
    monkeypatch.setattr(sitk.ImageFileReader, "Execute", lambda self: reads.append(self.GetFileName()) or execute(self))
    frames = batch.read_case_frames(cine_file)
    assert len(frames) == 3 and frames[0].array.shape == (6, 40, 48)
    assert (checks, reads) == ([cine_file], [str(cine_file)])
    checks.clear(), reads.clear()
    root, _ = inputs
    assert batch.read_case_frames(root / "in" / "heart_ED.nii.gz") is None  # 3D: left to MRML storage, voxels unread
    assert (checks, reads) == ([root / "in" / "heart_ED.nii.gz"], [])


def test_a_cine_file_gives_one_segmentation_per_frame_like_idealtrain_all_frames(inputs, cine_file, batch, tmp_path, capsys):
    import zipfile

    _, model = inputs
    out = tmp_path / "out"
    table = tmp_path / "volumes.csv"
    assert batch.main(["--model", str(model), "--input", str(cine_file), "--output", str(out), "--device", "cpu",
                       "--mrb", "--measurements-csv", str(table)]) == 0
    stdout = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(frame_names("heart", 3) + ["heart.mrb", "batch-vtk.log"])
    assert idealtrain(["segment", "--model", str(model), "--input", str(cine_file), "--output", str(tmp_path / "reference.seg.nrrd"),
                       "--device", "cpu", "--all-frames"]) == 0
    for ours_name, theirs_name in zip(frame_names("heart", 3), frame_names("reference", 3)):
        ours, our_image = read(out / ours_name)
        theirs, their_image = read(tmp_path / theirs_name)
        assert ours.shape == theirs.shape == (6, 40, 48) and np.array_equal(ours, theirs)
        assert our_image.GetMetaData("Segment2_Name") == their_image.GetMetaData("Segment2_Name")  # one writer
        assert "IDEALSegment.ModelId:tiny-test|" in our_image.GetMetaData("Segment2_Tags")
        np.testing.assert_allclose(our_image.GetSpacing(), their_image.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(our_image.GetOrigin(), their_image.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(our_image.GetDirection(), their_image.GetDirection(), atol=1e-6)
    rows = list(csv.DictReader(table.open()))
    assert {row["case"] for row in rows} == {"heart (cine)"}
    frames = [row for row in rows if row["row_type"] == "frame"]
    assert [int(row["frame"]) for row in frames] == [0, 1, 2]
    lv = [float(row["LV_ml"]) for row in frames]  # after the whole-heart convention
    assert len([row for row in rows if row["row_type"] == "slice"]) == 3 * 6
    cine = {row["name"]: row["value"] for row in rows if row["row_type"] == "summary"}
    ed, es = int(cine["ed_frame"]), int(cine["es_frame"])
    assert ed != es
    assert float(cine["lv_edv_ml"]) == pytest.approx(lv[ed], abs=0.01)
    assert float(cine["lv_esv_ml"]) == pytest.approx(lv[es], abs=0.01)
    assert float(cine["lv_ef_percent"]) == pytest.approx(100 * (lv[ed] - lv[es]) / lv[ed], abs=0.5)  # volumes rounded to 0.01 ml
    assert f"cine: heart: cine of 3 frames, ED frame {ed}, ES frame {es}" in stdout
    assert "segmented 1 of 1 case(s)" in stdout and "Zip" not in stdout
    names = zipfile.ZipFile(out / "heart.mrb").namelist()  # the whole scene: cine, segmentation sequence, table
    assert any(name.endswith("heart.seq.nrrd") for name in names)
    assert any(name.endswith("heart segmentation.seq.mrb") for name in names)
    assert any(name.endswith("heart measurements.tsv") for name in names)
    reloaded = load_scene_bundle(out / "heart.mrb")  # a fresh scene: cine, segmentation sequence and browser come back
    classes = [reloaded.GetNthNode(i).GetClassName() for i in range(reloaded.GetNumberOfNodes())]
    # cine, segmentation and (as --help says) the uncertainty map of every frame, browsed together
    assert classes.count("vtkMRMLSequenceNode") == 3 and "vtkMRMLSequenceBrowserNode" in classes
    uncertainty = next(n for n in (reloaded.GetNthNode(i) for i in range(reloaded.GetNumberOfNodes()))
                       if n.IsA("vtkMRMLSequenceNode") and n.GetName() == "heart segmentation uncertainty")
    assert uncertainty.GetNumberOfDataNodes() == 3 and uncertainty.GetNthDataNode(0).IsA("vtkMRMLScalarVolumeNode")
    browser = next(n for n in (reloaded.GetNthNode(i) for i in range(reloaded.GetNumberOfNodes())) if n.IsA("vtkMRMLSequenceBrowserNode"))
    assert browser.IsSynchronizedSequenceNodeID(uncertainty.GetID())
    segmentations = next(n for n in (reloaded.GetNthNode(i) for i in range(reloaded.GetNumberOfNodes()))
                         if n.IsA("vtkMRMLSequenceNode") and n.GetNumberOfDataNodes() and n.GetNthDataNode(0).IsA("vtkMRMLSegmentationNode"))
    assert segmentations.GetNumberOfDataNodes() == 3


def test_existing_frame_outputs_are_refused_before_anything_is_written(inputs, cine_file, batch, tmp_path, capsys):
    _, model = inputs
    out = tmp_path / "out"
    out.mkdir()
    kept = out / "heart_frame01.seg.nrrd"
    kept.write_bytes(b"the user's file")
    arguments = ["--model", str(model), "--input", str(cine_file), "--output", str(out), "--device", "cpu"]
    assert batch.main(arguments) == 1
    assert "heart_frame01.seg.nrrd" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["heart_frame01.seg.nrrd"]  # frames 0 and 2 not written either
    assert kept.read_bytes() == b"the user's file"
    assert batch.main(arguments + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == frame_names("heart", 3)
    assert read(kept)[0].shape == (6, 40, 48)


def test_a_cine_without_ed_es_still_gets_its_frame_segmentations(inputs, cine_file, batch, tmp_path, capsys):
    from helpers import tiny_bundle

    root, _ = inputs
    only_rv = save_bundle(tiny_bundle(1), tmp_path / "only-rv")  # untrained: predicts RV everywhere, no LV
    out = tmp_path / "out"
    table = tmp_path / "volumes.csv"
    assert batch.main(["--model", str(only_rv), "--input", str(cine_file), "--output", str(out), "--device", "cpu",
                       "--mrb", "--measurements-csv", str(table)]) == 0
    stdout = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == frame_names("heart", 3)  # no .mrb without ED/ES
    assert all(np.all(read(out / name)[0] == 1) for name in frame_names("heart", 3))
    assert "no ED/ES" in stdout and "no LV blood pool was found in any of the 3 frames" in stdout
    assert [(row["row_type"], row["frame"]) for row in csv.DictReader(table.open())] == [("frame", "0"), ("frame", "1"), ("frame", "2")]


def test_a_sunnybrook_cine_dicom_folder(inputs, batch, sunnybrook_dir, tmp_path, capsys):
    from IDEALTrain.io.volume_files import read_frames

    _, model = inputs
    folder = sunnybrook_dir / "dicoms" / "SCD0000101"
    out = tmp_path / "out"
    assert batch.main(["--model", str(model), "--input", str(folder), "--output", str(out), "--device", "cpu"]) == 0
    assert "cine: SCD0000101: cine of 2 frames" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == frame_names("SCD0000101", 2)
    frames = read_frames(folder)
    assert len(frames) == 2
    for name, frame in zip(frame_names("SCD0000101", 2), frames):
        labels, image = read(out / name)
        expected = frame.to_sitk()
        assert image.GetSize() == expected.GetSize()
        np.testing.assert_allclose(image.GetSpacing(), expected.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(image.GetOrigin(), expected.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), expected.GetDirection(), atol=1e-6)
        assert set(np.unique(labels)) <= {0, 1, 2, 3}
