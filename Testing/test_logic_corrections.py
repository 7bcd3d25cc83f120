"""Corrected segmentations -> a training data set on real MRML (slicer-core): exact files, manifest, never overwriting."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from helpers import import_slicer_core  # noqa: E402

slicer = import_slicer_core()

from IDEALSegmentLib.cine import sequence_from_images  # noqa: E402
from IDEALSegmentLib.corrections import (  # noqa: E402
    add_to_pool,
    add_unlabeled_volume,
    dataset_summary,
    export_correction,
    pool_count,
    read_manifest,
    safe_case_id,
    voxel_sha256,
)
from IDEALSegmentLib.review import mark_model_output  # noqa: E402
from IDEALSegmentLib.segmentations import (  # noqa: E402
    Provenance,
    replace_segments,
    segmentation_from_labels,
)
from IDEALSegmentLib.volumes import image_from_volume, volume_from_image  # noqa: E402

import IDEALTrain  # noqa: E402
from IDEALTrain.errors import IdealError  # noqa: E402
from IDEALTrain.io.datasets import load_cases  # noqa: E402
from IDEALTrain.io.phantom import make_phantom_pair  # noqa: E402

PROVENANCE = Provenance("idealsegment-acdc", "1.2.0", "2026-01-02T03:04:05+00:00")
VOLUME_NAME = "Patient 7 / cine (ED)"


def labeled(folder):
    """The manifest's reviewed cases (the scans behind them join the pool as unlabelled entries)."""
    return [entry for entry in read_manifest(folder) if entry["kind"] == "labeled"]


@pytest.fixture(scope="module")
def pair():
    """Oblique, anisotropic (1.5 x 1.4 x 8 mm), non-zero-origin phantom frames with labels."""
    return make_phantom_pair(21, size=(40, 36, 6), spacing=(1.5, 1.4, 8.0))


@pytest.fixture
def case(pair):
    """A scene with the ED volume, the model's draft segmentation and the clinician's correction of it."""
    scene = slicer.vtkMRMLScene()
    volume = volume_from_image(pair.ed_image, scene, VOLUME_NAME)
    segmentation = segmentation_from_labels(pair.ed_label, volume, provenance=PROVENANCE)
    corrected = pair.ed_label.array.copy()
    corrected[2][corrected[2] == 1] = 0  # the reviewer removed the RV on slice 2 ...
    corrected[3, 10:14, 10:14] = 2  # ... and painted some myocardium on slice 3
    replace_segments(segmentation, pair.ed_label.with_array(corrected), volume, ["RV", "LV_Myocardium", "LV"])
    return scene, volume, segmentation, pair.ed_label.with_array(corrected)


def node_state(scene):
    """Every node's ID and modification time: anything added, removed or modified shows."""
    return sorted((scene.GetNthNode(i).GetID(), scene.GetNthNode(i).GetMTime()) for i in range(scene.GetNumberOfNodes()))


def file_state(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_exported_case_reads_back_voxel_exact(case, tmp_path):
    scene, volume, segmentation, corrected = case
    dataset = tmp_path / "corrections"
    before = node_state(scene)
    label_path = export_correction(dataset, volume, segmentation, reviewer="dr.a", reviewed_slices=[3, 2, 2])
    assert node_state(scene) == before  # exporting changes nothing in the scene
    assert label_path == dataset / "labels" / "Patient_7_cine_ED.nii.gz"
    [loaded] = load_cases(f"folder:{dataset}", require_labels=True)
    image = image_from_volume(volume)
    assert loaded.name == "Patient_7_cine_ED"
    assert loaded.image.array.dtype == image.array.dtype and np.array_equal(loaded.image.array, image.array)
    assert loaded.image.same_grid(image) and loaded.label.same_grid(image)
    assert not np.allclose(image.direction, np.eye(3), atol=0.1) and len(set(image.spacing)) == 3
    assert np.array_equal(loaded.label.array, corrected.array)
    assert sorted(p.name for p in dataset.iterdir()) == ["images", "labels", "manifest.json", "unlabeled"]  # no staging left; the scan joined the pool


def test_manifest_records_source_model_reviewer_and_counts(case, tmp_path):
    scene, volume, segmentation, corrected = case
    volume.AddDefaultStorageNode()
    volume.GetStorageNode().SetFileName("/data/study/p7_cine_ed.nrrd")
    start = datetime.now(timezone.utc).replace(microsecond=0)
    export_correction(tmp_path, volume, segmentation, case_id="p7-ed", reviewer="dr.a", reviewed_slices=[3, 2, 2])
    [entry] = labeled(tmp_path)
    assert entry["case_id"] == "p7-ed" and entry["kind"] == "labeled"
    assert entry["files"] == {"image": "images/p7-ed.nii.gz", "label": "labels/p7-ed.nii.gz"}
    assert entry["source"] == {
        "volume_name": VOLUME_NAME,
        "storage_file": "p7_cine_ed.nrrd",
        "image_sha256": voxel_sha256(image_from_volume(volume)),
    }
    assert entry["model"] == {"model_id": "idealsegment-acdc", "model_version": "1.2.0", "created": PROVENANCE.created}
    assert entry["reviewer"] == "dr.a"
    exported = datetime.fromisoformat(entry["exported_at"])
    assert exported.utcoffset() == timedelta(0) and start <= exported <= datetime.now(timezone.utc)
    assert entry["reviewed_slices"] == [2, 3] and entry["slice_axis"] == 0
    assert entry["label_voxels"] == {name: int(np.count_nonzero(corrected.array == value))
                                     for value, name in ((1, "RV"), (2, "LV_Myocardium"), (3, "LV"))}
    assert entry["idealtrain_version"] == IDEALTrain.__version__
    assert entry["size"] == [40, 36, 6] and entry["spacing"] == pytest.approx([1.5, 1.4, 8.0])
    document = json.loads((tmp_path / "manifest.json").read_text())
    assert document["format"] == "idealsegment-corrections" and document["version"] == 2


def test_hand_drawn_segmentation_has_no_model(pair, tmp_path):
    scene = slicer.vtkMRMLScene()
    volume = volume_from_image(pair.es_image, scene, "es")
    drawn = segmentation_from_labels(pair.es_label, volume)  # no provenance: drawn by hand
    export_correction(tmp_path, volume, drawn)
    [entry] = labeled(tmp_path)
    assert entry["model"] is None and entry["reviewer"] == ""
    # No record of a model's output: every structure counts as reviewed, on every slice where it is drawn.
    present = {name: [k for k in range(6) if (pair.es_label.array[k] == value).any()] for value, name in ((1, "RV"), (2, "LV_Myocardium"), (3, "LV"))}
    assert entry["reviewed"] == {name: slices for name, slices in present.items() if slices}
    assert entry["reviewed_rule"].startswith("every structure") and entry["patient_id"] == "es"
    assert entry["reviewed_slices"] == sorted({k for slices in present.values() for k in slices})


def test_an_existing_case_is_never_replaced_silently(case, tmp_path):
    scene, volume, segmentation, corrected = case
    export_correction(tmp_path, volume, segmentation, reviewer="dr.a")
    before = file_state(tmp_path)
    replace_segments(segmentation, corrected.with_array(np.where(corrected.array == 3, 0, corrected.array)), volume, ["LV"])
    with pytest.raises(IdealError, match=r"case 'Patient_7_cine_ED' is already in .*overwrite=True"):
        export_correction(tmp_path, volume, segmentation, reviewer="dr.b")
    assert file_state(tmp_path) == before
    time.sleep(1.0)  # a later export time
    export_correction(tmp_path, volume, segmentation, reviewer="dr.b", overwrite=True)
    [entry] = labeled(tmp_path)
    assert entry["reviewer"] == "dr.b" and entry["label_voxels"]["LV"] == 0
    [replaced] = entry["replaced"]
    assert replaced["reviewer"] == "dr.a" and replaced["exported_at"] < entry["exported_at"]
    [loaded] = load_cases(f"folder:{tmp_path}", require_labels=True)
    assert not (loaded.label.array == 3).any() and np.array_equal(loaded.label.array == 1, corrected.array == 1)


def test_unlabeled_volumes_and_summary(case, pair, tmp_path):
    scene, volume, segmentation, corrected = case
    es_volume = volume_from_image(pair.es_image, scene, "Patient 7 ES")
    path = add_unlabeled_volume(tmp_path, es_volume)
    assert path == tmp_path / "unlabeled" / "images" / "Patient_7_ES.nii.gz"
    export_correction(tmp_path, volume, segmentation, reviewed_slices=[1, 2, 3])
    drawn = segmentation_from_labels(pair.es_label, es_volume)
    export_correction(tmp_path, es_volume, drawn, case_id="p7-es-drawn", reviewed_slices=range(6))
    # The scans behind the reviewed cases joined the pool, each once: the ED volume; the ES one was already there.
    unlabeled, ed_scan = load_cases(f"folder:{tmp_path / 'unlabeled'}")
    assert ed_scan.name == "Patient_7_cine_ED_scan" and np.array_equal(ed_scan.image.array, image_from_volume(volume).array)
    assert unlabeled.name == "Patient_7_ES" and unlabeled.label is None
    assert np.array_equal(unlabeled.image.array, pair.es_image.array) and unlabeled.image.same_grid(pair.es_image)
    assert [c.name for c in load_cases(f"folder:{tmp_path}", require_labels=True)] == ["Patient_7_cine_ED", "p7-es-drawn"]
    assert dataset_summary(tmp_path) == {
        "cases": 2,
        "reviewed_slices": 9,
        "unlabeled_volumes": 2,
        "patients": 2,
        "models": {"idealsegment-acdc 1.2.0": 1, "drawn by hand": 1},
        "reviewers": [],
    }
    with pytest.raises(IdealError, match="'Patient_7_ES' is already in"):
        add_unlabeled_volume(tmp_path, es_volume)
    # Labelling an unlabelled case later moves it: its unlabelled file goes, the manifest keeps one entry.
    export_correction(tmp_path, es_volume, drawn, case_id="Patient_7_ES", overwrite=True)
    assert not path.exists()
    assert [e["kind"] for e in read_manifest(tmp_path) if e["case_id"] == "Patient_7_ES"] == ["labeled"]


def test_user_segments_without_the_standard_ids_are_refused(pair, tmp_path):
    scene = slicer.vtkMRMLScene()
    volume = volume_from_image(pair.ed_image, scene, "ed")
    own = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my contours")
    own.GetSegmentation().AddEmptySegment("Segment_1", "left ventricle", [1.0, 0.0, 0.0])
    own.GetSegmentation().AddEmptySegment("LV", "LV", [1.0, 0.0, 0.0])
    with pytest.raises(IdealError, match=r"'my contours' has no segment with ID RV, LV_Myocardium \(it has Segment_1, LV\)"):
        export_correction(tmp_path / "new", volume, own)
    assert not (tmp_path / "new").exists()


def test_bad_input_is_refused_and_writes_nothing(case, tmp_path):
    scene, volume, segmentation, corrected = case
    with pytest.raises(IdealError, match="case id '../evil' is not a safe file name"):
        export_correction(tmp_path / "a", volume, segmentation, case_id="../evil")
    with pytest.raises(IdealError, match=r"reviewed slice 6 is outside the volume's 6 slices \(0-5\)"):
        export_correction(tmp_path / "a", volume, segmentation, reviewed_slices=[0, 6])
    with pytest.raises(IdealError, match="no corrected segmentation selected"):
        export_correction(tmp_path / "a", volume, None)
    replace_segments(segmentation, corrected.with_array(np.zeros_like(corrected.array)), volume, ["RV", "LV_Myocardium", "LV"])
    with pytest.raises(IdealError, match="is empty on volume .*add the volume as unlabelled instead"):
        export_correction(tmp_path / "a", volume, segmentation)
    assert not (tmp_path / "a").exists()
    (tmp_path / "b" / "images").mkdir(parents=True)
    (tmp_path / "b" / "images" / "someone_else.nii.gz").write_bytes(b"x")
    with pytest.raises(IdealError, match="already holds files but no manifest.json"):
        add_unlabeled_volume(tmp_path / "b", volume)
    assert safe_case_id(" ..//..") == "case" and safe_case_id("a b\u00e9c") == "a_b_c"


def test_read_manifest_checks_the_data_set(case, tmp_path):
    scene, volume, segmentation, corrected = case
    with pytest.raises(IdealError, match="has no manifest.json: it is not a corrections data set"):
        read_manifest(tmp_path)
    export_correction(tmp_path, volume, segmentation)
    manifest = tmp_path / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good[: len(good) // 2])
    with pytest.raises(IdealError, match="manifest.json is corrupt"):
        read_manifest(tmp_path)
    with pytest.raises(IdealError, match="manifest.json is corrupt"):
        add_unlabeled_volume(tmp_path, volume, "other")  # never writes on top of a broken manifest
    manifest.write_text(json.dumps({"format": "idealsegment-corrections", "version": 1, "cases": [{"case_id": "x", "kind": "labeled"}]}))
    with pytest.raises(IdealError, match="case 'x' has no valid 'files'"):
        read_manifest(tmp_path)
    entry = json.loads(good)["cases"][0]
    manifest.write_text(json.dumps({**json.loads(good), "cases": [{**entry, "files": {"image": "../../etc/passwd"}}]}))
    with pytest.raises(IdealError, match="lists files outside the data set folder"):
        read_manifest(tmp_path)
    manifest.write_text(good)
    (tmp_path / "labels" / "Patient_7_cine_ED.nii.gz").unlink()
    with pytest.raises(IdealError, match=r"lists 1 file\(s\) that are missing, e.g. \['labels/Patient_7_cine_ED.nii.gz'\]"):
        dataset_summary(tmp_path)


def test_idealtrain_finetunes_on_the_exported_data_set(case, pair, tmp_path):
    scene, volume, segmentation, corrected = case
    dataset = tmp_path / "corrections"
    export_correction(dataset, volume, segmentation, case_id="ed")
    es_volume = volume_from_image(pair.es_image, scene, "es")
    export_correction(dataset, es_volume, segmentation_from_labels(pair.es_label, es_volume), case_id="es")
    add_unlabeled_volume(dataset, volume_from_image(pair.ed_image.with_array(pair.ed_image.array[::-1].copy()), scene, "flipped"))
    out = tmp_path / "model"
    command = [
        sys.executable, "-m", "IDEALTrain", "finetune", "--labeled", f"folder:{dataset}", "--unlabeled", f"folder:{dataset}/unlabeled",
        "--iterations", "2", "--out", str(out), "--base-channels", "4", "--depth", "3", "--size", "32",
        "--batch-size", "2", "--unlabeled-batch-size", "2", "--device", "cpu", "--progress-json",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "done" and (out / "card.json").is_file()
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["labeled_data"] == f"folder:{dataset}"


# -- what was reviewed, and the unlabelled pool -------------------------------------------------------
def test_chosen_structures_are_recorded_per_slice(case, tmp_path):
    scene, volume, segmentation, corrected = case
    export_correction(tmp_path, volume, segmentation, case_id="map", reviewed_structures={"LV": [3, 1], "RV": []}, patient_id="p7")
    export_correction(tmp_path, volume, segmentation, case_id="list", reviewed_structures=["LV_Myocardium"], reviewed_slices=[3, 4])
    by_id = {entry["case_id"]: entry for entry in read_manifest(tmp_path)}
    assert by_id["map"]["reviewed"] == {"LV": [1, 3]} and by_id["map"]["reviewed_slices"] == [1, 3]
    assert by_id["map"]["patient_id"] == "p7" and by_id["map"]["reviewed_rule"] == "chosen structures"
    myocardium = [k for k in (3, 4) if (corrected.array[k] == 2).any()]
    assert myocardium and by_id["list"]["reviewed"] == {"LV_Myocardium": myocardium}
    with pytest.raises(IdealError, match="unknown structure"):
        export_correction(tmp_path, volume, segmentation, case_id="bad", reviewed_structures=["Aorta"])
    with pytest.raises(IdealError, match="nothing reviewed"):
        export_correction(tmp_path, volume, segmentation, case_id="none", reviewed_structures={"LV": []})
    assert sorted(by_id) == sorted(entry["case_id"] for entry in read_manifest(tmp_path))  # refusals wrote nothing


def test_by_default_the_edited_structures_are_the_reviewed_ones(pair, tmp_path):
    scene = slicer.vtkMRMLScene()
    volume = volume_from_image(pair.ed_image, scene, "ed")
    segmentation = segmentation_from_labels(pair.ed_label, volume, provenance=PROVENANCE)
    mark_model_output(segmentation, pair.ed_label)  # what the module records when the model draws
    edited = pair.ed_label.array.copy()
    edited[3][edited[3] == 3] = 0  # the clinician erases the LV on slice 3 and redraws a smaller one
    edited[3, 18:22, 18:22] = 3
    replace_segments(segmentation, pair.ed_label.with_array(edited), volume, ["LV"])
    export_correction(tmp_path, volume, segmentation)
    [entry] = labeled(tmp_path)
    assert entry["reviewed_rule"] == "edited structures on the edited slices"
    assert entry["reviewed"] == {"LV": [3]}  # not the untouched RV or myocardium, and only the slice edited


def test_add_to_pool_takes_every_frame_of_a_cine_and_only_when_asked(pair, tmp_path):
    scene = slicer.vtkMRMLScene()
    cine = sequence_from_images(scene, [pair.ed_image, pair.es_image, pair.ed_image], "Patient 7 cine")
    pool = tmp_path / "pool"
    assert pool_count(pool) == 0 and not pool.exists()  # nothing is copied before the step
    files = add_to_pool(pool, cine)
    assert [f.name for f in files] == [f"Patient_7_cine_frame{n:02d}.nii.gz" for n in range(3)]
    assert pool_count(pool) == 3 and dataset_summary(pool)["unlabeled_volumes"] == 3
    add_to_pool(pool, volume_from_image(pair.es_image, scene, "single"))
    assert pool_count(pool) == 4
    loaded = load_cases(f"folder:{pool}/unlabeled")
    assert len(loaded) == 4 and all(c.label is None for c in loaded)
    assert np.array_equal(loaded[1].image.array, pair.es_image.array)
    with pytest.raises(IdealError, match="already in"):
        add_to_pool(pool, cine)
