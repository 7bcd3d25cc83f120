"""Issue 31: only what a clinician reviewed is taught back, on real slicer-core scenes of the shipped sample.

The shipped model segments SCD0000101 (ED and ES) through the Logic; the expert's contours are then
painted over its output as a clinician does with the Segment Editor (a painted segment overwrites the
others). The default marking must count only the structures the clinician changed deliberately, on
the slices where they changed them: painting the myocardium over RV voxels does not review the RV,
and redrawing the LV over the myocardium does not review the myocardium.
"""
from __future__ import annotations

import numpy as np
import pytest
from helpers import import_slicer_core

pytest.importorskip("skimage", reason="the expert contours need scikit-image (pip install -e '.[test]')")
slicer = import_slicer_core()

from IDEALSegmentLib.corrections import export_correction, read_manifest  # noqa: E402
from IDEALSegmentLib.inference import segment_volume  # noqa: E402
from IDEALSegmentLib.segmentations import labels_from_segmentation, register_converter_rules, replace_segments  # noqa: E402
from IDEALSegmentLib.volumes import image_from_volume, volume_from_image  # noqa: E402

from IDEALTrain.io.sample_data import default_model_dir, load_sample, read_sample_phase  # noqa: E402
from IDEALTrain.io.sunnybrook import read_sunnybrook_patient  # noqa: E402

RV, MYO, LV = 1, 2, 3


@pytest.fixture(scope="module")
def sample_scene():
    """The sample's ED and ES volumes (the slices the expert drew) in a scene, segmented by the shipped model through
    the Logic, and the expert's labels."""
    register_converter_rules()
    scene = slicer.vtkMRMLScene()
    sample = load_sample()
    volumes = {phase: volume_from_image(read_sample_phase(sample, phase, contoured_only=True), scene, f"{sample.patient}_{phase}")
               for phase in ("ED", "ES")}
    expert = {phase.phase: phase for phase in read_sunnybrook_patient(sample.root, sample.patient)}
    segmentations = {phase: segment_volume(volumes[phase], default_model_dir(), device="cpu", with_uncertainty=False).segmentation
                     for phase in ("ED", "ES")}
    return scene, volumes, segmentations, expert


def paint(volume, segmentation, expert, structures: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Redraw ``structures`` (value -> slices) from the expert over the model's output, painted segments overwriting
    others; (model labels, corrected labels)."""
    model = labels_from_segmentation(segmentation, volume)
    corrected = model.array.copy()
    for value, slices in structures.items():
        for k in slices:
            corrected[k][corrected[k] == value] = 0  # the clinician erases the model's contour ...
            corrected[k][expert.label.array[k] == value] = value  # ... and paints the expert's, over whatever was there
    replace_segments(segmentation, model.with_array(corrected), volume, ["RV", "LV_Myocardium", "LV"])  # no overlap left
    return model.array, labels_from_segmentation(segmentation, volume).array


def test_painting_the_myocardium_over_the_rv_does_not_review_the_rv(sample_scene, tmp_path):
    """SCD0000101 ED: the expert LV and myocardium painted; the RV voxels they cover are not an RV review."""
    scene, volumes, segmentations, expert = sample_scene
    ed = expert["ED"]
    assert image_from_volume(volumes["ED"]).same_grid(ed.label)  # the expert's labels lie on the sample's grid
    myo_slices = [k for k, has in enumerate(ed.myocardium_slices) if has]
    lv_slices = list(range(ed.label.array.shape[0]))
    model, corrected = paint(volumes["ED"], segmentations["ED"], ed, {LV: lv_slices, MYO: myo_slices})
    overwritten = int(np.count_nonzero((model == RV) & (corrected == MYO)))
    assert overwritten > 0  # the situation of the issue: the painted myocardium took RV voxels
    export_correction(tmp_path, volumes["ED"], segmentations["ED"], case_id="ed")
    [case] = [e for e in read_manifest(tmp_path) if e["kind"] == "labeled"]
    assert "RV" not in case["reviewed"] and case["reviewed_rule"] == "edited structures on the edited slices"
    assert set(case["reviewed"]) == {"LV", "LV_Myocardium"}
    assert set(case["reviewed"]["LV_Myocardium"]) <= set(myo_slices)  # only slices where the myocardium was redrawn
    changed = [k for k in range(model.shape[0]) if (((corrected[k] == MYO) != (model[k] == MYO)) & (corrected[k] != LV)).any()]
    assert case["reviewed"]["LV_Myocardium"] == sorted(set(changed) & set(myo_slices))


def test_redrawing_the_lv_does_not_flag_the_myocardium(sample_scene, tmp_path):
    """SCD0000101 ES: only the LV redrawn; myocardium voxels it covers are the LV's edit, not a myocardium review."""
    scene, volumes, segmentations, expert = sample_scene
    es = expert["ES"]
    model, corrected = paint(volumes["ES"], segmentations["ES"], es, {LV: list(range(es.label.array.shape[0]))})
    assert np.count_nonzero((model == MYO) & (corrected == LV)) > 0  # the LV grew over the model's myocardium
    export_correction(tmp_path, volumes["ES"], segmentations["ES"], case_id="es")
    [case] = [e for e in read_manifest(tmp_path) if e["kind"] == "labeled"]
    assert list(case["reviewed"]) == ["LV"]
    edited = [k for k in range(model.shape[0]) if ((corrected[k] == LV) != (model[k] == LV)).any()]
    assert case["reviewed"]["LV"] == edited
    # The clinician adjusts the reviewed slices in the panel: the edited structures count on those slices only.
    export_correction(tmp_path, volumes["ES"], segmentations["ES"], case_id="es2", reviewed_slices=edited[:2])
    assert [e for e in read_manifest(tmp_path) if e["case_id"] == "es2"][0]["reviewed"] == {"LV": edited[:2]}


def test_the_shipped_expert_labels_are_the_contours():
    """The sample's label maps (the comparison's non-site reference, readable without scikit-image) are its contours."""
    from IDEALTrain.io.datasets import load_cases

    sample = load_sample()
    expert = {phase.phase: phase for phase in read_sunnybrook_patient(sample.root, sample.patient)}
    cases = load_cases(f"sample:{sample.root}", require_labels=True)
    assert [case.name for case in cases] == [f"{sample.patient}_ED", f"{sample.patient}_ES"]
    for case, phase in zip(cases, ("ED", "ES")):
        assert case.label.same_grid(expert[phase].label) and np.array_equal(case.label.array, expert[phase].label.array)
        assert np.array_equal(case.image.array, expert[phase].image.array)
