"""``idealtrain export-corrections`` then ``finetune --preset continue`` (issue 29's command-line retraining, issue 31's
marking): the same record as the Slicer module writes, and training on exactly the reviewed structures and slices."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import import_slicer_core, tiny_bundle

from IDEALTrain.cli import main
from IDEALTrain.io.corrections import read_manifest
from IDEALTrain.io.phantom import make_phantom
from IDEALTrain.io.volume_files import write_image
from IDEALTrain.labels import CARDIAC_LABELS
from IDEALTrain.model.bundle import read_card, save_bundle
from IDEALTrain.training.partial_labels import UNLABELLED, class_set_value
from IDEALTrain.training.presets import CONTINUE, expand_preset

RV, MYO, LV = 1, 2, 3


@pytest.fixture
def corrected_case(tmp_path):
    """A phantom, the model's draft (its labels) and a correction: the LV redrawn on slice 1, the myocardium painted
    over RV voxels on slice 2. Files as a user has them."""
    image, draft = make_phantom(0, size=(40, 40, 4), spacing=(2.0, 2.0, 8.0))
    axis = image.slice_axis
    corrected = draft.array.copy()
    view = np.moveaxis(corrected, axis, 0)
    lv = np.argwhere(view[1] == LV)
    view[1][tuple(lv[: len(lv) // 2].T)] = 0  # the clinician erases half the LV on slice 1
    rv = np.argwhere(view[2] == RV)
    assert len(rv) > 4
    view[2][tuple(rv[:4].T)] = MYO  # and paints the myocardium over four RV voxels on slice 2
    files = {"image": tmp_path / "scan.nii.gz", "draft": tmp_path / "draft.nii.gz", "labels": tmp_path / "corrected.seg.nrrd"}
    write_image(image, files["image"])
    write_image(draft, files["draft"])
    write_image(draft.with_array(corrected), files["labels"], labels=CARDIAC_LABELS)  # as Slicer saves a segmentation
    return image, draft, draft.with_array(corrected), files


def test_export_records_only_the_edited_structures_on_the_edited_slices(corrected_case, tmp_path, capsys):
    image, draft, corrected, files = corrected_case
    out = tmp_path / "corrections"
    assert main(["export-corrections", "--image", str(files["image"]), "--labels", str(files["labels"]),
                 "--model-output", str(files["draft"]), "--reviewer", "dr cli", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "scan (patient scan): teaches Left ventricle myocardium on slice(s) 2; Left ventricle blood pool on slice(s) 1" in printed
    assert "not reviewed (not taught): Right ventricle" in printed
    [case, scan] = read_manifest(out)
    assert case["reviewed"] == {"LV_Myocardium": [2], "LV": [1]} and case["reviewed_rule"] == "edited structures on the edited slices"
    assert case["patient_id"] == "scan" and case["reviewer"] == "dr cli" and case["reviewed_slices"] == [1, 2]
    assert scan["kind"] == "unlabeled" and scan["case_id"] == "scan_scan" and scan["patient_id"] == "scan"
    # The same record as the Slicer module writes for the same correction made in a scene.
    slicer = import_slicer_core()
    from IDEALSegmentLib.corrections import export_correction
    from IDEALSegmentLib.review import mark_model_output
    from IDEALSegmentLib.segmentations import replace_segments, segmentation_from_labels
    from IDEALSegmentLib.volumes import volume_from_image

    scene = slicer.vtkMRMLScene()
    volume = volume_from_image(image, scene, "scan")
    segmentation = segmentation_from_labels(draft, volume)
    mark_model_output(segmentation, draft)
    replace_segments(segmentation, corrected, volume, ["RV", "LV_Myocardium", "LV"])
    export_correction(tmp_path / "logic", volume, segmentation)
    [logic, _] = read_manifest(tmp_path / "logic")
    assert set(logic) == set(case) - {"replaced"}
    for key in ("reviewed", "reviewed_rule", "reviewed_slices", "patient_id", "label_voxels", "slice_axis", "size"):
        assert logic[key] == case[key], key
    assert logic["source"]["image_sha256"] == case["source"]["image_sha256"]


def test_exported_corrections_train_exactly_what_was_reviewed_with_the_continue_preset(corrected_case, tmp_path, monkeypatch):
    image, draft, corrected, files = corrected_case
    out = tmp_path / "corrections"
    main(["export-corrections", "--image", str(files["image"]), "--labels", str(files["labels"]),
          "--model-output", str(files["draft"]), "--out", str(out)])
    old = save_bundle(tiny_bundle(0), tmp_path / "old")
    seen = {}
    from IDEALTrain.training import finetune

    real = finetune.train_segmentation

    def spy(labeled, config, **kwargs):
        seen.update(labeled=labeled, config=config, unlabeled=kwargs.get("unlabeled"))
        return real(labeled, config, **kwargs)

    monkeypatch.setattr(finetune, "train_segmentation", spy)
    new = tmp_path / "new"
    assert main(["finetune", "--preset", "continue", "--labeled", f"folder:{out}", "--init-from", str(old),
                 "--iterations", "2", "--out", str(new), "--device", "cpu"]) == 0
    # The Slicer plan, from its one definition (explicit --iterations wins over the preset's 200).
    config = seen["config"]
    assert (config.iterations, config.batch_size, config.crop_size, config.frozen_levels) == (2, CONTINUE.batch_size, CONTINUE.crop, CONTINUE.frozen_levels)
    assert (config.distill_weight, config.keep_old, config.learning_rate, config.frozen_norm) == (CONTINUE.distill, CONTINUE.keep_old, CONTINUE.lr, True)
    # Exactly the reviewed structures and slices: slice 1 knows the LV (elsewhere only "not LV"), slice 2 the myocardium.
    [case] = seen["labeled"]
    taught = np.moveaxis(case.label.array, image.slice_axis, 0)
    fixed = np.moveaxis(corrected.array, image.slice_axis, 0)
    assert (taught[[0, 3]] == UNLABELLED).all()
    assert np.array_equal(taught[1] == LV, fixed[1] == LV) and (taught[1][fixed[1] != LV] == class_set_value([0, 1, 2])).all()
    assert np.array_equal(taught[2] == MYO, fixed[2] == MYO) and (taught[2][fixed[2] != MYO] == class_set_value([0, 1, 3])).all()
    assert [c.name for c in seen["unlabeled"]] == ["scan_scan"]  # the scan behind the case, from the data set's pool
    # The retrained model is a new version of the old one, with its own description and provenance.
    card = read_card(new)
    assert (card["id"], card["version"]) == ("tiny-test", "0.0.2")
    assert card["description"].startswith("Retrained from tiny-test 0.0.1 on folder:") and "--preset continue" in card["description"]
    assert card["training"]["retrained_from"]["version"] == "0.0.1" and card["training"]["retrained_from"]["preset"] == "continue"
    [learnt] = card["training"]["corrections"]["cases"]
    assert learnt["case_id"] == "scan" and learnt["reviewed"] == {"LV_Myocardium": [2], "LV": [1]}


def test_the_preset_expands_before_the_users_own_flags():
    argv = expand_preset(["finetune", "--preset", "continue", "--distill", "0", "--labeled", "x"])
    assert argv[:3] == ["finetune", "--iterations", str(CONTINUE.iterations)]
    assert argv.index("--distill") < len(argv) - 4 and argv[-4:-2] == ["--distill", "0"]  # the user's --distill comes last: it wins
    assert expand_preset(["segment", "--preset", "continue"]) == ["segment", "--preset", "continue"]


def test_export_refuses_labels_of_another_image_and_preset_needs_a_model(corrected_case, tmp_path, capsys):
    image, draft, corrected, files = corrected_case
    other, other_label = make_phantom(1, size=(30, 30, 4), spacing=(3.0, 3.0, 8.0))
    write_image(other_label, tmp_path / "other.nii.gz")
    assert main(["export-corrections", "--image", str(files["image"]), "--labels", str(tmp_path / "other.nii.gz"),
                 "--out", str(tmp_path / "c")]) == 2
    assert "is not on the image's voxel grid" in capsys.readouterr().err
    main(["export-corrections", "--image", str(files["image"]), "--labels", str(files["labels"]), "--out", str(tmp_path / "c")])
    assert main(["finetune", "--preset", "continue", "--labeled", f"folder:{tmp_path / 'c'}", "--out", str(tmp_path / "m")]) == 2
    assert "--preset continue continues a model: give it with --init-from" in capsys.readouterr().err
    record = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert record["cases"][0]["reviewed_rule"].startswith("every structure")


def test_dicom_plus_seg_nrrd_takes_the_patient_from_the_dicom_and_the_whole_cine_to_the_pool(tmp_path, capsys):
    """The shipped sample's DICOM (one series, ED and ES) with a .seg.nrrd saved for frame 1, cropped as Slicer saves it."""
    from IDEALTrain.io.sample_data import load_sample
    from IDEALTrain.io.volume_files import read_frames

    sample = load_sample()
    frames = read_frames(sample.dicom_dir)
    labels = np.zeros(frames[1].array.shape, np.uint8)
    labels[4, 100:120, 110:130] = LV
    import SimpleITK as sitk

    from IDEALTrain.io.image import Image

    # Slicer saves a segmentation cropped to its extent: here slices 3-5, rows 90-129, columns 100-139 (x, y, z order below).
    cropped = sitk.RegionOfInterest(frames[1].with_array(labels).to_sitk(), [40, 40, 3], [100, 90, 3])
    write_image(Image.from_sitk(cropped), tmp_path / "es.seg.nrrd", labels=CARDIAC_LABELS)
    out = tmp_path / "corrections"
    assert main(["export-corrections", "--image", str(sample.dicom_dir), "--frame", "1", "--labels", str(tmp_path / "es.seg.nrrd"),
                 "--out", str(out)]) == 0
    case, *scans = read_manifest(out)
    assert case["case_id"] == "SCD0000101_frame01" and case["patient_id"] == "SCD0000101"  # from the DICOM header
    assert case["reviewed"] == {"LV": [4]} and case["label_voxels"]["LV"] == 400  # placed back on the full grid, voxel-exact
    assert [s["case_id"] for s in scans] == ["SCD0000101_scan_frame00", "SCD0000101_scan_frame01"]
    assert {s["patient_id"] for s in scans} == {"SCD0000101"}
    # The ED frame of the same cine: same patient, and its scans are already in the pool.
    write_image(frames[0].with_array(labels), tmp_path / "ed.nii.gz")
    main(["export-corrections", "--image", str(sample.dicom_dir), "--frame", "0", "--labels", str(tmp_path / "ed.nii.gz"), "--out", str(out)])
    assert "0 scan(s) added to the unlabelled pool, which holds 2" in capsys.readouterr().out
