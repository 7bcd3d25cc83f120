"""Scalar volume nodes <-> IDEALTrain :class:`Image`, with exact geometry (RAS in MRML, LPS in Image).

A volume under a parent transform is read with the geometry it would have after hardening, as long
as the transform is linear and keeps voxel axes orthogonal; anything else is refused with a message
that says to harden (resample) it first. Nodes are created in the scene passed in, never in a global one.
"""
from __future__ import annotations

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from IDEALTrain.errors import IdealError
from IDEALTrain.io.image import Image

#: Flips the first two axes: RAS <-> LPS (its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

ORTHOGONALITY_TOLERANCE = 1e-6


def node_label(node: object) -> str:
    """A node's name for messages (its ID when it has no name)."""
    return f"'{node.GetName() or node.GetID()}'"


def check_scalar_volume(volume: object, allow_labelmap: bool = True) -> None:
    """Refuse anything but a scalar volume node with voxels (and a labelmap unless allowed)."""
    if volume is None:
        raise IdealError("no volume selected: choose the image volume to use")
    if not hasattr(volume, "IsA") or not volume.IsA("vtkMRMLScalarVolumeNode"):
        kind = volume.GetClassName() if hasattr(volume, "GetClassName") else type(volume).__name__
        raise IdealError(f"{kind} is not a scalar volume node: choose a grey-level image volume")
    # Vector (RGB), tensor and diffusion volumes derive from the scalar volume class.
    if volume.IsA("vtkMRMLTensorVolumeNode"):
        raise IdealError(f"volume {node_label(volume)} is a {volume.GetClassName()} (colour/vector/tensor): choose a grey-level image volume")
    if volume.IsA("vtkMRMLLabelMapVolumeNode") and not allow_labelmap:
        raise IdealError(f"volume {node_label(volume)} is a labelmap: choose the grey-level image it was drawn on")
    image_data = volume.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise IdealError(f"volume {node_label(volume)} has no voxel data")
    components = image_data.GetNumberOfScalarComponents()
    if components != 1:
        raise IdealError(f"volume {node_label(volume)} has {components} components per voxel: choose a grey-level image volume")


def matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """A vtkMatrix4x4 as a 4x4 float64 array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def array_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    """A 4x4 array as a vtkMatrix4x4."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def parent_to_world(node: object) -> np.ndarray | None:
    """4x4 matrix from the node's local RAS to world RAS, None without a parent transform.

    A non-linear transform anywhere up the chain is refused: the voxel grid would not be a grid.
    """
    transform = node.GetParentTransformNode()
    if transform is None:
        return None
    if not transform.IsTransformToWorldLinear():
        raise IdealError(
            f"{node_label(node)} is under the non-linear transform {node_label(transform)}: harden the transform "
            "(Transforms module > Harden transform) to resample it onto a regular grid, then try again"
        )
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return matrix_to_array(matrix)


def local_ijk_to_ras(volume: object) -> np.ndarray:
    """The volume's own IJK-to-RAS matrix (4x4), in its parent transform's coordinates."""
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return matrix_to_array(matrix)


def world_ijk_to_ras(volume: object) -> np.ndarray:
    """IJK-to-RAS in world coordinates: what the matrix would be after hardening its transform."""
    to_world = parent_to_world(volume)
    local = local_ijk_to_ras(volume)
    return local if to_world is None else to_world @ local


Geometry = tuple[tuple[float, float, float], tuple[float, float, float], np.ndarray]


def volume_geometry(volume: object) -> Geometry:
    """(spacing, origin, direction) of the volume's grid in world LPS, as :class:`Image` holds them."""
    if volume.GetParentTransformNode() is None:
        # Read the stored spacing, origin and directions: exact, no matrix-product rounding.
        directions = [[0.0] * 3 for _ in range(3)]
        volume.GetIJKToRASDirections(directions)
        direction = RAS_TO_LPS[:3, :3] @ np.array(directions)
        origin = RAS_TO_LPS[:3, :3] @ np.array(volume.GetOrigin())
        return tuple(volume.GetSpacing()), tuple(origin), direction
    matrix = RAS_TO_LPS @ world_ijk_to_ras(volume)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    direction = matrix[:3, :3] / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=ORTHOGONALITY_TOLERANCE):
        raise IdealError(
            f"volume {node_label(volume)} is under a transform that shears its voxel axes: harden the "
            "transform (Transforms module > Harden transform) to resample it, then try again"
        )
    return tuple(spacing), tuple(matrix[:3, 3]), direction


def volume_grid(volume: object) -> Image:
    """The volume's grid as an :class:`Image` whose array is a read-only view of zeros (no copy)."""
    check_scalar_volume(volume)
    shape = tuple(volume.GetImageData().GetDimensions()[::-1])
    return Image(np.broadcast_to(np.uint8(0), shape), *volume_geometry(volume))


def image_from_volume(volume: object, allow_labelmap: bool = True) -> Image:
    """The node's voxels (a copy, indexed (k, j, i)) with their world geometry in LPS."""
    check_scalar_volume(volume, allow_labelmap)
    geometry = volume_geometry(volume)
    return Image(np.array(slicer.util.arrayFromVolume(volume)), *geometry)


def _voxel_array(array: np.ndarray) -> np.ndarray:
    """The array in a voxel type MRML volumes display (no 64-bit integers, no bool)."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype in (np.int64, np.uint64):
        if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
            raise IdealError(f"voxel values {array.min()}..{array.max()} do not fit a 32-bit volume")
        return array.astype(np.int32)
    return array


def unique_node_name(scene: object, name: str) -> str:
    """``name`` if no node in the scene has it, else ``name_1``, ``name_2``, ..."""
    return scene.GenerateUniqueName(name)


def volume_from_image(
    image: Image,
    scene: object,
    name: str,
    labelmap: bool = False,
    reference: object | None = None,
) -> object:
    """A NEW scalar (or labelmap) volume node in ``scene`` holding ``image``, with a unique name.

    With ``reference`` (a volume whose grid ``image`` lies on), the node copies the reference's own
    geometry and parent transform exactly, so it follows the reference when the transform moves.
    """
    if scene is None:
        raise IdealError("no scene to add the volume to")
    if reference is not None:
        grid = volume_grid(reference)
        if not image.same_grid(grid):
            raise IdealError(
                f"the image is not on the voxel grid of {node_label(reference)} "
                f"(size {image.size} vs {grid.size}, or spacing/origin/direction differ)"
            )
    voxels = _voxel_array(np.ascontiguousarray(image.array))
    node_class = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(node_class, unique_node_name(scene, name))
    if reference is None:
        _set_image_geometry(node, image)
    else:
        _copy_geometry(node, reference)
        node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    _set_voxels(node, voxels)
    node.CreateDefaultDisplayNodes()
    return node


def _set_image_geometry(node: object, image: Image) -> None:
    """Spacing, origin and directions of ``image`` (LPS) on ``node`` (RAS), exactly."""
    node.SetSpacing(*image.spacing)
    node.SetOrigin(*(RAS_TO_LPS[:3, :3] @ np.array(image.origin)))
    node.SetIJKToRASDirections((RAS_TO_LPS[:3, :3] @ image.direction).tolist())


def _copy_geometry(node: object, reference: object) -> None:
    """The reference volume's stored spacing, origin and directions, unchanged."""
    directions = [[0.0] * 3 for _ in range(3)]
    reference.GetIJKToRASDirections(directions)
    node.SetIJKToRASDirections(directions)
    node.SetSpacing(reference.GetSpacing())
    node.SetOrigin(reference.GetOrigin())


def _set_voxels(node: object, array: np.ndarray) -> None:
    """Deep-copy a (k, j, i) array into a new vtkImageData on ``node``."""
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(array.shape[::-1])
    vtk_type = numpy_support.get_vtk_array_type(array.dtype)
    image_data.AllocateScalars(vtk_type, 1)
    numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())[:] = array.ravel()
    node.SetAndObserveImageData(image_data)
