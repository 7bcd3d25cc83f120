"""The preprocessing plan a bundle carries, and the slice grid that maps a volume to network input
and network output back to the volume's own voxels.

Training and inference both go through :class:`SliceGrid`, so a model always sees slices prepared
exactly as it was trained on; the caller never chooses sizes or normalisation.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import IdealError
from ..io.image import Image

INPLANE_MODES = ("size", "spacing")


@dataclass(frozen=True)
class Preprocessing:
    """How slices are normalised and resampled in-plane (the ``preprocessing`` card section).

    ``inplane="size"`` resizes every slice to ``size`` (the SSL4MIS convention, for data without
    spacing); ``inplane="spacing"`` resamples to ``spacing`` mm and pads to the network multiple,
    so anatomy has the same physical scale whatever the field of view.
    """

    intensity: str = "slice_percentile_minmax"
    percentiles: tuple[float, float] = (0.5, 99.5)
    inplane: str = "size"
    size: tuple[int, int] = (256, 256)
    spacing: tuple[float, float] = (1.4, 1.4)

    def __post_init__(self) -> None:
        object.__setattr__(self, "percentiles", tuple(float(p) for p in self.percentiles))
        object.__setattr__(self, "size", tuple(int(s) for s in self.size))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        if self.intensity != "slice_percentile_minmax":
            raise IdealError(f"unknown intensity normalisation {self.intensity!r}")
        if self.inplane not in INPLANE_MODES:
            raise IdealError(f"unknown in-plane mode {self.inplane!r}; choose from {INPLANE_MODES}")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise IdealError(f"invalid intensity percentiles {self.percentiles}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Preprocessing:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise IdealError(f"unknown preprocessing field(s) {unknown}; this bundle needs a newer IDEALTrain")
        return cls(**data)


def check_volume(image: Image) -> None:
    """Refuse volumes a network cannot meaningfully segment, with the reason."""
    array = image.array
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise IdealError(f"voxel type {array.dtype} is not a real-valued image")
    bad = int(np.count_nonzero(~np.isfinite(array))) if np.issubdtype(array.dtype, np.floating) else 0
    if bad:
        raise IdealError(f"the volume has {bad} NaN or infinite voxel(s); fix or mask them before segmenting")
    if array.size == 0 or array.min() == array.max():
        value = array.flat[0] if array.size else "none"
        raise IdealError(f"the volume is empty or constant (every voxel = {value}): there is nothing to segment")


def normalise_slices(slices: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Clip each slice (S, H, W) to its intensity percentiles and scale to [0, 1] (float32)."""
    data = slices.astype(np.float32, copy=False)
    low, high = np.percentile(data.reshape(len(data), -1), percentiles, axis=1)
    scale = np.where(high > low, high - low, 1.0).astype(np.float32)
    normalised = (data - low[:, None, None].astype(np.float32)) / scale[:, None, None]
    return np.clip(normalised, 0.0, 1.0, out=normalised)


class SliceGrid:
    """Maps one volume's slices to network-sized tensors and network outputs back, exactly."""

    def __init__(self, image: Image, plan: Preprocessing, size_multiple: int) -> None:
        self.shape = image.array.shape
        self.slice_axis = image.slice_axis
        inplane_shape = [n for axis, n in enumerate(self.shape) if axis != self.slice_axis]
        self.inplane_shape = tuple(inplane_shape)
        if plan.inplane == "size":
            if any(s % size_multiple for s in plan.size):
                raise IdealError(f"preprocessing size {plan.size} must be a multiple of {size_multiple}")
            self.resized = plan.size
        else:
            spacing_kji = [s for axis, s in enumerate(image.spacing[::-1]) if axis != self.slice_axis]
            self.resized = tuple(max(1, round(n * s / t)) for n, s, t in zip(inplane_shape, spacing_kji, plan.spacing))
        padded = [math.ceil(n / size_multiple) * size_multiple for n in self.resized]
        self.padding = [(p - n) // 2 for p, n in zip(padded, self.resized)]
        self.network_shape = tuple(padded)
        self.plan = plan

    @property
    def num_slices(self) -> int:
        return self.shape[self.slice_axis]

    def _slices(self, array: np.ndarray) -> np.ndarray:
        return np.moveaxis(array, self.slice_axis, 0)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        (top, left), (height, width) = self.padding, self.network_shape
        bottom, right = height - x.shape[-2] - top, width - x.shape[-1] - left
        return F.pad(x, (left, right, top, bottom)) if (top or left or bottom or right) else x

    def image_to_network(self, image: Image) -> torch.Tensor:
        """Normalised, resampled slices as a float32 tensor (S, 1, H, W)."""
        slices = normalise_slices(self._slices(image.array), self.plan.percentiles)
        x = torch.from_numpy(np.ascontiguousarray(slices))[:, None]
        if tuple(x.shape[-2:]) != self.resized:
            shrinking = any(r < n for r, n in zip(self.resized, self.inplane_shape))
            x = F.interpolate(x, size=self.resized, mode="bilinear", align_corners=False, antialias=shrinking)
        return self._pad(x)

    def labels_to_network(self, label: Image) -> torch.Tensor:
        """Label slices resampled (nearest) to the network grid, as int64 (S, H, W)."""
        y = torch.from_numpy(np.ascontiguousarray(self._slices(label.array)).astype(np.int64))[:, None].float()
        if tuple(y.shape[-2:]) != self.resized:
            y = F.interpolate(y, size=self.resized, mode="nearest-exact")
        return self._pad(y)[:, 0].long()

    def network_to_volume(self, maps: torch.Tensor) -> np.ndarray:
        """Per-slice maps (S, C, H, W) on the network grid back to (C, k, j, i) on the volume grid."""
        (top, left), (height, width) = self.padding, self.resized
        maps = maps[..., top : top + height, left : left + width].float()
        if tuple(maps.shape[-2:]) != self.inplane_shape:
            maps = F.interpolate(maps, size=self.inplane_shape, mode="bilinear", align_corners=False)
        volume = maps.permute(1, 0, 2, 3).cpu().numpy()  # (C, S, A, B)
        return np.ascontiguousarray(np.moveaxis(volume, 1, 1 + self.slice_axis))
