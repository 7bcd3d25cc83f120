"""Segmenting volume nodes on real MRML (slicer-core): voxel-exact labels, uncertainty, review, cancel."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import vtk
from helpers import import_slicer_core  # noqa: E402

slicer = import_slicer_core()

from helpers import oblique_image, varied_bundle  # noqa: E402
from IDEALSegmentLib.cancel import Cancelled, CancelToken  # noqa: E402
from IDEALSegmentLib.inference import (  # noqa: E402
    add_prediction_to_scene,
    load_predictor,
    predict_volume,
    segment_volume,
)
from IDEALSegmentLib.segmentations import MODEL_ID_ATTRIBUTE, MODEL_VERSION_ATTRIBUTE, labels_from_segmentation  # noqa: E402
from IDEALSegmentLib.uncertainty import (  # noqa: E402
    COLOR_NODE_ATTRIBUTE,
    SliceReview,
    review_order,
    slice_center_ras,
    uncertainty_volume,
)
from IDEALSegmentLib.volumes import array_to_matrix, image_from_volume, volume_from_image, volume_grid  # noqa: E402

from IDEALTrain.errors import IdealError  # noqa: E402
from IDEALTrain.inference.predictor import Predictor  # noqa: E402
from IDEALTrain.io.image import Image  # noqa: E402
from IDEALTrain.model.bundle import save_bundle  # noqa: E402


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    return save_bundle(varied_bundle(), tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def case():
    """A scene holding an oblique, anisotropic, non-zero-origin volume."""
    scene = slicer.vtkMRMLScene()
    image = oblique_image()
    return scene, volume_from_image(image, scene, "cine"), image


def node_ids(scene):
    return sorted(scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes()))


def test_segment_volume_labels_equal_the_predictor_voxel_for_voxel(case, bundle_path):
    scene, volume, image = case
    fractions = []
    result = segment_volume(volume, bundle_path, device="cpu", progress=fractions.append)
    expected = Predictor(bundle_path, device="cpu").predict(image)
    labels = labels_from_segmentation(result.segmentation, volume)
    assert np.array_equal(labels.array, expected.labels.array)
    assert len(np.unique(expected.labels.array)) == 4  # every class present: a geometry slip would show
    assert labels.same_grid(image, tolerance=1e-9)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and 0 < fractions[0] < 1
    assert result.segmentation.GetAttribute(MODEL_ID_ATTRIBUTE) == "tiny-test"
    assert result.segmentation.GetAttribute(MODEL_VERSION_ATTRIBUTE) == "0.0.1"
    assert (result.model_id, result.model_version, result.device) == ("tiny-test", "0.0.1", "cpu")
    assert len(result.review) == image.array.shape[image.slice_axis]
    summary = result.summary()
    assert "tiny-test 0.0.1" in summary and "slice(s) to review" in summary and "Left ventricle blood pool" in summary


def test_uncertainty_volume_keeps_geometry_transform_and_values(case, bundle_path):
    scene, volume, image = case
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = np.eye(4)
    matrix[:3, 3] = (5.0, -7.5, 12.25)
    matrix[:3, :3] = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])
    transform.SetMatrixTransformToParent(array_to_matrix(matrix))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    result = segment_volume(volume, bundle_path, device="cpu")
    node = result.uncertainty
    expected = load_predictor(bundle_path, "cpu").predict(image_from_volume(volume)).uncertainty
    assert node.GetTransformNodeID() == transform.GetID()
    read = image_from_volume(node)
    assert read.same_grid(volume_grid(volume), tolerance=1e-9)
    np.testing.assert_array_equal(read.array, np.clip(expected.array, 0, 1))  # resampling can give 1.0000001
    assert 0.0 <= read.array.min() and read.array.max() <= 1.0 and read.array.max() > 0.3
    display = node.GetDisplayNode()
    color = display.GetColorNode()
    assert color.GetAttribute(COLOR_NODE_ATTRIBUTE) == "uncertainty" and color.IsA("vtkMRMLProceduralColorNode")
    assert (display.GetWindow(), display.GetLevel(), display.GetAutoWindowLevel()) == (1.0, 0.5, 0)
    red_at_half = color.GetColorTransferFunction().GetColor(0.5)
    np.testing.assert_allclose(red_at_half, (1.0, 0.0, 0.0))
    again = segment_volume(volume, bundle_path, device="cpu")  # one colour node per scene, names unique
    assert again.uncertainty.GetDisplayNode().GetColorNodeID() == color.GetID()
    assert again.segmentation.GetName() == "cine segmentation_1"


def test_review_order_ranks_disagreement_first_along_the_slice_axis():
    shape = (4, 6, 5)  # slice axis 0: thick slices
    labels = np.zeros(shape, np.uint8)
    labels[:, 1:4, 1:4] = 3
    uncertainty = np.zeros(shape, np.float32)
    uncertainty[2, 1:4, 1:4] = 0.9  # slice 2: the whole heart uncertain
    uncertainty[0, 0, 0] = 0.5  # slice 0: one uncertain voxel outside the heart
    uncertainty[3, 1:4, 1:4] = 0.2  # slice 3: mildly uncertain heart, below the threshold
    grid = dict(spacing=(1.2, 1.2, 8.0), origin=(3.0, -4.0, 5.0))
    order = review_order(Image(uncertainty, **grid), Image(labels, **grid), threshold=0.3)
    assert [r.slice_index for r in order] == [2, 0, 3, 1]
    assert order[0] == SliceReview(2, pytest.approx(0.9), 9, 9)
    assert (order[1].uncertain_voxels, order[1].mean_uncertainty) == (1, 0.0)
    assert order[2].mean_uncertainty == pytest.approx(0.2) and order[2].uncertain_voxels == 0
    # The same data with the slices along i: ranked by the i slices.
    moved = dict(spacing=(8.0, 1.2, 1.2), origin=(3.0, -4.0, 5.0))
    along_i = review_order(Image(np.moveaxis(uncertainty, 0, 2).copy(), **moved), Image(np.moveaxis(labels, 0, 2).copy(), **moved))
    assert [r.slice_index for r in along_i] == [2, 0, 3, 1]
    with pytest.raises(IdealError, match="same voxel grid"):
        review_order(Image(uncertainty, **grid), Image(labels, **moved))


def test_slice_center_ras_is_the_world_centre_of_the_slice(case):
    scene, volume, image = case
    k = 4
    centre_ijk = np.array([(image.size[0] - 1) / 2, (image.size[1] - 1) / 2, k, 1.0])
    lps = image.index_to_physical @ centre_ijk
    np.testing.assert_allclose(slice_center_ras(volume, k), (-lps[0], -lps[1], lps[2]), atol=1e-9)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (10.0, 20.0, -30.0)
    transform.SetMatrixTransformToParent(array_to_matrix(shift))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(slice_center_ras(volume, k), (-lps[0] + 10, -lps[1] + 20, lps[2] - 30), atol=1e-9)
    with pytest.raises(IdealError, match="slices 0-6"):
        slice_center_ras(volume, 7)


def test_cancel_during_prediction_leaves_the_scene_unchanged(case, bundle_path):
    scene, volume, _ = case
    before = node_ids(scene)
    token = CancelToken()
    seen = []

    def progress(fraction):
        seen.append(fraction)
        token.cancel()  # the user presses Cancel after the first slice

    with pytest.raises(Cancelled, match="cancelled"):
        segment_volume(volume, bundle_path, device="cpu", progress=progress, cancel=token)
    assert len(seen) == 1
    assert node_ids(scene) == before
    with pytest.raises(Cancelled):  # cancelled before it starts: no slice is run
        segment_volume(volume, bundle_path, device="cpu", progress=seen.append, cancel=token)
    assert len(seen) == 1 and node_ids(scene) == before


def test_a_failure_while_adding_removes_every_node_added(case, bundle_path):
    scene, volume, image = case
    predictor = load_predictor(bundle_path, "cpu")
    prediction = predict_volume(image, predictor)
    prediction.uncertainty = prediction.uncertainty.with_array(prediction.uncertainty.array * 3)  # out of 0-1
    before = node_ids(scene)
    with pytest.raises(IdealError, match="0-1"):
        add_prediction_to_scene(volume, prediction, predictor.bundle)
    assert node_ids(scene) == before  # segmentation, its display node and the colour node are gone
    result = add_prediction_to_scene(volume, predict_volume(image, predictor), predictor.bundle, with_uncertainty=False)
    assert result.uncertainty is None and result.review == []
    before = node_ids(scene)
    other_grid = oblique_image((6, 40, 48))
    with pytest.raises(IdealError, match="not on the voxel grid"):
        uncertainty_volume(volume, other_grid.with_array(np.zeros((6, 40, 48), np.float32)))
    assert node_ids(scene) == before  # not even the colour node stays


def test_prediction_in_a_worker_thread_then_nodes_on_the_main_thread(case, bundle_path):
    scene, volume, image = case
    predictor = load_predictor(bundle_path, "cpu")
    assert load_predictor(bundle_path, "cpu") is predictor  # cached per path and device
    before = node_ids(scene)
    results = {}
    worker = threading.Thread(target=lambda: results.update(prediction=predict_volume(image_from_volume(volume), predictor)))
    worker.start()
    worker.join(60)
    assert node_ids(scene) == before  # predicting touched no scene
    result = add_prediction_to_scene(volume, results["prediction"], predictor.bundle, name="mine")
    assert result.segmentation.GetName() == "mine" and result.uncertainty.GetName() == "mine uncertainty"
    assert np.array_equal(labels_from_segmentation(result.segmentation, volume).array, results["prediction"].labels.array)


def _bad_inputs(scene, tmp_path):
    """(volume, model, expected message) for each kind of unusable input."""
    good = volume_from_image(oblique_image(), scene, "good")
    one_slice = volume_from_image(Image(np.random.default_rng(0).random((1, 40, 40)).astype(np.float32)), scene, "one slice")
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    data = vtk.vtkImageData()
    data.SetDimensions(8, 8, 3)
    data.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(data)
    labelmap = volume_from_image(Image(np.ones((3, 8, 8), np.uint8)), scene, "labels", labelmap=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "card.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"\0" * 16)
    outside = slicer.vtkMRMLScalarVolumeNode()  # never added to a scene
    outside.SetAndObserveImageData(vtk.vtkImageData())
    return [
        (None, "model", "no volume selected"),
        (one_slice, "model", "single 2D image"),
        (rgb, "model", "colour/vector"),
        (labelmap, "model", "labelmap"),
        (outside, "model", "no voxel data|not in a scene"),
        (good, tmp_path / "absent", "no such model bundle"),
        (good, broken, "not valid JSON"),
    ]


def test_bad_input_is_one_clear_message_and_the_scene_is_unchanged(bundle_path, tmp_path):
    scene = slicer.vtkMRMLScene()
    for volume, model, message in _bad_inputs(scene, tmp_path):
        before = node_ids(scene)
        with pytest.raises(IdealError, match=message):
            segment_volume(volume, bundle_path if model == "model" else model, device="cpu")
        assert node_ids(scene) == before, message


def test_a_bundle_changed_in_place_is_never_used_from_memory(tmp_path):
    """The predictor cache was keyed on the folder's time, which files rewritten in place do not change."""
    import os

    from IDEALTrain.model.card import WEIGHTS_NAME

    path = save_bundle(varied_bundle(), tmp_path / "model")
    first = load_predictor(path, "cpu")
    assert load_predictor(path, "cpu") is first
    folder_time = os.stat(path).st_mtime_ns
    other = save_bundle(varied_bundle(seed=3), tmp_path / "other")
    for name in ("card.json", WEIGHTS_NAME):
        (path / name).write_bytes((other / name).read_bytes())
    assert os.stat(path).st_mtime_ns == folder_time
    assert load_predictor(path, "cpu") is not first
    weights = path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(IdealError, match="checksum"):
        load_predictor(path, "cpu")
