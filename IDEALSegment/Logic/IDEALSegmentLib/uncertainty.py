"""The decoders' disagreement map as a volume node, and which slices a clinician should review first.

The map (0 = both decoders agree, 1 = they predict different classes with certainty) lies on the
source volume's grid; it becomes a scalar volume with the volume's own geometry and parent
transform, a black-red-yellow colour map, window 0-1, and voxels below a small threshold hidden so
it can be shown as a foreground overlay.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import slicer

from IDEALTrain.errors import IdealError
from IDEALTrain.io.image import Image

from .volumes import node_label, volume_from_image, volume_grid, world_ijk_to_ras

#: Name of the colour node the uncertainty volumes use (one per scene, created on first use).
COLOR_NODE_NAME = "IDEALSegment uncertainty"
#: Attribute marking that colour node, so a renamed copy is still found.
COLOR_NODE_ATTRIBUTE = "IDEALSegment.ColorMap"
#: Attribute on an uncertainty volume naming what it is (value "uncertainty").
ROLE_ATTRIBUTE = "IDEALSegment.Role"
#: Uncertainty below this is shown transparent in slice views (the volume keeps every value).
DISPLAY_THRESHOLD = 0.05
#: Float rounding tolerated (and clipped away) at the ends of 0-1: resampling gives e.g. 1.0000001.
ROUNDING = 1e-4

# (value, r, g, b): transparent-looking black, then red, then yellow for full disagreement.
_COLOR_POINTS = ((0.0, 0.0, 0.0, 0.0), (0.5, 1.0, 0.0, 0.0), (1.0, 1.0, 1.0, 0.0))


@dataclass(frozen=True)
class SliceReview:
    """How much one slice needs review: decoder disagreement in and around the predicted heart."""

    slice_index: int  # index along the image's slice axis
    mean_uncertainty: float  # mean over the slice's predicted heart voxels (0 when it has none)
    uncertain_voxels: int  # voxels of the whole slice above the threshold
    heart_voxels: int  # voxels with any foreground label


def review_order(uncertainty: Image, labels: Image, threshold: float = 0.3) -> list[SliceReview]:
    """Every slice (along ``labels.slice_axis``), the ones most in need of review first.

    Slices are ranked by the number of voxels whose uncertainty exceeds ``threshold`` (the size of
    the region the decoders disagree on, inside the heart or where one decoder missed it), then by
    the mean uncertainty over the predicted heart, then by slice index.
    """
    if not uncertainty.same_grid(labels):
        raise IdealError("the uncertainty map and the labels are not on the same voxel grid")
    if not 0.0 <= threshold < 1.0:
        raise IdealError(f"uncertainty threshold {threshold} must lie in 0-1")
    axis = labels.slice_axis
    values = np.moveaxis(np.asarray(uncertainty.array, dtype=np.float64), axis, 0)
    heart = np.moveaxis(np.asarray(labels.array) > 0, axis, 0)
    reviews = []
    for index in range(values.shape[0]):
        heart_voxels = int(np.count_nonzero(heart[index]))
        mean = float(values[index][heart[index]].mean()) if heart_voxels else 0.0
        uncertain = int(np.count_nonzero(values[index] > threshold))
        reviews.append(SliceReview(index, mean, uncertain, heart_voxels))
    return sorted(reviews, key=lambda r: (-r.uncertain_voxels, -r.mean_uncertainty, r.slice_index))


def uncertainty_color_node(scene: object) -> object:
    """The scene's uncertainty colour map (black-red-yellow over 0-1), created once per scene."""
    node = _find_color_node(scene)
    if node is not None:
        return node
    node = slicer.vtkMRMLProceduralColorNode()
    node.SetName(scene.GenerateUniqueName(COLOR_NODE_NAME))
    node.SetAttribute(COLOR_NODE_ATTRIBUTE, "uncertainty")
    function = node.GetColorTransferFunction()
    for value, red, green, blue in _COLOR_POINTS:
        function.AddRGBPoint(value, red, green, blue)
    scene.AddNode(node)
    return node


def uncertainty_volume(volume: object, uncertainty: Image, name: str | None = None) -> object:
    """A NEW scalar volume holding ``uncertainty`` with ``volume``'s geometry and parent transform.

    Shown with the uncertainty colour map, window 0-1 (fixed, not automatic), and values below
    :data:`DISPLAY_THRESHOLD` transparent in slice views.
    """
    volume_grid(volume)  # checks the volume before anything is added
    scene = volume.GetScene()
    if scene is None:
        raise IdealError(f"volume {node_label(volume)} is not in a scene")
    array = np.asarray(uncertainty.array, dtype=np.float32)
    if array.size and (not np.isfinite(array).all() or array.min() < -ROUNDING or array.max() > 1.0 + ROUNDING):
        raise IdealError(f"the uncertainty map must hold values in 0-1 (it holds {array.min():.3g} to {array.max():.3g})")
    created_color = _find_color_node(scene) is None
    color = uncertainty_color_node(scene)
    try:
        image = uncertainty.with_array(np.clip(array, 0.0, 1.0))
        node = volume_from_image(image, scene, name or f"{volume.GetName()} uncertainty", reference=volume)
    except BaseException:
        if created_color:
            scene.RemoveNode(color)  # leave the scene as it was
        raise
    node.SetAttribute(ROLE_ATTRIBUTE, "uncertainty")
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(color.GetID())
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetAutoThreshold(False)
    display.SetThreshold(DISPLAY_THRESHOLD, 1.0)
    display.SetApplyThreshold(True)
    return node


def _find_color_node(scene: object) -> object | None:
    nodes = scene.GetNodesByClass("vtkMRMLProceduralColorNode")
    for index in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(index)
        if node.GetAttribute(COLOR_NODE_ATTRIBUTE) == "uncertainty":
            return node
    return None


def slice_center_ras(volume: object, slice_index: int) -> tuple[float, float, float]:
    """World RAS of the centre of slice ``slice_index`` (along the volume's slice axis): where to jump."""
    grid = volume_grid(volume)
    axis = grid.slice_axis  # array axis: 0 = k, 1 = j, 2 = i
    count = grid.array.shape[axis]
    if not 0 <= slice_index < count:
        raise IdealError(f"slice {slice_index} is outside volume {node_label(volume)} (slices 0-{count - 1})")
    centre_kji = [(n - 1) / 2.0 for n in grid.array.shape]
    centre_kji[axis] = float(slice_index)
    ras = world_ijk_to_ras(volume) @ np.array([*centre_kji[::-1], 1.0])
    return float(ras[0]), float(ras[1]), float(ras[2])
