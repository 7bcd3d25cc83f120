"""Metrics against analytic cases on anisotropic grids, medpy's definitions, and clinical values."""
from __future__ import annotations

import json

import numpy as np
import pytest

from IDEALTrain.errors import IdealError
from IDEALTrain.evaluation.metrics import (
    CLASS_NAMES,
    binary_metrics,
    cardiac_function,
    label_volume_ml,
    mean_scores,
    score,
    score_table,
)
from IDEALTrain.io.image import Image

SPACING = (1.5, 0.8, 5.0)  # (i, j, k) mm, deliberately anisotropic
SHAPE = (10, 40, 40)  # (k, j, i)


def _box(shift_k: int = 0, shift_i: int = 0) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[2 + shift_k : 8 + shift_k, 10:30, 5 + shift_i : 25 + shift_i] = True
    return mask


def _ball(radius_mm: float, spacing=SPACING, shape=SHAPE) -> np.ndarray:
    k, j, i = np.indices(shape, dtype=float)
    centre = [(n - 1) / 2 for n in shape]
    return ((i - centre[2]) * spacing[0]) ** 2 + ((j - centre[1]) * spacing[1]) ** 2 + (
        (k - centre[0]) * spacing[2]
    ) ** 2 <= radius_mm**2


@pytest.mark.parametrize("shift", [1, 3, 4])
def test_boxes_shifted_in_plane(shift):
    """20 voxels long along i, shifted by s: Dice (20 - s) / 20, Hausdorff s x 1.5 mm."""
    result = binary_metrics(_box(shift_i=shift), _box(), SPACING)
    assert result["dice"] == pytest.approx((20 - shift) / 20)
    assert result["hd"] == pytest.approx(shift * SPACING[0], abs=1e-4)
    assert 0 < result["asd"] <= result["hd95"] <= result["hd"] + 1e-6


def test_boxes_shifted_across_slices():
    """6 slices shifted by one slice: Dice 5/6 and Hausdorff one slice spacing (5 mm)."""
    result = binary_metrics(_box(shift_k=1), _box(), SPACING)
    assert result["dice"] == pytest.approx(5 / 6)
    assert result["hd"] == pytest.approx(SPACING[2], abs=1e-4)


def test_concentric_balls_distance_is_radius_difference():
    spacing, shape = (1.0, 1.0, 1.0), (50, 50, 50)
    result = binary_metrics(_ball(12.0, spacing, shape), _ball(18.0, spacing, shape), spacing)
    assert result["dice"] == pytest.approx(2 * 12**3 / (12**3 + 18**3), rel=0.05)
    for metric in ("hd", "hd95", "asd", "assd"):
        assert result[metric] == pytest.approx(6.0, abs=1.0)


def test_identical_masks():
    result = binary_metrics(_ball(12.0), _ball(12.0), SPACING)
    assert result == {"dice": 1.0, "hd95": 0.0, "asd": 0.0, "assd": 0.0, "hd": 0.0}


def test_empty_masks():
    empty = np.zeros(SHAPE, bool)
    assert binary_metrics(empty, empty, SPACING) == {"dice": 1.0, "hd95": 0.0, "asd": 0.0, "assd": 0.0, "hd": 0.0}
    for pred, ref in ((empty, _box()), (_box(), empty)):
        assert binary_metrics(pred, ref, SPACING) == {"dice": 0.0, "hd95": None, "asd": None, "assd": None, "hd": None}


def _medpy_distances(result, reference, spacing_kji):
    """medpy 0.4's __surface_distances, written out with scipy as an independent reference."""
    ndimage = pytest.importorskip("scipy.ndimage")
    cross = ndimage.generate_binary_structure(3, 1)
    result_border = result ^ ndimage.binary_erosion(result, structure=cross, iterations=1)
    reference_border = reference ^ ndimage.binary_erosion(reference, structure=cross, iterations=1)
    return ndimage.distance_transform_edt(~reference_border, sampling=spacing_kji)[result_border]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_medpy_definitions(seed):
    """Random blobs (some touching the volume border) on an anisotropic grid, as medpy computes them."""
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(seed)
    pred = ndimage.gaussian_filter(rng.random(SHAPE), 2.0) > 0.5
    ref = ndimage.gaussian_filter(rng.random(SHAPE), 2.0) > 0.5
    pred[0, :5] = True
    forward = _medpy_distances(pred, ref, SPACING[::-1])
    backward = _medpy_distances(ref, pred, SPACING[::-1])
    result = binary_metrics(pred, ref, SPACING)
    assert result["hd95"] == pytest.approx(np.percentile(np.hstack((forward, backward)), 95), abs=1e-4)
    assert result["asd"] == pytest.approx(forward.mean(), abs=1e-4)
    assert result["assd"] == pytest.approx((forward.mean() + backward.mean()) / 2, abs=1e-4)
    assert result["hd"] == pytest.approx(max(forward.max(), backward.max()), abs=1e-4)


def _labels(array: np.ndarray, spacing=SPACING) -> Image:
    return Image(array.astype(np.uint8), spacing, (10.0, -20.0, 30.0))


def test_score_per_class_mean_and_json():
    ref = np.zeros(SHAPE, np.uint8)
    ref[_box()] = 3
    ref[_box(shift_i=14) & ~_box()] = 1
    pred = ref.copy()
    pred[ref == 1] = 0  # RV missed entirely: distances undefined
    scores = score(_labels(pred), _labels(ref), CLASS_NAMES)
    assert scores["unit"] == "mm"
    assert scores["classes"]["LV"]["dice"] == 1.0 and scores["classes"]["LV"]["hd95"] == 0.0
    assert scores["classes"]["RV"] == {"dice": 0.0, "hd95": None, "asd": None, "assd": None, "hd": None, "applicable": True}
    assert scores["classes"]["LV_Myocardium"]["applicable"] is False  # absent from the reference: not applicable
    assert scores["classes"]["LV_Myocardium"]["dice"] is None
    assert scores["mean"]["dice"] == pytest.approx(1 / 2)
    assert scores["mean"]["hd95"] == 0.0  # mean of the two defined classes
    text = json.dumps(scores, allow_nan=False)
    assert "null" in text


def test_a_structure_absent_from_the_reference_is_not_applicable_never_zero():
    """Sunnybrook has no RV contours: a predicted RV must not count as Dice 0 in the score or in any mean."""
    ref = np.zeros(SHAPE, np.uint8)
    ref[_box()] = 3
    pred = ref.copy()
    pred[_box(shift_i=14) & ~_box()] = 1  # the model finds an RV the reference never drew
    scores = score(_labels(pred), _labels(ref), CLASS_NAMES)
    assert scores["classes"]["RV"] == {"dice": None, "hd95": None, "asd": None, "assd": None, "hd": None, "applicable": False}
    assert scores["mean"]["dice"] == 1.0  # the LV alone: RV and myocardium are not applicable
    averaged = mean_scores([scores, score(_labels(ref), _labels(ref), CLASS_NAMES)])
    assert averaged["classes"]["RV"]["dice"] is None and averaged["mean"]["dice"] == 1.0
    assert averaged["not_applicable"]["RV"] == 2 and averaged["undefined"]["RV"]["dice"] == 0
    table = score_table(averaged)
    assert "RV" in table and "n/a" in table and "not in the reference" in table


def test_unit_spacing_reports_voxels():
    ref = _box().astype(np.uint8) * 3
    scores = score(_labels(ref, (1.0, 1.0, 1.0)), _labels(ref, (1.0, 1.0, 1.0)))
    assert scores["unit"] == "voxel"


def test_mean_scores_skips_undefined_and_counts_them():
    ref = _box().astype(np.uint8) * 3
    shifted = _box(shift_i=3).astype(np.uint8) * 3
    good = score(_labels(shifted), _labels(ref), {3: "LV"})
    missed = score(_labels(np.zeros(SHAPE)), _labels(ref), {3: "LV"})
    averaged = mean_scores([good, missed])
    assert averaged["volumes"] == 2
    assert averaged["classes"]["LV"]["dice"] == pytest.approx(good["classes"]["LV"]["dice"] / 2)
    assert averaged["classes"]["LV"]["hd"] == pytest.approx(good["classes"]["LV"]["hd"])
    assert averaged["undefined"]["LV"] == {"dice": 0, "hd95": 1, "asd": 1, "assd": 1, "hd": 1}
    json.dumps(averaged, allow_nan=False)
    with pytest.raises(IdealError):
        mean_scores([])


def test_grid_mismatch_is_a_clear_error():
    ref = _labels(_box())
    moved = Image(ref.array, ref.spacing, (0.0, 0.0, 0.0))
    with pytest.raises(IdealError, match="resample"):
        score(moved, ref)
    with pytest.raises(IdealError, match="resample"):
        score(_labels(_box(), (1.5, 0.8, 6.0)), ref)


def test_volumes_ejection_fraction_and_mass():
    spacing = (1.25, 1.25, 8.0)  # 12.5 mm^3 per voxel
    ed, es = np.zeros((10, 100, 100), np.uint8), np.zeros((10, 100, 100), np.uint8)
    ed.reshape(-1)[:4000] = 3  # LV 50 ml
    ed.reshape(-1)[4000:7200] = 1  # RV 40 ml
    ed.reshape(-1)[7200:13200] = 2  # myocardium 75 ml
    es.reshape(-1)[:1600] = 3  # LV 20 ml
    es.reshape(-1)[1600:3600] = 1  # RV 25 ml
    ed_label, es_label = _labels(ed, spacing), _labels(es, spacing)
    assert label_volume_ml(ed_label, 3) == pytest.approx(50.0)
    function = cardiac_function(ed_label, es_label)
    assert function["lv_edv_ml"] == pytest.approx(50.0)
    assert function["lv_esv_ml"] == pytest.approx(20.0)
    assert function["lv_sv_ml"] == pytest.approx(30.0)
    assert function["lv_ef_percent"] == pytest.approx(60.0)
    assert function["rv_edv_ml"] == pytest.approx(40.0)
    assert function["rv_ef_percent"] == pytest.approx(37.5)
    assert function["myocardial_mass_g"] == pytest.approx(75.0 * 1.05)
    json.dumps(function, allow_nan=False)


def test_ejection_fraction_undefined_without_end_diastolic_volume():
    empty = _labels(np.zeros(SHAPE))
    function = cardiac_function(empty, empty)
    assert function["lv_ef_percent"] is None and function["rv_ef_percent"] is None
    assert function["lv_edv_ml"] == 0.0 and function["myocardial_mass_g"] == 0.0
