"""What a clinician reviewed on a case: which structures, on which slices; and which ones they edited.

A segmentation made by the model can be fingerprinted (:func:`mark_model_output`); at export the
structures whose voxels changed are the edited ones (:func:`edited_structures`), the default set of
reviewed structures. :func:`reviewed_regions` turns structures into segment ID -> slice indices.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from IDEALTrain.errors import IdealError
from IDEALTrain.io.image import Image
from IDEALTrain.labels import CARDIAC_LABELS

#: Node attribute prefix (+ ".<segment ID>"): SHA-256 of a segment's voxels as the model drew it.
MODEL_OUTPUT_TAG = "IDEALSegment.ModelOutputSHA256"
PATIENT_ATTRIBUTE = "DICOM.PatientID"


def check_slices(reviewed: Sequence[int] | None, image: Image) -> list[int] | None:
    """Sorted unique slice indices along the image's slice axis, checked against its size."""
    if reviewed is None:
        return None
    count = image.array.shape[image.slice_axis]
    slices = []
    for index in reviewed:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise IdealError(f"reviewed slice {index!r} is not a slice index (an integer)")
        if not 0 <= int(index) < count:
            raise IdealError(f"reviewed slice {index} is outside the volume's {count} slices (0-{count - 1})")
        slices.append(int(index))
    return sorted(set(slices))


def _mask_sha256(mask: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(np.ascontiguousarray(mask, dtype=bool)).tobytes() + str(mask.shape).encode()).hexdigest()


def mark_model_output(segmentation: object, labels: Image) -> None:
    """Record on the segmentation node a hash of each cardiac segment's voxels as the model drew it (kept in saved scenes).

    ``labels`` are the model's labels on the volume's grid (as the segmentation was made from). Later
    edits then show in :func:`edited_structures`.
    """
    for label in CARDIAC_LABELS:
        segmentation.SetAttribute(f"{MODEL_OUTPUT_TAG}.{label.segment_id}", _mask_sha256(labels.array == label.value))


def edited_structures(segmentation: object, labels: Image) -> list[str] | None:
    """Segment IDs whose voxels differ from the model's output; None when the model's output was not recorded."""
    edited, known = [], False
    for label in CARDIAC_LABELS:
        recorded = segmentation.GetAttribute(f"{MODEL_OUTPUT_TAG}.{label.segment_id}")
        known = known or recorded is not None
        if recorded is not None and recorded != _mask_sha256(labels.array == label.value):
            edited.append(label.segment_id)
    return edited if known else None


def reviewed_regions(
    labels: Image, structures: Sequence[str] | Mapping[str, Sequence[int]], slices: Sequence[int] | None = None
) -> dict[str, list[int]]:
    """Segment ID -> reviewed slices: a mapping is taken as given; a list of IDs means each one on every
    slice where the labels have it (only among ``slices`` when given)."""
    values = {label.segment_id: label.value for label in CARDIAC_LABELS}
    unknown = [name for name in structures if name not in values]
    if unknown:
        raise IdealError(f"unknown structure(s) {unknown}: reviewed structures are segment IDs {', '.join(values)}")
    if isinstance(structures, Mapping):
        return {name: check_slices(list(ks), labels) for name, ks in structures.items() if ks}
    axis = labels.slice_axis
    other = tuple(a for a in range(3) if a != axis)
    allowed = None if slices is None else set(check_slices(slices, labels))
    result = {}
    for name in structures:
        present = np.flatnonzero((labels.array == values[name]).any(axis=other))
        chosen = [int(k) for k in present if allowed is None or int(k) in allowed]
        if chosen:
            result[name] = chosen
    return result


def patient_of_volume(volume: object, case_id: str) -> str:
    """The volume's DICOM patient ID when it has one, else the case id (then the case is its own patient)."""
    value = volume.GetAttribute(PATIENT_ATTRIBUTE) if hasattr(volume, "GetAttribute") else None
    return value or case_id
