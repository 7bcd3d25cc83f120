"""Cine (4D) segmentation on real MRML (slicer-core): a segmentation per frame, ED/ES, table, browser, cancel."""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from helpers import import_slicer_core, tiny_bundle  # noqa: E402

slicer = import_slicer_core()

from IDEALSegmentLib import cine as cine_module  # noqa: E402
from IDEALSegmentLib.cancel import Cancelled, CancelToken  # noqa: E402
from IDEALSegmentLib.cine import (  # noqa: E402
    add_sequence_to_scene,
    frame_images,
    is_cine,
    predict_sequence,
    segment_sequence,
    sequence_frames,
    sequence_from_images,
)
from IDEALSegmentLib.measurements import table_measurements  # noqa: E402
from IDEALSegmentLib.segmentations import labels_from_segmentation, read_provenance  # noqa: E402
from IDEALSegmentLib.volumes import image_from_volume, volume_from_image  # noqa: E402

from IDEALTrain.errors import IdealError  # noqa: E402
from IDEALTrain.evaluation.function import measure_function  # noqa: E402
from IDEALTrain.evaluation.metrics import label_volume_ml  # noqa: E402
from IDEALTrain.inference.predictor import Predictor  # noqa: E402
from IDEALTrain.io.phantom import make_phantom_pair  # noqa: E402
from IDEALTrain.labels import CARDIAC_LABELS  # noqa: E402

#: ED -> ES -> back, as intensity blends of the phantom's two phases (index values in ms).
BLENDS = (0.0, 0.4, 0.8, 1.0, 0.5)
TIMES = ("0", "45.5", "91", "136.5", "182")


def responsive_bundle():
    """A tiny untrained net whose labels follow the image (untrained, it predicts one class everywhere).

    Its classifiers are scaled up with zero bias so the features, not the biases, pick the class:
    the LV volume then differs between frames, which the ED/ES logic needs.
    """
    bundle = tiny_bundle(0)
    for key in list(bundle.weights):
        if key.endswith("classifier.bias"):
            bundle.weights[key] = torch.zeros_like(bundle.weights[key])
        elif key.endswith("classifier.weight"):
            bundle.weights[key] = bundle.weights[key] * 50.0
    return bundle


@pytest.fixture(scope="module")
def predictor():
    return Predictor(responsive_bundle(), "cpu")


@pytest.fixture(scope="module")
def pair():
    return make_phantom_pair(5, size=(48, 40, 6), spacing=(1.5, 1.5, 8.0))  # oblique, anisotropic, origin != 0


def make_cine(scene, pair, blends=BLENDS, times=TIMES, name="cine"):
    """A volume sequence in ``scene``, as Slicer holds a loaded 4D cine (frames live in the sequence).

    Built by hand rather than with sequence_from_images: these tests need time index values in ms.
    """
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", name)
    sequence.SetIndexName("time")
    sequence.SetIndexUnit("ms")
    scratch = slicer.vtkMRMLScene()
    for index, (weight, time) in enumerate(zip(blends, times)):
        array = ((1 - weight) * pair.ed_image.array + weight * pair.es_image.array).astype(np.float32)
        sequence.SetDataNodeAtValue(volume_from_image(pair.ed_image.with_array(array), scratch, f"{name} frame {index}"), time)
    return sequence


def node_ids(scene):
    return sorted(scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes()))


def test_every_frame_gets_a_segmentation_with_its_grid_and_index(predictor, pair):
    scene = slicer.vtkMRMLScene()
    sequence = make_cine(scene, pair)
    seen = []
    result = segment_sequence(sequence, predictor, progress=seen.append)
    segmentations = result.segmentation_sequence
    assert segmentations.GetScene() is scene and segmentations.GetName() == "cine segmentation"
    assert segmentations.GetDataNodeClassName() == "vtkMRMLSegmentationNode"
    assert segmentations.GetNumberOfDataNodes() == len(BLENDS)
    assert [segmentations.GetNthIndexValue(n) for n in range(len(BLENDS))] == list(TIMES)
    assert (segmentations.GetIndexName(), segmentations.GetIndexUnit()) == ("time", "ms")
    frames = sequence_frames(sequence)
    for index, frame in enumerate(frames):
        segmentation = segmentations.GetNthDataNode(index)
        assert segmentation.GetName() == f"cine frame {index} segmentation"
        assert list(segmentation.GetSegmentation().GetSegmentIDs()) == [label.segment_id for label in CARDIAC_LABELS]
        assert read_provenance(segmentation).model_id == "tiny-test"
        assert read_provenance(segmentation).model_version == "0.0.1"
        image = image_from_volume(frame)
        back = labels_from_segmentation(segmentation, frame)
        assert back.same_grid(image, tolerance=1e-9)
        assert np.array_equal(back.array, predictor.predict(image).labels.array)  # voxel-exact, frame by frame
        assert result.frame_labels_ml[index] == {
            label.segment_id: pytest.approx(label_volume_ml(back, label.value)) for label in CARDIAC_LABELS
        }
    assert read_provenance(segmentations).model_id == "tiny-test"
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > len(BLENDS)


def test_ed_es_and_the_measurements_table(predictor, pair):
    scene = slicer.vtkMRMLScene()
    sequence = make_cine(scene, pair)
    result = segment_sequence(sequence, predictor)
    lv = [frame["LV"] for frame in result.frame_labels_ml]
    assert len(set(lv)) > 1  # the responsive net really does vary between frames
    frames = sequence_frames(sequence)
    labels = [labels_from_segmentation(result.segmentation_sequence.GetNthDataNode(n), frames[n]) for n in range(len(frames))]
    report = measure_function(labels)  # IDEALTrain's whole-heart function: one definition
    assert (result.ed_index, result.es_index) == (report.measurements["ed_frame"], report.measurements["es_frame"])
    assert result.report is not None and result.report.measurements == pytest.approx(report.measurements)
    expected = dict(report.measurements)
    assert result.measurements == pytest.approx(expected)
    assert result.table.GetScene() is scene and result.table.GetName() == "cine measurements"
    assert table_measurements(result.table) == pytest.approx(expected)
    units = [result.table.GetTable().GetValue(row, 2).ToString() for row in range(result.table.GetTable().GetNumberOfRows())]
    assert units == ["ml", "ml", "ml", "%", "ml", "ml", "ml", "%", "g", "frame index", "frame index"]


def test_a_new_browser_synchronises_cine_and_segmentations(predictor, pair):
    scene = slicer.vtkMRMLScene()
    sequence = make_cine(scene, pair)
    result = segment_sequence(sequence, predictor)
    browser = result.browser
    assert browser is not None and browser.GetName() == "cine browser"
    assert browser.GetMasterSequenceNode() is sequence
    assert browser.IsSynchronizedSequenceNodeID(result.segmentation_sequence.GetID(), False)
    volume_proxy, segmentation_proxy = browser.GetProxyNode(sequence), browser.GetProxyNode(result.segmentation_sequence)
    assert volume_proxy.GetScene() is scene and segmentation_proxy.IsA("vtkMRMLSegmentationNode")
    first = labels_from_segmentation(result.segmentation_sequence.GetNthDataNode(0), sequence_frames(sequence)[0])
    assert np.array_equal(labels_from_segmentation(segmentation_proxy, volume_proxy).array, first.array)


def test_the_cines_own_browser_is_reused(predictor, pair):
    scene = slicer.vtkMRMLScene()
    sequence = make_cine(scene, pair)
    own = add_browser(scene, sequence, selected=2)
    result = segment_sequence(sequence, predictor)
    assert result.browser is own and own.GetSelectedItemNumber() == 2
    assert scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode") == 1
    assert own.IsSynchronizedSequenceNodeID(result.segmentation_sequence.GetID(), False)
    volume_proxy, segmentation_proxy = own.GetProxyNode(sequence), own.GetProxyNode(result.segmentation_sequence)
    shown = labels_from_segmentation(result.segmentation_sequence.GetNthDataNode(2), sequence_frames(sequence)[2])
    assert np.array_equal(labels_from_segmentation(segmentation_proxy, volume_proxy).array, shown.array)


@pytest.mark.parametrize("when", ["before", "after the first frame"])
def test_cancel_leaves_the_scene_unchanged(predictor, pair, when):
    scene = slicer.vtkMRMLScene()
    sequence = make_cine(scene, pair)
    before = node_ids(scene)
    token = CancelToken()
    if when == "before":
        token.cancel()
    seen = []

    def progress(fraction):
        seen.append(fraction)
        if fraction >= 0.95 / len(BLENDS):  # the first frame is done
            token.cancel()

    with pytest.raises(Cancelled, match="segmenting the cine was cancelled"):
        segment_sequence(sequence, predictor, progress=progress, cancel=token)
    assert node_ids(scene) == before
    assert sequence.GetNumberOfDataNodes() == len(BLENDS)
    if when != "before":
        assert max(seen) < 2 * 0.95 / len(BLENDS)  # stopped after one frame, not at the end


def add_browser(scene, sequence, selected=0):
    """A browser showing the cine, as after loading a 4D file in Slicer and browsing to ``selected``."""
    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLScene(scene)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "loaded cine browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.SetSelectedItemNumber(selected)
    logic.UpdateProxyNodesFromSequences(browser)
    logic.SetMRMLScene(None)
    return browser


@pytest.mark.parametrize("with_browser", [False, True])
@pytest.mark.parametrize("call", ["segment_sequence", "add_sequence_to_scene"])
def test_a_failure_after_adding_nodes_removes_them(predictor, pair, monkeypatch, with_browser, call):
    scene = slicer.vtkMRMLScene()
    sequence = make_cine(scene, pair)
    browser = add_browser(scene, sequence) if with_browser else None
    predictions = predict_sequence(frame_images(sequence), predictor)
    before = node_ids(scene)

    def broken_table(*args, **kwargs):
        raise IdealError("disk full")

    monkeypatch.setattr(cine_module, "measurements_table", broken_table)
    with pytest.raises(IdealError, match="disk full"):
        if call == "segment_sequence":
            segment_sequence(sequence, predictor)
        else:
            add_sequence_to_scene(sequence, predictions, predictor.bundle)
    assert node_ids(scene) == before
    if browser is not None:
        assert browser.GetNumberOfSynchronizedSequenceNodes() == 0  # only the master, as before


def test_predictions_that_no_longer_fit_the_cine_are_refused(predictor, pair):
    """The scene may change while the worker predicts: stale predictions add nothing."""
    scene = slicer.vtkMRMLScene()
    sequence = make_cine(scene, pair)
    predictions = predict_sequence(frame_images(sequence), predictor)
    shorter = make_cine(scene, pair, blends=BLENDS[:3], times=TIMES[:3], name="shorter")
    moved = make_cine(scene, pair, name="moved")
    moved.GetNthDataNode(2).SetOrigin(1.0, 2.0, 3.0)
    before = node_ids(scene)
    with pytest.raises(IdealError, match="'shorter' has 3 frames but 5 were segmented"):
        add_sequence_to_scene(shorter, predictions, predictor.bundle)
    with pytest.raises(IdealError, match="frame 2 of sequence 'moved' is not on the grid it was segmented on"):
        add_sequence_to_scene(moved, predictions, predictor.bundle)
    assert node_ids(scene) == before
    scene.RemoveNode(sequence)
    before = node_ids(scene)
    with pytest.raises(IdealError, match="'cine' is not in a scene"):
        add_sequence_to_scene(sequence, predictions, predictor.bundle)
    assert node_ids(scene) == before


def test_degenerate_cines_are_refused_with_the_scene_unchanged(pair):
    scene = slicer.vtkMRMLScene()
    one_frame = make_cine(scene, pair, blends=(0.0,), times=("0",), name="single")
    cine = make_cine(scene, pair)
    before = node_ids(scene)
    # Untrained tiny nets predict one class everywhere: seed 1 only RV, seed 2 only LV.
    with pytest.raises(IdealError, match="only one frame"):
        segment_sequence(one_frame, Predictor(tiny_bundle(1), "cpu"))
    with pytest.raises(IdealError, match="no LV blood pool was found in any of the 5 frames"):
        segment_sequence(cine, Predictor(tiny_bundle(1), "cpu"))
    with pytest.raises(IdealError, match="in every frame: end-diastole and end-systole cannot be told apart"):
        segment_sequence(cine, Predictor(tiny_bundle(2), "cpu"))
    assert node_ids(scene) == before


def test_what_counts_as_a_cine(pair):
    scene = slicer.vtkMRMLScene()
    cine = make_cine(scene, pair, blends=(0.0, 1.0), times=("0", "1"))
    volume = volume_from_image(pair.ed_image, scene, "volume")
    empty = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "empty")
    assert is_cine(cine) and not is_cine(volume) and not is_cine(empty) and not is_cine(None)
    assert [frame.GetName() for frame in sequence_frames(cine)] == ["cine frame 0", "cine frame 1"]
    with pytest.raises(IdealError, match="is not a sequence node"):
        sequence_frames(volume)
    with pytest.raises(IdealError, match="'empty' has no frames"):
        sequence_frames(empty)
    labelmaps = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "labelmaps")
    labelmaps.SetDataNodeAtValue(volume_from_image(pair.ed_label, slicer.vtkMRMLScene(), "l", labelmap=True), "0")
    assert not is_cine(labelmaps)
    with pytest.raises(IdealError, match="frame 0 of sequence 'labelmaps'.*labelmap"):
        sequence_frames(labelmaps)


def run_in_worker(work):
    """Run ``work()`` in a worker thread, as the module's widget does; (result, error)."""
    outcome = {}

    def target():
        try:
            outcome["result"] = work()
        except BaseException as error:  # handed back to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name="cine test worker")
    thread.start()
    thread.join(60)
    assert not thread.is_alive()
    return outcome.get("result"), outcome.get("error")


def watch_scene(scene):
    """Every node added to or removed from ``scene`` (from any thread), as a list that grows."""
    events = []
    for event in (slicer.vtkMRMLScene.NodeAddedEvent, slicer.vtkMRMLScene.NodeRemovedEvent):
        scene.AddObserver(event, lambda caller, name: events.append(name))
    return events


def test_predict_in_a_worker_then_add_equals_segment_sequence(predictor, pair):
    scene = slicer.vtkMRMLScene()
    sequence = make_cine(scene, pair)
    add_browser(scene, sequence, selected=1)
    images = frame_images(sequence)  # main thread
    frames = sequence_frames(sequence)
    assert len(images) == len(BLENDS)
    for image, frame in zip(images, frames):
        expected = image_from_volume(frame)
        assert image.same_grid(expected, tolerance=0) and np.array_equal(image.array, expected.array)
    before, events = node_ids(scene), watch_scene(scene)
    seen = []
    predictions, error = run_in_worker(lambda: predict_sequence(images, predictor, seen.append, CancelToken()))
    assert error is None
    assert node_ids(scene) == before and events == []  # the worker added, removed and changed no node
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > len(BLENDS)
    assert len(predictions) == len(BLENDS)
    for image, prediction in zip(images, predictions):
        assert prediction.labels.same_grid(image, tolerance=0) and prediction.device == "cpu"
        assert np.array_equal(prediction.labels.array, predictor.predict(image).labels.array)
        assert prediction.probabilities.size == 0  # one label map kept per frame, and its uncertainty in half precision (QC flags)
        assert prediction.uncertainty is not None and prediction.uncertainty.array.dtype == np.float16

    split = add_sequence_to_scene(sequence, predictions, predictor.bundle)  # main thread
    assert events  # now the nodes are added
    other = slicer.vtkMRMLScene()
    other_sequence = make_cine(other, pair)
    add_browser(other, other_sequence, selected=1)
    whole = segment_sequence(other_sequence, predictor)
    assert (split.ed_index, split.es_index) == (whole.ed_index, whole.es_index)
    assert split.frame_labels_ml == whole.frame_labels_ml
    assert split.measurements == whole.measurements
    assert table_measurements(split.table) == table_measurements(whole.table) == pytest.approx(split.measurements)
    assert split.segmentation_sequence.GetName() == whole.segmentation_sequence.GetName() == "cine segmentation"
    assert split.browser.GetName() == whole.browser.GetName() == "loaded cine browser"  # the cine's own
    assert split.browser.GetSelectedItemNumber() == 1
    for index in range(len(BLENDS)):
        split_labels = labels_from_segmentation(split.segmentation_sequence.GetNthDataNode(index), frames[index])
        whole_labels = labels_from_segmentation(whole.segmentation_sequence.GetNthDataNode(index), sequence_frames(other_sequence)[index])
        assert np.array_equal(split_labels.array, predictions[index].labels.array)
        assert np.array_equal(split_labels.array, whole_labels.array)
        assert read_provenance(split.segmentation_sequence.GetNthDataNode(index)).model_id == "tiny-test"


def test_cancel_within_a_frame_in_the_worker_leaves_the_scene_unchanged(predictor, pair):
    scene = slicer.vtkMRMLScene()
    sequence = make_cine(scene, pair)
    images = frame_images(sequence)
    before, events = node_ids(scene), watch_scene(scene)
    token = CancelToken()
    seen = []

    def progress(fraction):
        seen.append(fraction)
        if fraction > 2 / len(BLENDS):  # a slice batch of the third frame is done
            token.cancel()

    small_batches = Predictor(responsive_bundle(), "cpu", batch_size=2)  # several batches per 6-slice frame
    _, error = run_in_worker(lambda: predict_sequence(images, small_batches, progress, token))
    assert isinstance(error, Cancelled) and "segmenting the cine was cancelled" in str(error)
    assert 2 / len(BLENDS) < seen[-1] < 3 / len(BLENDS)  # stopped inside the third frame, at once
    assert node_ids(scene) == before and events == []
    assert sequence.GetNumberOfDataNodes() == len(BLENDS)


def blended_images(pair, blends=BLENDS):
    return [pair.ed_image.with_array(((1 - w) * pair.ed_image.array + w * pair.es_image.array).astype(np.float32)) for w in blends]


def test_sequence_from_images_makes_a_cine_with_each_frames_exact_geometry(predictor, pair):
    scene = slicer.vtkMRMLScene()
    volume_from_image(pair.ed_image, scene, "heart")  # the name is taken: the sequence gets a unique one
    before = node_ids(scene)
    images = blended_images(pair)
    sequence = sequence_from_images(scene, images, "heart")
    assert is_cine(sequence) and sequence.GetScene() is scene and sequence.GetName() == "heart_1"
    assert len(node_ids(scene)) == len(before) + 1  # only the sequence: its frames live inside it
    assert (sequence.GetIndexName(), sequence.GetIndexUnit(), sequence.GetIndexTypeAsString()) == ("frame", "", "numeric")
    assert [sequence.GetNthIndexValue(n) for n in range(len(BLENDS))] == [str(n) for n in range(len(BLENDS))]
    assert [frame.GetName() for frame in sequence_frames(sequence)] == [f"heart_1 frame {n}" for n in range(len(BLENDS))]
    for image, frame in zip(images, frame_images(sequence)):
        assert frame.same_grid(image, tolerance=1e-12) and np.array_equal(frame.array, image.array)
    result = segment_sequence(sequence, predictor)
    for index, image in enumerate(images):
        segmented = labels_from_segmentation(result.segmentation_sequence.GetNthDataNode(index), sequence_frames(sequence)[index])
        assert np.array_equal(segmented.array, predictor.predict(image).labels.array)
    timed = sequence_from_images(scene, images[:2], "timed", index_name="time", index_unit="ms")
    assert (timed.GetName(), timed.GetIndexName(), timed.GetIndexUnit(), timed.GetNumberOfDataNodes()) == ("timed", "time", "ms", 2)


def test_sequence_from_images_refuses_bad_frames_with_the_scene_unchanged(pair):
    scene = slicer.vtkMRMLScene()
    make_cine(scene, pair)
    before = node_ids(scene)
    images = blended_images(pair, (0.0, 0.5, 1.0))
    moved = dataclasses.replace(images[2], origin=tuple(o + 1.0 for o in images[2].origin))
    with pytest.raises(IdealError, match="cine 'heart' has no frames"):
        sequence_from_images(scene, [], "heart")
    with pytest.raises(IdealError, match="frame 2 of cine 'heart' is not on frame 0's voxel grid"):
        sequence_from_images(scene, images[:2] + [moved], "heart")
    with pytest.raises(IdealError, match="frame 1 of cine 'heart' is not on frame 0's voxel grid"):
        sequence_from_images(scene, [images[0], dataclasses.replace(images[1], array=images[1].array[:3])], "heart")
    assert node_ids(scene) == before
