"""Overlay PNGs show the slice with each label in its colour."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from helpers import oblique_image

from IDEALTrain.evaluation.overlay import overlay_rgb, save_png
from IDEALTrain.labels import CARDIAC_LABELS


def test_overlay_blends_label_colours_on_the_middle_slice(tmp_path):
    image = oblique_image()
    labels = np.zeros(image.array.shape, np.uint8)
    labels[3, 10:20, 10:20] = 3
    rgb = overlay_rgb(image, image.with_array(labels))
    assert rgb.shape == (40, 48, 3) and rgb.dtype == np.uint8
    lv_colour = np.asarray(CARDIAC_LABELS[2].color)
    inside, outside = rgb[15, 15] / 255.0, rgb[30, 30] / 255.0
    grey_part = inside - 0.5 * lv_colour  # half label colour plus half of an (equal-channel) grey
    assert np.ptp(grey_part) <= 1.5 / 255 and 0 <= grey_part.min() and not np.allclose(inside, inside[0])
    assert outside[0] == outside[1] == outside[2]  # unlabelled pixels stay grey
    path = save_png(rgb, tmp_path / "overlay.png")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), rgb)
