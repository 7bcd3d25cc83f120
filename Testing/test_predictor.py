"""The predictor segments on exactly the input's grid and refuses what it cannot segment."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from helpers import oblique_image, tiny_bundle

from IDEALTrain.errors import IdealError
from IDEALTrain.inference.predictor import Predictor
from IDEALTrain.io.image import Image
from IDEALTrain.io.volume_files import read_image, write_image
from IDEALTrain.model.preprocessing import Preprocessing, SliceGrid


@pytest.fixture(scope="module")
def predictor():
    return Predictor(tiny_bundle(), device="cpu")


@pytest.mark.parametrize("shape,spacing", [((7, 40, 48), (1.37, 1.21, 8.5)), ((40, 48, 7), (8.5, 1.21, 1.37))])
def test_outputs_share_the_input_grid(predictor, shape, spacing):
    image = Image(oblique_image(shape).array, spacing, (-3.5, 12.0, 99.0), oblique_image().direction)
    prediction = predictor.predict(image)
    assert prediction.labels.same_grid(image, tolerance=0) and prediction.uncertainty.same_grid(image, tolerance=0)
    assert prediction.labels.array.dtype == np.uint8
    assert prediction.probabilities.shape == (4, *shape)
    np.testing.assert_allclose(prediction.probabilities.sum(axis=0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(prediction.labels.array, prediction.probabilities.argmax(axis=0))
    assert 0 <= prediction.uncertainty.array.min() and prediction.uncertainty.array.max() <= 1


def test_file_round_trip_keeps_grid(predictor, tmp_path):
    source = write_image(oblique_image(), tmp_path / "image.nrrd")
    image = read_image(source)
    labels = write_image(predictor.predict(image).labels, tmp_path / "labels.nii.gz")
    assert read_image(labels).same_grid(read_image(source), tolerance=1e-5)


def test_single_decoder_has_no_uncertainty():
    prediction = Predictor(tiny_bundle(decoders=("unet",)), device="cpu").predict(oblique_image())
    assert prediction.uncertainty is None


def test_progress_is_reported(predictor):
    seen = []
    predictor.predict(oblique_image(), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (7, 7) and len(seen) == 7


def test_an_exception_from_progress_stops_the_remaining_slices(predictor, monkeypatch):
    class Stop(Exception):
        pass

    started, released = [], threading.Event()
    infer = predictor._infer

    def slow_after_the_first(batch):
        started.append(1)
        if len(started) > 1:  # later slices wait until the run is stopped, then take a while
            released.wait(10)
            time.sleep(0.05)
        return infer(batch)

    def stop(done: int, total: int) -> None:
        released.set()
        raise Stop

    monkeypatch.setattr(predictor, "_infer", slow_after_the_first)
    volume = Image(np.random.default_rng(0).random((40, 32, 32)).astype(np.float32), spacing=(2.0, 2.0, 8.0))
    with pytest.raises(Stop):
        predictor.predict(volume, progress=stop)
    # Only the slices already running finish (Executor.map cancels the rest when its iterator is dropped),
    # so a cancelled segmentation stops within a slice or two, not after the whole volume.
    assert len(started) <= 4


@pytest.mark.parametrize(
    "array,message",
    [
        (np.full((5, 32, 32), 7.0, np.float32), "constant"),
        (np.where(np.eye(32, dtype=bool)[None].repeat(5, 0), np.nan, 1.0).astype(np.float32), "NaN"),
    ],
)
def test_unsegmentable_volumes_are_refused(predictor, array, message):
    with pytest.raises(IdealError, match=message):
        predictor.predict(Image(array))


def test_unavailable_cuda_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(IdealError, match="no CUDA"):
        Predictor(tiny_bundle(), device="cuda")
    with pytest.raises(IdealError, match="unknown device"):
        Predictor(tiny_bundle(), device="gpu0")


def test_slice_grid_maps_back_exactly():
    image = oblique_image((6, 50, 37))
    for plan in (Preprocessing(inplane="size", size=(64, 64)), Preprocessing(inplane="spacing", spacing=(2.0, 2.0))):
        grid = SliceGrid(image, plan, size_multiple=8)
        x = grid.image_to_network(image)
        assert x.shape[0] == 6 and all(n % 8 == 0 for n in x.shape[-2:])
        assert 0 <= float(x.min()) and float(x.max()) <= 1
        labels = image.with_array((np.arange(image.array.size).reshape(image.array.shape) % 4).astype(np.uint8))
        assert grid.labels_to_network(labels).shape == x.shape[:1] + x.shape[-2:]
        back = grid.network_to_volume(x.repeat(1, 2, 1, 1))
        assert back.shape == (2, 6, 50, 37)


def test_dicom_folder_prediction_keeps_the_series_grid(predictor, tmp_path):
    from IDEALTrain.io.dicom_write import write_dicom_series

    image = oblique_image().with_array(np.round(oblique_image().array).astype(np.int16))
    write_dicom_series(image, tmp_path / "series")
    dicom = read_image(tmp_path / "series")
    assert dicom.same_grid(image, tolerance=1e-4)
    labels = predictor.predict(dicom).labels
    assert labels.same_grid(dicom, tolerance=0)
    written = read_image(write_image(labels, tmp_path / "labels.seg.nrrd", predictor.bundle.labels))
    assert written.same_grid(image, tolerance=1e-4)
