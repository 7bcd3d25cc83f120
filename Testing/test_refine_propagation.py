"""Click propagation to neighbouring slices: one click fixes an error that spans slices, only where it is the same."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import oblique_image, tiny_refinement_bundle, varied_bundle

from IDEALTrain.errors import IdealError
from IDEALTrain.inference import refine_propagation as propagation
from IDEALTrain.inference.clicks import Click
from IDEALTrain.inference.refine import Refiner
from IDEALTrain.inference.refine_engines import SliceClick, honour_clicks
from IDEALTrain.io.image import Image
from IDEALTrain.model.bundle import save_bundle

SLICES = 5
ROWS, COLS = np.mgrid[:64, :64]
DISK = (ROWS - 30) ** 2 + (COLS - 34) ** 2 <= 8**2  # 10 mm radius at 1.25 mm
ELSEWHERE = (ROWS - 8) ** 2 + (COLS - 8) ** 2 <= 6**2  # > 20 mm from the disk: out of a click's reach


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    return save_bundle(varied_bundle(), tmp_path_factory.mktemp("bundle") / "tiny")


def phantom(disk_slices=(1, 2, 3), disk_values=None):
    """Bright disk (800) on ``disk_slices`` the network half-sees (p 0.3), a bright spot elsewhere on every slice
    (keeps the per-slice intensity scaling alike); an empty draft: the disk is a missed region spanning slices."""
    rng = np.random.default_rng(1)
    disk_values = disk_values or {}
    array = np.full((SLICES, 64, 64), 200.0) + rng.normal(0, 15, (SLICES, 64, 64))
    probabilities = np.full((4, SLICES, 64, 64), 0.02, np.float32)
    probabilities[0] = 0.94
    for k in range(SLICES):
        array[k][ELSEWHERE] += 600.0
        if k in disk_slices:
            array[k][DISK] += disk_values.get(k, 800.0) - 200.0
            probabilities[3, k][DISK] = 0.3
    image = Image(array.astype(np.float32), spacing=(1.25, 1.25, 8.0))
    return image, probabilities


def point_of(image: Image, k: int, j: int, i: int) -> tuple[float, float, float]:
    return tuple(float(v) for v in (image.index_to_physical @ np.array([i, j, k, 1.0]))[:3])


def refined(bundle_path, image, probabilities, draft, clicks, propagate_slices=1):
    refiner = Refiner(bundle_path, device="cpu", propagate_slices=propagate_slices)
    refiner.set_prior(image, probabilities)
    return refiner.refine(image, image.with_array(draft), clicks).labels.array


def dice(found: np.ndarray, truth: np.ndarray) -> float:
    return 2 * (found & truth).sum() / (found.sum() + truth.sum())


def test_one_click_fixes_an_error_spanning_three_slices(bundle_path):
    image, probabilities = phantom()
    draft = np.zeros(image.array.shape, np.uint8)
    click = [Click(point_of(image, 2, 30, 34), 3, True)]
    result = refined(bundle_path, image, probabilities, draft, click)
    for k in (1, 2, 3):
        assert dice(result[k] == 3, DISK) > 0.85, k
    assert not result[[0, 4]].any()  # no disk there: the intensity at the click differs
    only_own = refined(bundle_path, image, probabilities, draft, click, propagate_slices=0)
    assert dice(only_own[2] == 3, DISK) > 0.85 and not only_own[[0, 1, 3, 4]].any()  # 0: the old behaviour
    # two slices either side reach as far as the error goes, and no farther
    wide = refined(bundle_path, image, probabilities, draft, click, propagate_slices=2)
    assert np.array_equal(wide, result)


def test_negative_clicks_carry_over_only_when_switched_on(bundle_path, monkeypatch):
    image, probabilities = phantom()
    draft = np.where(DISK, 3, 0)[None].repeat(SLICES, 0).astype(np.uint8)
    probabilities[3][:, DISK] = 0.3
    click = [Click(point_of(image, 2, 30, 34), 3, False)]
    shipped = refined(bundle_path, image, probabilities, draft, click)  # PROPAGATE_NEGATIVE is off
    assert (shipped[2][DISK] == 3).mean() < 0.15 and np.array_equal(shipped[[0, 1, 3, 4]], draft[[0, 1, 3, 4]])
    monkeypatch.setattr(propagation, "PROPAGATE_NEGATIVE", True)
    result = refined(bundle_path, image, probabilities, draft, click)
    for k in (1, 2, 3):
        assert (result[k][DISK] == 3).mean() < 0.15, k
    assert np.array_equal(result[[0, 4]], draft[[0, 4]])  # the draft's disk there lies on other intensities


def test_no_propagation_where_the_neighbour_differs(bundle_path):
    # slice 3's disk is darker (another tissue); slice 1's draft already calls it myocardium (another error kind)
    image, probabilities = phantom(disk_values={3: 450.0})
    draft = np.zeros(image.array.shape, np.uint8)
    draft[1][DISK] = 2
    result = refined(bundle_path, image, probabilities, draft, [Click(point_of(image, 2, 30, 34), 3, True)])
    assert dice(result[2] == 3, DISK) > 0.85
    assert np.array_equal(result[[0, 1, 3, 4]], draft[[0, 1, 3, 4]])


def test_real_clicks_are_honoured_and_win_over_propagated_ones(bundle_path):
    image, probabilities = phantom()
    draft = np.zeros(image.array.shape, np.uint8)
    clicks = [
        Click(point_of(image, 3, 30, 34), 3, False),  # a real "not LV" on the neighbour, at the same voxel ...
        Click(point_of(image, 2, 30, 34), 3, True),  # ... before the click that would carry "LV" there
        Click(point_of(image, 1, 20, 20), 1, True),  # and one elsewhere on the other neighbour
    ]
    result = refined(bundle_path, image, probabilities, draft, clicks)
    assert result[3, 30, 34] != 3 and result[2, 30, 34] == 3 and result[1, 20, 20] == 1
    assert dice(result[1] == 3, DISK) > 0.85  # the propagated click still did its work on slice 1


def test_no_clicks_no_change_and_bad_settings_refused(bundle_path):
    image, probabilities = phantom()
    draft = np.random.default_rng(0).integers(0, 4, image.array.shape).astype(np.uint8)
    assert np.array_equal(refined(bundle_path, image, probabilities, draft, [], propagate_slices=2), draft)
    for bad in (-1, 1.5):
        with pytest.raises(IdealError, match="propagate_slices"):
            Refiner(bundle_path, device="cpu", propagate_slices=bad)


def test_soft_clicks_are_not_forced():
    """Only real clicks are set as they say; a soft (propagated) one only steers the engine."""
    labels = np.zeros((4, 4), np.uint8)
    prior = np.zeros((4, 4, 4), np.float32)
    prior[0] = 1.0
    box = (slice(0, 4), slice(0, 4))
    honour_clicks(labels, prior, [SliceClick((1, 1), 3, True, soft=True), SliceClick((2, 2), 2, True)], box)
    assert labels[1, 1] == 0 and labels[2, 2] == 2


@pytest.mark.parametrize("adjacent", [True, False])
def test_a_negative_click_never_adds_its_structure_on_its_slice_or_the_next(bundle_path, adjacent):
    """One negative LV click added 165 LV voxels on the next slice (the guided network, given the click as
    adjacent guidance, redrew LV nearby); docs/click-to-fix.md: a negative click never adds its structure."""
    image = oblique_image(seed=5)
    refiner = Refiner(bundle_path, device="cpu", refinement=tiny_refinement_bundle(varied_bundle(), adjacent=adjacent))
    draft = refiner.predictor.predict(image).labels
    for voxel, label in [((2, 39, 18), 3), ((0, 21, 46), 1), ((0, 12, 47), 1)]:
        assert draft.array[voxel] == label
        result = refiner.refine(image, draft, [Click(point_of(image, *voxel), label, False)]).labels.array
        assert result[voxel] != label
        assert not ((result == label) & (draft.array != label)).any(), (voxel, label)


def test_additions_stay_allowed_within_reach_of_a_positive_click_for_the_structure():
    from IDEALTrain.inference.refine_engines import keep_negative_clicks_negative

    draft = np.zeros((20, 20), np.uint8)
    proposed = np.zeros((20, 20), np.uint8)
    proposed[2:5, 2:5] = 3  # near the positive LV click
    proposed[15:18, 15:18] = 3  # near the negative LV click only
    prior = np.full((4, 20, 20), 0.1, np.float32)
    prior[0], prior[2] = 0.5, 0.3  # background the draft's class, myocardium the next most probable
    clicks = [SliceClick((3, 3), 3, True), SliceClick((16, 16), 3, False, soft=True)]
    kept = keep_negative_clicks_negative(draft, proposed, prior, clicks, (1.0, 1.0), 5.0)
    assert (kept[2:5, 2:5] == 3).all() and not kept[10:].any()
    assert (keep_negative_clicks_negative(draft, proposed, prior, clicks[:1], (1.0, 1.0), 5.0) == proposed).all()
    # where the draft's own class is refused there too (a negative background... here: a negative LV click on LV
    # turned myocardium, with a negative myocardium click beside it), the most probable allowed class is taken
    draft_lv = np.full((20, 20), 3, np.uint8)
    moved = draft_lv.copy()
    moved[8:12, 8:12] = 2
    both = [SliceClick((10, 10), 3, False), SliceClick((9, 9), 2, False)]
    fixed = keep_negative_clicks_negative(draft_lv, moved, prior, both, (1.0, 1.0), 5.0)
    assert fixed[10, 10] == 2  # a real clicked voxel stays as the engine set it
    assert set(np.unique(fixed[8:12, 8:12])) <= {0, 2} and fixed[8, 11] == 0
