"""The value type that carries a volume through the whole system: voxels plus their geometry.

Geometry follows ITK/DICOM conventions: physical coordinates are LPS millimetres, ``array`` is
indexed (k, j, i) like ``sitk.GetArrayFromImage`` and Slicer's ``arrayFromVolume``, while
``spacing`` and ``origin`` are (i, j, k) / (x, y, z) and column n of ``direction`` is the
direction of index axis n. Converting to Slicer's RAS happens at the MRML edge, not here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ..errors import IdealError

GEOMETRY_TOLERANCE = 1e-4


@dataclass(frozen=True, eq=False)
class Image:
    """A 3D voxel array with spacing (mm), origin (LPS mm) and a 3x3 direction matrix."""

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise IdealError(f"expected a 3D volume, got an array of shape {self.array.shape}")
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        object.__setattr__(self, "direction", direction)
        if any(not np.isfinite(s) or s <= 0 for s in self.spacing):
            raise IdealError(f"invalid voxel spacing {self.spacing}: every spacing must be > 0")

    # -- geometry -----------------------------------------------------------------------------
    @property
    def size(self) -> tuple[int, int, int]:
        """Number of voxels along (i, j, k)."""
        return tuple(int(n) for n in self.array.shape[::-1])

    @property
    def index_to_physical(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k, 1) to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    @property
    def slice_axis(self) -> int:
        """Array axis (0 = k, 1 = j, 2 = i) that runs through the short-axis slices.

        The slice axis is the one whose spacing is clearly the largest (thick slices); for
        near-isotropic data it is the axis with the fewest voxels, and k when that is a tie.
        """
        spacing_kji = np.array(self.spacing[::-1])
        widest = int(np.argmax(spacing_kji))
        others = np.delete(spacing_kji, widest)
        if spacing_kji[widest] > 1.2 * others.max():
            return widest
        shape = np.array(self.array.shape)
        fewest = np.flatnonzero(shape == shape.min())
        return 0 if 0 in fewest else int(fewest[0])

    def same_grid(self, other: Image, tolerance: float = GEOMETRY_TOLERANCE) -> bool:
        """True when both images have the same voxel grid (size, spacing, origin, direction)."""
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=tolerance)
            and np.allclose(self.origin, other.origin, atol=tolerance)
            and np.allclose(self.direction, other.direction, atol=tolerance)
        )

    def with_array(self, array: np.ndarray) -> Image:
        """The same geometry holding other voxels (e.g. a label map for this image)."""
        if array.shape != self.array.shape:
            raise IdealError(f"array shape {array.shape} does not match image shape {self.array.shape}")
        return Image(array, self.spacing, self.origin, self.direction)

    # -- SimpleITK edge -----------------------------------------------------------------------
    def to_sitk(self) -> sitk.Image:
        """A SimpleITK image with exactly this geometry."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array), isVector=False)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.flatten()))
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Image:
        """Convert a 3D scalar SimpleITK image, keeping its geometry."""
        if image.GetDimension() != 3:
            raise IdealError(f"expected a 3D image, got a {image.GetDimension()}D image")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise IdealError(
                f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components per voxel"
            )
        return cls(
            sitk.GetArrayFromImage(image),
            image.GetSpacing(),
            image.GetOrigin(),
            np.array(image.GetDirection()).reshape(3, 3),
        )
