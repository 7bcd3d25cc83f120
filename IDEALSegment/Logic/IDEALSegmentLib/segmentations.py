"""Label images <-> segmentation nodes: fixed segment IDs, names, colours, SNOMED CT terminology.

Results always go into a NEW segmentation node, or replace only the segments a caller names; the
voxels go in and come out on the source volume's grid exactly (one shared labelmap layer, no
resampling), and are read back through the segment IDs, whatever the user has edited.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from IDEALTrain.errors import IdealError
from IDEALTrain.io.image import Image
from IDEALTrain.labels import CARDIAC_LABELS, LabelInfo

from .volumes import (
    array_to_matrix,
    check_scalar_volume,
    local_ijk_to_ras,
    node_label,
    parent_to_world,
    unique_node_name,
    volume_grid,
)

LabelMap = Sequence[LabelInfo]

#: Node attributes (and segment tags) recording which model produced a result, and when.
MODEL_ID_ATTRIBUTE = "IDEALSegment.ModelId"
MODEL_VERSION_ATTRIBUTE = "IDEALSegment.ModelVersion"
CREATED_ATTRIBUTE = "IDEALSegment.Created"

BINARY_LABELMAP = "Binary labelmap"
_CONVERTER_RULES = (
    "vtkBinaryLabelmapToClosedSurfaceConversionRule",
    "vtkClosedSurfaceToBinaryLabelmapConversionRule",
    "vtkClosedSurfaceToFractionalLabelmapConversionRule",
    "vtkFractionalLabelmapToClosedSurfaceConversionRule",
)


@dataclass(frozen=True)
class Provenance:
    """Which model produced a segmentation, and when (ISO 8601, UTC)."""

    model_id: str
    model_version: str
    created: str

    @classmethod
    def now(cls, model_id: str, model_version: str) -> Provenance:
        return cls(model_id, model_version, datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def items(self) -> tuple[tuple[str, str], ...]:
        return (
            (MODEL_ID_ATTRIBUTE, self.model_id),
            (MODEL_VERSION_ATTRIBUTE, self.model_version),
            (CREATED_ATTRIBUTE, self.created),
        )


def read_provenance(segmentation: object) -> Provenance | None:
    """The provenance recorded on a segmentation node, None when it has none."""
    model_id = segmentation.GetAttribute(MODEL_ID_ATTRIBUTE)
    if model_id is None:
        return None
    return Provenance(
        model_id,
        segmentation.GetAttribute(MODEL_VERSION_ATTRIBUTE) or "",
        segmentation.GetAttribute(CREATED_ATTRIBUTE) or "",
    )


def register_converter_rules() -> None:
    """Register Slicer's four segmentation converter rules when nobody has (slicer-core starts empty).

    The Slicer application registers them at start-up; doing it again would duplicate them.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if len(factory.GetConverterRules()) == 0:
        for rule in _CONVERTER_RULES:
            factory.RegisterConverterRule(getattr(slicer, rule)())


def _check_label_map(label_map: LabelMap) -> None:
    """Refuse a label map with duplicate values or IDs, or values outside 1-255."""
    values = [label.value for label in label_map]
    ids = [label.segment_id for label in label_map]
    if not label_map:
        raise IdealError("the label map is empty")
    if len(set(values)) != len(values) or len(set(ids)) != len(ids):
        raise IdealError(f"label map has duplicate values {values} or segment IDs {ids}")
    if min(values) < 1 or max(values) > 255:
        raise IdealError(f"label values {values} must lie in 1-255")


def _check_labels_on_volume(labels: Image, volume: object, label_map: LabelMap) -> np.ndarray:
    """The labels as uint8 after checking their grid and values against the volume and label map."""
    check_scalar_volume(volume)
    _check_label_map(label_map)
    grid = volume_grid(volume)
    if not labels.same_grid(grid):
        raise IdealError(
            f"the labels are not on the voxel grid of volume {node_label(volume)} (size {labels.size} vs "
            f"{grid.size}, or spacing/origin/direction differ): predict on that volume's own grid"
        )
    unknown = np.setdiff1d(np.unique(labels.array), [0] + [label.value for label in label_map])
    if unknown.size:
        raise IdealError(f"label values {unknown.tolist()} are not in the label map (values {[label.value for label in label_map]})")
    return labels.array.astype(np.uint8)


def _ijk_to_segmentation(volume: object, segmentation: object) -> np.ndarray:
    """The volume's IJK-to-RAS expressed in the segmentation node's own coordinates."""
    if volume.GetTransformNodeID() == segmentation.GetTransformNodeID():
        return local_ijk_to_ras(volume)  # the same frame: exact, no matrix products
    volume_to_world = parent_to_world(volume)
    segmentation_to_world = parent_to_world(segmentation)
    matrix = local_ijk_to_ras(volume)
    if volume_to_world is not None:
        matrix = volume_to_world @ matrix
    if segmentation_to_world is not None:
        matrix = np.linalg.inv(segmentation_to_world) @ matrix
    return matrix


def _oriented_image(array: np.ndarray, ijk_to_ras: np.ndarray) -> object:
    """A vtkOrientedImageData holding a (k, j, i) uint8 array with the given IJK-to-RAS matrix."""
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(array.shape[::-1])
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.ascontiguousarray(array, dtype=np.uint8).ravel()
    image.SetImageToWorldMatrix(array_to_matrix(ijk_to_ras))
    return image


def _describe_segment(segment: object, label: LabelInfo) -> None:
    """Name, colour and terminology from the label map (marked as chosen, not auto-generated)."""
    segment.SetName(label.name)
    segment.SetColor(*label.color)
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), label.terminology_entry)


def _tag_provenance(segment: object, provenance: Provenance | None) -> None:
    for key, value in provenance.items() if provenance else ():
        segment.SetTag(key, value)


def segmentation_from_labels(
    labels: Image,
    volume: object,
    label_map: LabelMap = CARDIAC_LABELS,
    provenance: Provenance | None = None,
    name: str | None = None,
) -> object:
    """A NEW segmentation node (unique name) with one segment per label, on ``volume``'s grid.

    ``labels`` must lie on the volume's grid (as :func:`image_from_volume` gives it). The node uses
    the volume as reference geometry, sits under the volume's parent transform and next to it in the
    subject hierarchy, and records ``provenance`` as node attributes and segment tags.
    """
    array = _check_labels_on_volume(labels, volume, label_map)
    scene = volume.GetScene()
    if scene is None:
        raise IdealError(f"volume {node_label(volume)} is not in a scene")
    register_converter_rules()
    segmentation = scene.AddNewNodeByClass(
        "vtkMRMLSegmentationNode", unique_node_name(scene, name or f"{volume.GetName()} segmentation")
    )
    segmentation.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for key, value in provenance.items() if provenance else ():
        segmentation.SetAttribute(key, value)
    layer = _oriented_image(array, local_ijk_to_ras(volume))
    contents = segmentation.GetSegmentation()
    for label in label_map:
        segment = slicer.vtkSegment()
        _describe_segment(segment, label)
        _tag_provenance(segment, provenance)
        segment.SetLabelValue(label.value)
        segment.AddRepresentation(BINARY_LABELMAP, layer)  # all segments share one layer
        contents.AddSegment(segment, label.segment_id)
    segmentation.CreateDefaultDisplayNodes()
    _place_beside(segmentation, volume)
    return segmentation


def _place_beside(node: object, sibling: object) -> None:
    """Put ``node`` under the same subject-hierarchy parent as ``sibling`` (when it has one)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    if hierarchy is None:
        return
    sibling_item = hierarchy.GetItemByDataNode(sibling)
    if not sibling_item:
        return  # e.g. plain slicer-core without the subject hierarchy logic: nothing to be beside
    parent = hierarchy.GetItemParent(sibling_item)
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:
        hierarchy.CreateItem(parent, node)


def _source_representation(segmentation: object) -> str:
    contents = segmentation.GetSegmentation()
    getter = getattr(contents, "GetSourceRepresentationName", None) or contents.GetMasterRepresentationName
    return getter()


def replace_segments(
    segmentation: object,
    labels: Image,
    volume: object,
    segment_ids: Sequence[str],
    label_map: LabelMap = CARDIAC_LABELS,
    provenance: Provenance | None = None,
) -> None:
    """Replace the voxels of exactly the named segments with ``labels``; every other segment is untouched.

    A named segment that does not exist is created with the label map's name, colour and
    terminology; an existing one keeps the name and colour the user gave it. Overlapping segments
    that are not named are moved to their own layer by Slicer rather than overwritten.
    """
    array = _check_labels_on_volume(labels, volume, label_map)
    by_id = {label.segment_id: label for label in label_map}
    unknown = [segment_id for segment_id in segment_ids if segment_id not in by_id]
    if unknown:
        raise IdealError(f"segment IDs {unknown} are not in the label map (IDs {list(by_id)})")
    if _source_representation(segmentation) != BINARY_LABELMAP:
        raise IdealError(
            f"segmentation {node_label(segmentation)} is stored as '{_source_representation(segmentation)}': "
            "make 'Binary labelmap' its source representation (Segmentations module) first"
        )
    ijk_to_ras = _ijk_to_segmentation(volume, segmentation)
    register_converter_rules()
    contents = segmentation.GetSegmentation()
    extent = (0, array.shape[2] - 1, 0, array.shape[1] - 1, 0, array.shape[0] - 1)
    was_modifying = segmentation.StartModify()
    try:
        for segment_id in dict.fromkeys(segment_ids):
            label = by_id[segment_id]
            if contents.GetSegment(segment_id) is None:
                contents.AddEmptySegment(segment_id, label.name, list(label.color))
                _describe_segment(contents.GetSegment(segment_id), label)
            mask = _oriented_image(array == label.value, ijk_to_ras)
            if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                mask, segmentation, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, extent, False, []
            ):
                raise IdealError(f"could not write segment '{segment_id}' into {node_label(segmentation)}")
            _tag_provenance(contents.GetSegment(segment_id), provenance)
    finally:
        segmentation.EndModify(was_modifying)


def labels_from_segmentation(
    segmentation: object,
    volume: object,
    label_map: LabelMap = CARDIAC_LABELS,
    allow_missing: bool = False,
) -> Image:
    """The label image on ``volume``'s grid from the segments whose IDs the label map names.

    Other segments are ignored; where named segments overlap, the later one in the label map wins.
    A missing segment is an error unless ``allow_missing`` (then its label is simply absent).
    """
    check_scalar_volume(volume)
    _check_label_map(label_map)
    contents = segmentation.GetSegmentation()
    present = [label for label in label_map if contents.GetSegment(label.segment_id) is not None]
    missing = [label.segment_id for label in label_map if contents.GetSegment(label.segment_id) is None]
    if missing and not allow_missing:
        raise IdealError(
            f"segmentation {node_label(segmentation)} has no segment with ID {missing} "
            f"(it has {list(contents.GetSegmentIDs())}): it was not made from this label map"
        )
    grid = volume_grid(volume)
    shape = grid.array.shape
    if not present:
        return grid.with_array(np.zeros(shape, np.uint8))
    if not contents.ContainsRepresentation(BINARY_LABELMAP) and not contents.CreateRepresentation(BINARY_LABELMAP):
        raise IdealError(f"segmentation {node_label(segmentation)} cannot be converted to a binary labelmap")
    segment_ids = vtk.vtkStringArray()
    values = vtk.vtkIntArray()
    for label in present:
        segment_ids.InsertNextValue(label.segment_id)
        values.InsertNextValue(label.value)
    merged = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
        segmentation, volume, segment_ids, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, merged, values
    )
    scalars = merged.GetPointData().GetScalars()
    if scalars is None or tuple(merged.GetDimensions()) != shape[::-1]:
        raise IdealError(f"could not export segmentation {node_label(segmentation)} onto the grid of volume {node_label(volume)}")
    return grid.with_array(numpy_support.vtk_to_numpy(scalars).reshape(shape).astype(np.uint8))
