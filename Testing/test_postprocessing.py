"""The postprocessing plan: the largest-heart-component step, its card section, and the predictor using it."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import oblique_image, varied_bundle

from IDEALTrain.errors import IdealError
from IDEALTrain.inference.predictor import Predictor
from IDEALTrain.model.bundle import load_bundle, save_bundle
from IDEALTrain.model.postprocessing import Postprocessing, largest_component


def _heart_with_island() -> np.ndarray:
    labels = np.zeros((6, 20, 20), np.uint8)
    labels[1:5, 4:12, 4:12] = 3  # blood pool
    labels[1:5, 4:12, 12:14] = 2  # myocardium touching it: the same heart
    labels[1:5, 3, 4:12] = 1  # right ventricle touching it
    labels[5, 17:19, 17:19] = 1  # a stray island
    return labels


def test_largest_heart_component_removes_islands_and_keeps_the_heart_whole():
    labels = _heart_with_island()
    kept = Postprocessing(largest_heart_component=True).apply(labels)
    assert kept[5, 17:19, 17:19].sum() == 0
    heart = labels.copy()
    heart[5, 17:19, 17:19] = 0
    np.testing.assert_array_equal(kept, heart)  # every class of the main heart survives, unchanged
    assert labels[5, 17, 17] == 1  # the input is not modified


def test_off_is_the_identity_and_empty_stays_empty():
    labels = _heart_with_island()
    np.testing.assert_array_equal(Postprocessing().apply(labels), labels)
    empty = np.zeros((3, 5, 5), np.uint8)
    np.testing.assert_array_equal(Postprocessing(largest_heart_component=True).apply(empty), empty)


def test_diagonal_neighbours_are_one_component():
    mask = np.zeros((3, 4, 4), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # touching only at corners
    mask[2, 3, 0] = True  # isolated
    kept = largest_component(mask)
    assert kept.sum() == 3 and not kept[2, 3, 0]


def test_card_section_round_trip_and_old_cards(tmp_path):
    bundle = varied_bundle()
    bundle.postprocessing = Postprocessing(largest_heart_component=True)
    loaded = load_bundle(save_bundle(bundle, tmp_path / "with"))
    assert loaded.postprocessing.largest_heart_component
    with pytest.raises(IdealError, match=r"unknown postprocessing field\(s\) \['smooth'\]"):
        Postprocessing.from_json({"smooth": True})
    assert Postprocessing.from_json({}) == Postprocessing()  # cards written before the section existed


def test_predictor_applies_the_bundles_plan():
    image = oblique_image(shape=(5, 40, 48))
    bundle = varied_bundle()
    plain = Predictor(bundle, device="cpu").predict(image)
    bundle.postprocessing = Postprocessing(largest_heart_component=True)
    cleaned = Predictor(bundle, device="cpu").predict(image)
    np.testing.assert_array_equal(cleaned.probabilities, plain.probabilities)  # only the label map changes
    expected = Postprocessing(largest_heart_component=True).apply(plain.labels.array)
    np.testing.assert_array_equal(cleaned.labels.array, expected)
    assert (cleaned.labels.array > 0).sum() < (plain.labels.array > 0).sum()  # the random network leaves islands to remove
