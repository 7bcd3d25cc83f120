"""Quick-look PNGs: a short-axis slice with the segmentation blended in the label colours."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..io.atomic import atomic_path
from ..io.image import Image
from ..labels import CARDIAC_LABELS, LabelInfo
from ..model.preprocessing import normalise_slices


def overlay_rgb(image: Image, labels: Image, slice_index: int | None = None, labels_info: tuple[LabelInfo, ...] = CARDIAC_LABELS, opacity: float = 0.5) -> np.ndarray:
    """One slice (default: the middle one along the slice axis) as an RGB uint8 array with labels blended."""
    axis = image.slice_axis
    index = image.array.shape[axis] // 2 if slice_index is None else slice_index
    grey = normalise_slices(np.take(image.array, index, axis=axis)[None], (0.5, 99.5))[0]
    label = np.take(labels.array, index, axis=axis)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for info in labels_info:
        mask = label == info.value
        rgb[mask] = (1 - opacity) * rgb[mask] + opacity * np.asarray(info.color)
    return (rgb * 255).round().clip(0, 255).astype(np.uint8)


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write an RGB uint8 array as a PNG, atomically."""
    with atomic_path(path) as temp:
        sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(temp))
    return Path(path)
