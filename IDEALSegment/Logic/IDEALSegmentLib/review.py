"""What a clinician reviewed on a case (MRML side): the model's output recorded on the segmentation node, and the patient.

When the model draws, :func:`mark_model_output` keeps its labels (compressed) on the segmentation
node, so at export the default marking (:func:`IDEALTrain.io.reviewed.default_reviewed`) can tell
which structures the clinician edited, and on which slices. :func:`patient_of_volume` finds the
patient a volume belongs to in the subject hierarchy, where Slicer's DICOM import puts it.
"""
from __future__ import annotations

import hashlib

import numpy as np

from IDEALTrain.io.image import Image
from IDEALTrain.io.reviewed import decode_labels, encode_labels
from IDEALTrain.labels import CARDIAC_LABELS

#: Node attribute prefix (+ ".<segment ID>"): SHA-256 of a segment's voxels as the model drew it (version 1 record).
MODEL_OUTPUT_TAG = "IDEALSegment.ModelOutputSHA256"
#: Node attribute: the model's whole label map, compressed (see IDEALTrain.io.reviewed.encode_labels).
MODEL_LABELS_TAG = "IDEALSegment.ModelOutputLabels"
PATIENT_ATTRIBUTE = "DICOM.PatientID"
PATIENT_LEVEL, DICOM_UID = "Patient", "DICOM"


def _mask_sha256(mask: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(np.ascontiguousarray(mask, dtype=bool)).tobytes() + str(mask.shape).encode()).hexdigest()


def mark_model_output(segmentation: object, labels: Image) -> None:
    """Record on the segmentation node the model's labels (and a hash per segment), kept in saved scenes.

    ``labels`` are the model's labels on the volume's grid (as the segmentation was made from). Later
    edits then show in :func:`IDEALTrain.io.reviewed.edited_regions`.
    """
    segmentation.SetAttribute(MODEL_LABELS_TAG, encode_labels(labels.array))
    for label in CARDIAC_LABELS:
        segmentation.SetAttribute(f"{MODEL_OUTPUT_TAG}.{label.segment_id}", _mask_sha256(labels.array == label.value))


def recorded_model_output(segmentation: object) -> np.ndarray | None:
    """The model's labels as recorded by :func:`mark_model_output`; None when nothing (or only hashes) was recorded."""
    text = segmentation.GetAttribute(MODEL_LABELS_TAG)
    return decode_labels(text) if text else None


def edited_structures(segmentation: object, labels: Image) -> list[str] | None:
    """Segment IDs whose voxels differ from the model's output by hash (scenes saved before labels were recorded);
    None when nothing was recorded."""
    edited, known = [], False
    for label in CARDIAC_LABELS:
        recorded = segmentation.GetAttribute(f"{MODEL_OUTPUT_TAG}.{label.segment_id}")
        known = known or recorded is not None
        if recorded is not None and recorded != _mask_sha256(labels.array == label.value):
            edited.append(label.segment_id)
    return edited if known else None


def patient_of_volume(node: object) -> str | None:
    """The DICOM patient ID of a volume (or sequence) node: its own attribute, else the subject hierarchy.

    Slicer's DICOM import puts the image under a patient item whose ``DICOM.PatientID`` attribute (or
    DICOM UID) holds it; the node itself has none. None when no id can be found.
    """
    if node is None or not hasattr(node, "GetAttribute"):
        return None
    value = node.GetAttribute(PATIENT_ATTRIBUTE)
    if value:
        return value
    scene = node.GetScene()
    if scene is None:
        return None
    import slicer

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return None
    item, root = hierarchy.GetItemByDataNode(node), hierarchy.GetSceneItemID()
    while item and item != root:
        value = hierarchy.GetItemAttribute(item, PATIENT_ATTRIBUTE)
        if not value and hierarchy.GetItemLevel(item) == PATIENT_LEVEL:
            value = hierarchy.GetItemUID(item, DICOM_UID) or hierarchy.GetItemName(item)
        if value:
            return value
        item = hierarchy.GetItemParent(item)
    return None
