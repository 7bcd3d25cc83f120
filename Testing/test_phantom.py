"""The phantom generator: determinism, anatomy, geometry, systole and the written data set."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from IDEALTrain.evaluation.metrics import cardiac_function, label_volume_ml
from IDEALTrain.io.image import Image
from IDEALTrain.io.phantom import case_seed, make_phantom, make_phantom_pair, write_phantom_dataset

SEEDS = range(6)


@pytest.fixture(scope="module")
def pairs():
    return {seed: make_phantom_pair(seed) for seed in SEEDS}


def test_same_seed_same_phantom_and_different_seed_differs():
    image, label = make_phantom(7)
    again_image, again_label = make_phantom(7)
    assert np.array_equal(image.array, again_image.array) and np.array_equal(label.array, again_label.array)
    assert image.same_grid(again_image, tolerance=0.0)
    other, _ = make_phantom(8)
    assert not (image.same_grid(other) and np.array_equal(image.array, other.array))


def test_make_phantom_is_the_end_diastolic_frame(pairs):
    image, label = make_phantom(0)
    assert np.array_equal(image.array, pairs[0].ed_image.array)
    assert np.array_equal(label.array, pairs[0].ed_label.array)


def test_types_and_labels(pairs):
    for pair in pairs.values():
        assert pair.ed_image.array.dtype == np.float32 and pair.ed_label.array.dtype == np.uint8
        assert set(np.unique(pair.ed_label.array)) == {0, 1, 2, 3}
        assert set(np.unique(pair.es_label.array)) <= {0, 1, 2, 3}
        assert np.isfinite(pair.ed_image.array).all() and pair.ed_image.array.min() >= 0


def _in_plane_neighbours(label: np.ndarray, value: int) -> set[int]:
    """Labels 4-adjacent (within a slice) to voxels of ``value``."""
    mask = label == value
    padded = np.pad(label, ((0, 0), (1, 1), (1, 1)), constant_values=0)
    found = set()
    for dj, di in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        shifted = padded[:, 1 + dj : padded.shape[1] - 1 + dj, 1 + di : padded.shape[2] - 1 + di]
        found |= set(np.unique(shifted[mask]).tolist())
    return found


def test_myocardium_surrounds_the_blood_pool(pairs):
    for pair in pairs.values():
        for label in (pair.ed_label, pair.es_label):
            assert _in_plane_neighbours(label.array, 3) <= {2, 3}


def test_blood_brighter_than_myocardium(pairs):
    for pair in pairs.values():
        image, label = pair.ed_image.array, pair.ed_label.array
        assert np.median(image[label == 3]) > 1.5 * np.median(image[label == 2])


def test_geometry(pairs):
    for pair in pairs.values():
        image = pair.ed_image
        ni, nj, nk = image.size
        assert 128 <= ni <= 192 and 128 <= nj <= 192 and 8 <= nk <= 12
        assert all(1.15 <= s <= 1.65 for s in image.spacing[:2]) and 6.0 <= image.spacing[2] <= 10.0
        assert np.allclose(image.direction.T @ image.direction, np.eye(3), atol=1e-9)
        assert np.linalg.det(image.direction) == pytest.approx(1.0)
        assert np.abs(image.direction).max() < 0.999  # oblique, not axis-aligned
        assert np.linalg.norm(image.origin) > 1.0
        assert pair.es_image.same_grid(image, tolerance=0.0)


def test_anatomy_is_physical_not_tied_to_spacing():
    """The same seed on a finer and a coarser in-plane grid over the same field of view."""
    fine = make_phantom(3, size=(200, 200, 10), spacing=(1.2, 1.2, 8.0))[1]
    coarse = make_phantom(3, size=(150, 150, 10), spacing=(1.6, 1.6, 8.0))[1]
    for value in (1, 2, 3):
        assert label_volume_ml(coarse, value) == pytest.approx(label_volume_ml(fine, value), rel=0.05)


def test_systole(pairs):
    for pair in pairs.values():
        function = cardiac_function(pair.ed_label, pair.es_label)
        assert function["lv_esv_ml"] < function["lv_edv_ml"]
        assert 40.0 <= function["lv_ef_percent"] <= 72.0
        assert 30.0 <= function["rv_ef_percent"] <= 80.0
        ed_myo, es_myo = label_volume_ml(pair.ed_label, 2), label_volume_ml(pair.es_label, 2)
        assert es_myo == pytest.approx(ed_myo, rel=0.2)


def _read(path) -> Image:
    return Image.from_sitk(sitk.ReadImage(str(path)))


def test_write_dataset_with_pairs(tmp_path):
    paths = write_phantom_dataset(tmp_path, cases=2, seed=11, pairs=True)
    assert [p.name for p in paths] == [
        "phantom_0000_ED.nii.gz", "phantom_0000_ES.nii.gz", "phantom_0001_ED.nii.gz", "phantom_0001_ES.nii.gz"
    ]
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == [p.name for p in paths]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [p.name for p in paths]  # no temp files
    expected = make_phantom_pair(case_seed(11, 1))
    image, label = _read(paths[3]), _read(tmp_path / "labels" / paths[3].name)
    assert image.same_grid(expected.es_image) and label.same_grid(expected.es_image)
    assert np.array_equal(image.array, expected.es_image.array)
    assert np.array_equal(label.array, expected.es_label.array) and label.array.dtype == np.uint8


def test_write_dataset_single_frames(tmp_path):
    paths = write_phantom_dataset(tmp_path / "out", cases=2, seed=5)
    assert [p.name for p in paths] == ["phantom_0000.nii.gz", "phantom_0001.nii.gz"]
    image = _read(paths[0])
    expected_image, expected_label = make_phantom(case_seed(5, 0))
    assert image.same_grid(expected_image) and np.array_equal(image.array, expected_image.array)
    assert np.array_equal(_read(tmp_path / "out" / "labels" / paths[0].name).array, expected_label.array)
    assert case_seed(5, 0) != case_seed(5, 1) and case_seed(5, 0) != case_seed(6, 0)
