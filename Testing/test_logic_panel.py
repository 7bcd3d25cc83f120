"""The IDEALSegment panel's controller on real MRML scenes (slicer-core), with real child processes.

Segment a volume, an ED/ES pair and a cine (the proxy volume chosen, as in Slicer), edit the
frame-2 segmentation and change frames, mark ED and ES reviewed, refuse a segmentation of another
image, close the scene during a job, cancel, and recompute measurements after a correction.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from helpers import import_slicer_core, tiny_bundle  # noqa: E402

slicer = import_slicer_core()

from IDEALSegmentLib.corrections import read_manifest  # noqa: E402
from IDEALSegmentLib.inference import node_ids  # noqa: E402
from IDEALSegmentLib.measurements import table_measurements  # noqa: E402
from IDEALSegmentLib.panel import Parameters, SegmentPanelController  # noqa: E402
from IDEALSegmentLib.registry import ModelRegistry  # noqa: E402
from IDEALSegmentLib.segmentations import labels_from_segmentation, replace_segments  # noqa: E402
from IDEALSegmentLib.volumes import image_from_volume, volume_from_image  # noqa: E402

from IDEALTrain.errors import IdealError  # noqa: E402
from IDEALTrain.inference.predictor import Predictor  # noqa: E402
from IDEALTrain.io.phantom import make_phantom_pair  # noqa: E402
from IDEALTrain.labels import CARDIAC_LABELS  # noqa: E402
from IDEALTrain.model.bundle import save_bundle  # noqa: E402

BLENDS = (0.0, 0.4, 0.8, 1.0, 0.5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A user models folder with one small model whose labels follow the image (so ED and ES differ)."""
    bundle = tiny_bundle(0)
    for key in list(bundle.weights):
        if key.endswith("classifier.bias"):
            bundle.weights[key] = torch.zeros_like(bundle.weights[key])
        elif key.endswith("classifier.weight"):
            bundle.weights[key] = bundle.weights[key] * 50.0
    bundle.model_id, bundle.version = "panel-test", "1.0.0"
    root = tmp_path_factory.mktemp("models")
    save_bundle(bundle, root / "user" / "panel-test-1.0.0")
    (root / "shipped").mkdir()
    return root


@pytest.fixture(scope="module")
def pair():
    return make_phantom_pair(5, size=(48, 40, 6), spacing=(1.5, 1.5, 8.0))


def new_panel(models, scene):
    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLScene(scene)
    panel = SegmentPanelController(Parameters(), logic, ModelRegistry(models / "user", models / "shipped"))
    assert panel.refresh_models() is not None and panel.p.modelKey == "panel-test@1.0.0"
    return panel


def run(panel, timeout=120.0):
    """Poll as the widget's timer does, until the job has ended; the last PollResult."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = panel.poll()
        if result.finished:
            return result
        time.sleep(0.05)
    raise AssertionError("the segmentation did not end in time")


def make_cine(scene, logic, pair, name="cine"):
    """A cine as Slicer holds a loaded 4D file: a volume sequence, its browser and the proxy volume."""
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    scratch = slicer.vtkMRMLScene()
    for index, weight in enumerate(BLENDS):
        array = ((1 - weight) * pair.ed_image.array + weight * pair.es_image.array).astype(np.float32)
        sequence.SetDataNodeAtValue(volume_from_image(pair.ed_image.with_array(array), scratch, f"{name} {index}"), str(index * 40))
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{name} browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.SetSelectedItemNumber(0)
    logic.UpdateProxyNodesFromSequences(browser)
    return sequence, browser, browser.GetProxyNode(sequence)


def test_segment_a_volume_in_a_child_process_gives_the_predictors_labels_on_the_volumes_grid(models, pair, tmp_path):
    scene = slicer.vtkMRMLScene()
    panel = new_panel(models, scene)
    volume = volume_from_image(pair.ed_image, scene, "ED")
    assert not panel.state().segment  # nothing chosen yet
    panel.p.inputVolume = volume
    assert panel.state().segment and not panel.state().review
    panel.start(device="cpu", work_root=tmp_path)
    assert panel.state().busy and not panel.state().segment
    result = run(panel)
    assert result.error is None and result.added is not None, panel.p.statusText
    segmentation = panel.p.segmentation
    ids = [segmentation.GetSegmentation().GetNthSegmentID(i) for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
    assert ids == ["RV", "LV_Myocardium", "LV"]
    expected = Predictor(models / "user" / "panel-test-1.0.0", "cpu").predict(image_from_volume(volume))
    assert np.array_equal(labels_from_segmentation(segmentation, volume, CARDIAC_LABELS).array, expected.labels.array)
    assert panel.p.uncertaintyVolume is not None and "panel-test 1.0.0 on cpu" in panel.p.statusText
    state = panel.state()
    assert state.review and state.uncertainty and not state.busy and not state.measurements
    assert list(tmp_path.iterdir()) == []  # the hand-off folder is gone


def test_cine_proxy_segments_every_frame_and_an_edit_of_frame_2_survives_changing_frames(models, pair, tmp_path):
    scene = slicer.vtkMRMLScene()
    panel = new_panel(models, scene)
    sequence, browser, proxy = make_cine(scene, panel.sequences_logic, pair)
    panel.p.inputVolume = proxy
    panel.start(device="cpu", work_root=tmp_path)
    result = run(panel)
    assert result.error is None, panel.p.statusText
    cine = result.added.cine
    assert cine.browser is browser and cine.segmentation_sequence.GetNumberOfDataNodes() == len(BLENDS)
    assert browser.GetSaveChanges(cine.segmentation_sequence)
    assert panel.p.segmentation is browser.GetProxyNode(cine.segmentation_sequence)
    before = table_measurements(panel.p.measurementsTable)
    assert (before["ed_frame"], before["es_frame"]) == (cine.ed_index, cine.es_index)
    assert cine.report is not None and panel.report is cine.report  # the whole-heart report and its flags
    assert panel.state().quality.startswith("Quality control:")

    browser.SetSelectedItemNumber(2)  # edit frame 2 in the (proxy) segmentation: remove its LV
    segmentation, frame = panel.p.segmentation, browser.GetProxyNode(sequence)
    labels = labels_from_segmentation(segmentation, frame, CARDIAC_LABELS)
    assert np.count_nonzero(labels.array == 3) > 0
    replace_segments(segmentation, labels.with_array(np.where(labels.array == 3, 0, labels.array).astype(labels.array.dtype)), frame, ["LV"])
    browser.SetSelectedItemNumber(0)
    browser.SetSelectedItemNumber(2)
    again = labels_from_segmentation(browser.GetProxyNode(cine.segmentation_sequence), browser.GetProxyNode(sequence), CARDIAC_LABELS)
    assert np.count_nonzero(again.array == 3) == 0  # the edit is kept
    stored = labels_from_segmentation(cine.segmentation_sequence.GetNthDataNode(2), sequence.GetNthDataNode(2), CARDIAC_LABELS)
    assert np.count_nonzero(stored.array == 3) == 0

    after = panel.recompute_measurements()  # frame 2 now has no LV: it is the end-systolic frame
    assert after["es_frame"] == 2 and after["lv_esv_ml"] == 0.0 and after["lv_ef_percent"] == 100.0
    assert table_measurements(panel.p.measurementsTable)["es_frame"] == 2
    assert "lv_ef_percent_out_of_range" in panel.state().quality  # an EF of 100 % is flagged beside the table


def test_mark_ed_and_es_frames_of_a_cine_reviewed_makes_two_cases(models, pair, tmp_path):
    scene = slicer.vtkMRMLScene()
    panel = new_panel(models, scene)
    sequence, browser, proxy = make_cine(scene, panel.sequences_logic, pair, name="Patient 7 cine")
    panel.p.inputVolume = proxy
    panel.start(device="cpu", work_root=tmp_path)
    cine = run(panel).added.cine
    folder = tmp_path / "corrections"
    paths = []
    for frame in (cine.ed_index, cine.es_index):
        browser.SetSelectedItemNumber(frame)
        assert panel.existing_case(folder) is None
        paths.append(panel.mark_reviewed(folder, "dr test"))
    ids = sorted(case["case_id"] for case in read_manifest(folder))
    assert ids == sorted([f"Patient_7_cine_frame{cine.ed_index:02d}", f"Patient_7_cine_frame{cine.es_index:02d}"])
    assert paths[0] != paths[1]
    browser.SetSelectedItemNumber(cine.ed_index)
    assert panel.existing_case(folder) == paths[0]  # the widget asks before replacing


def test_a_segmentation_of_another_image_is_refused_and_a_pair_is_measured_and_recomputed(models, pair, tmp_path):
    scene = slicer.vtkMRMLScene()
    panel = new_panel(models, scene)
    ed, es = volume_from_image(pair.ed_image, scene, "ED"), volume_from_image(pair.es_image, scene, "ES")
    panel.p.inputVolume, panel.p.esVolume = ed, es
    panel.start(device="cpu", work_root=tmp_path)
    assert run(panel).error is None, panel.p.statusText
    assert panel.state().measurements and panel.state().recompute
    volume, segmentation, case_id = panel.review_pair()
    assert (volume, segmentation, case_id) == (ed, panel.p.segmentation, "ED")
    assert panel.review_pair(end_systole=True)[2] == "ES"
    panel.p.segmentation = panel.p.esSegmentation  # the ES labels picked for the ED image
    with pytest.raises(IdealError, match="was made on 'ES', not on 'ED'"):
        panel.mark_reviewed(tmp_path / "corrections", "dr test")
    assert not (tmp_path / "corrections").exists()

    panel.p.segmentation = _ed_segmentation(scene, ed)  # back to the ED image's own segmentation
    table = panel.p.measurementsTable
    first = table_measurements(table)
    es_labels = labels_from_segmentation(panel.p.esSegmentation, es, CARDIAC_LABELS)  # the clinician removes the ES LV
    replace_segments(panel.p.esSegmentation, es_labels.with_array(np.zeros_like(es_labels.array)), es, ["LV"])
    after = panel.recompute_measurements()
    assert panel.p.measurementsTable is table and after["lv_esv_ml"] == 0.0
    assert table_measurements(table)["lv_esv_ml"] == 0.0 and first["lv_edv_ml"] == after["lv_edv_ml"]
    # the QC flags beside the table follow the numbers: no ES blood pool at all is an implausible EF
    assert panel.report is not None and "lv_ef_percent_out_of_range" in panel.state().quality
    assert "QC flag" in panel.p.statusText


def test_flagged_slices_lead_the_slices_to_review_and_the_flags_are_shown(tmp_path):
    from IDEALTrain.evaluation.function import QualityFlag, measure_function

    panel = SegmentPanelController(Parameters(), None, ModelRegistry(tmp_path / "user", tmp_path / "shipped"))
    assert panel.state().quality == ""  # nothing measured yet
    labels = make_phantom_pair(5, size=(48, 40, 6), spacing=(1.5, 1.5, 8.0))
    report = measure_function([labels.ed_label, labels.es_label], ed=0, es=1)
    report.flags = [QualityFlag("slice_uncertainty_outlier", 6.0, 4.0, "the model is unsure on slice(s) 4: review them", slices=(4,))]
    panel.p.reviewSlices = [2, 4, 3]
    panel.p.measurementsTable = object()  # a table is shown
    panel._show_report(report)
    assert panel.p.reviewSlices == [4, 2, 3] and panel.p.reviewPosition == 0
    quality = panel.state().quality
    assert quality.startswith("Quality control: 1 flag(s)") and "unsure on slice(s) 4" in quality and "6 vs 4" in quality
    report.flags = []
    panel._show_report(report)
    assert panel.state().quality.startswith("Quality control: no flag raised")


def _ed_segmentation(scene, ed):
    """The segmentation node made on ``ed`` (its reference image geometry is ``ed``)."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        if node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is ed:
            return node
    raise AssertionError("no segmentation of the ED volume")


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_cancel_or_closing_the_scene_during_a_job_leaves_the_scene_as_it_was(models, pair, tmp_path, how):
    scene = slicer.vtkMRMLScene()
    panel = new_panel(models, scene)
    panel.p.inputVolume = volume_from_image(pair.ed_image, scene, "ED")
    before = node_ids(scene)
    panel.start(device="cpu", work_root=tmp_path)
    job = panel.job
    time.sleep(0.3)
    if how == "cancel":
        panel.cancel()
        result = run(panel, timeout=30)
        assert result.finished and result.error is None and "Cancelled" in panel.p.statusText
    else:
        panel.scene_closing()
        scene.Clear(False)
        assert panel.job is None and not panel.state().busy
        deadline = time.monotonic() + 30
        while panel.polling and time.monotonic() < deadline:
            assert not panel.poll().finished  # nothing to report: the job was forgotten
            time.sleep(0.05)
        assert not panel.polling
    assert job.state == "cancelled" and not job.chain.job.running
    assert list(tmp_path.iterdir()) == []
    if how == "cancel":
        assert node_ids(scene) == before and panel.p.segmentation is None


def test_a_failing_child_is_shown_as_an_error_and_adds_nothing(models, pair, tmp_path):
    scene = slicer.vtkMRMLScene()
    panel = new_panel(models, scene)
    panel.p.inputVolume = volume_from_image(pair.ed_image, scene, "ED")
    panel.p.esVolume = panel.p.inputVolume
    with pytest.raises(IdealError, match="same as the input volume"):
        panel.start(device="cpu")
    panel.p.esVolume = None
    before = node_ids(scene)
    panel.start(device="no-such-device", work_root=tmp_path)
    result = run(panel)
    assert result.finished and result.error and "Segmentation failed" in result.error
    assert node_ids(scene) == before and panel.p.statusText.startswith("Failed")
