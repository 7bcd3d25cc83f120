"""SSL4MIS h5 files: exact round trip with geometry, and the real ACDC split when present."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from IDEALTrain.errors import IdealError
from IDEALTrain.io.image import Image
from IDEALTrain.io.ssl4mis import list_cases, read_case, read_list, read_ssl4mis, write_ssl4mis_volume


def test_round_trip_keeps_geometry_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    direction = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    image = Image(rng.random((4, 8, 6)).astype(np.float32), (0.9, 1.1, 7.5), (-3.25, 10.5, 99.0), direction)
    label = image.with_array(rng.integers(0, 4, image.array.shape).astype(np.uint8))
    path = tmp_path / "case.h5"
    write_ssl4mis_volume(path, image, label)
    assert [p.name for p in tmp_path.iterdir()] == ["case.h5"]  # no temporary file left behind
    got_image, got_label = read_ssl4mis(path)
    assert got_image.spacing == image.spacing and got_image.origin == image.origin
    assert np.array_equal(got_image.direction, image.direction)
    assert got_image.array.dtype == np.float32 and np.array_equal(got_image.array, image.array)
    assert got_label is not None and got_label.same_grid(image)
    assert got_label.array.dtype == np.uint8 and np.array_equal(got_label.array, label.array)


def test_volume_without_label(tmp_path: Path) -> None:
    image = Image(np.ones((2, 3, 4)))
    write_ssl4mis_volume(tmp_path / "x.h5", image)
    got, label = read_ssl4mis(tmp_path / "x.h5")
    assert label is None and got.same_grid(image)


def test_label_must_share_the_grid(tmp_path: Path) -> None:
    image = Image(np.ones((2, 3, 4)))
    moved = Image(np.ones((2, 3, 4), np.uint8), origin=(1.0, 0.0, 0.0))
    with pytest.raises(IdealError, match="share one voxel grid"):
        write_ssl4mis_volume(tmp_path / "x.h5", image, moved)


def test_plain_ssl4mis_files_read_in_voxel_units(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "slice.h5", "w") as h5:
        h5["image"] = np.zeros((5, 6), np.float32)
        h5["label"] = np.ones((5, 6), np.uint8)
    image, label = read_ssl4mis(tmp_path / "slice.h5")
    assert image.array.shape == (1, 5, 6) and label is not None and label.array.shape == (1, 5, 6)
    assert image.spacing == (1.0, 1.0, 1.0) and image.origin == (0.0, 0.0, 0.0)
    assert np.array_equal(image.direction, np.eye(3))


def test_missing_files_and_lists(tmp_path: Path) -> None:
    with pytest.raises(IdealError, match="not found"):
        read_ssl4mis(tmp_path / "nothing.h5")
    with pytest.raises(IdealError, match="list not found"):
        read_list(tmp_path, "val")


def test_real_acdc_lists(acdc_dir: Path) -> None:
    slices = list_cases(acdc_dir, "train_slices")
    assert len(slices) == 1312 and all(c.is_slice for c in slices)
    assert slices[0].path == acdc_dir / "data" / "slices" / f"{slices[0].name}.h5"
    val = list_cases(acdc_dir, "val.list")
    assert len(val) == 20 and not any(c.is_slice for c in val)
    assert all(c.path.is_file() for c in val)
    assert read_list(acdc_dir, "train") == [c.name for c in list_cases(acdc_dir, "train")]


def test_real_acdc_volume_and_slice(acdc_dir: Path) -> None:
    image, label = read_case(list_cases(acdc_dir, "val")[0])
    assert image.array.ndim == 3 and image.array.shape[0] < image.array.shape[1]
    assert label is not None and label.same_grid(image)
    assert set(np.unique(label.array)) <= {0, 1, 2, 3}
    assert 0.0 <= image.array.min() and image.array.max() <= 1.0
    case = list_cases(acdc_dir, "train_slices")[0]
    image, label = read_case(case)
    with h5py.File(case.path, "r") as h5:
        height, width = h5["image"].shape  # native in-plane size (not always 256 x 256)
    assert image.array.shape == (1, height, width)
    assert label is not None and set(np.unique(label.array)) <= {0, 1, 2, 3}
