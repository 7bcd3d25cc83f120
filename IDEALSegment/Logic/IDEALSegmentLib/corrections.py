"""Clinician-corrected segmentations in the scene -> the corrections data set that ``idealtrain finetune`` reads.

The data set format and its writer are :mod:`IDEALTrain.io.corrections` (``idealtrain
export-corrections`` writes the same from files); this module reads the image, the corrected labels,
what was reviewed and the patient from MRML nodes. Exporting reads the scene and never changes it.
The scans behind a reviewed case join the unlabelled pool at export (the whole cine for a cine
frame, else the volume itself): retraining then keeps the old model's predictions on them
(consistency and distillation), which is what protects it from forgetting.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from IDEALTrain.errors import IdealError
from IDEALTrain.io.corrections import (  # noqa: F401  (re-exported: the Logic's one import for the data set)
    LABELED,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    SUFFIX,
    UNLABELED,
    add_unlabeled_image,
    check_case_id,
    dataset_summary,
    pool_count,
    read_manifest,
    safe_case_id,
    voxel_sha256,
    write_case,
)
from IDEALTrain.io.image import Image
from IDEALTrain.io.reviewed import check_slices, default_reviewed, reviewed_regions
from IDEALTrain.labels import CARDIAC_LABELS

from .review import edited_structures, patient_of_volume, recorded_model_output
from .segmentations import labels_from_segmentation, read_provenance
from .volumes import check_scalar_volume, image_from_volume, node_label


def _case_id(case_id: str | None, volume: object) -> str:
    """The given id (checked) or one derived from the volume's name."""
    return check_case_id(case_id, volume.GetName())


# -- export -----------------------------------------------------------------------------------
def _source(volume: object) -> dict:
    """Where the image came from: node name and the file it was loaded from or saved to."""
    storage = volume.GetStorageNode()
    file_name = storage.GetFileName() if storage is not None else None
    return {"volume_name": volume.GetName(), "storage_file": Path(file_name).name if file_name else None}


def reviewed_of(
    segmentation: object, labels: Image,
    reviewed_structures: Sequence[str] | Mapping[str, Sequence[int]] | None = None,
    reviewed_slices: Sequence[int] | None = None,
) -> tuple[dict[str, list[int]], str]:
    """(segment ID -> reviewed slices, the rule that chose them) for a corrected segmentation.

    Ticked structures (a list: each on the reviewed slices where the labels have it; a mapping: as
    given). Otherwise the default marking: the structures the clinician edited, on the slices edited
    (:func:`IDEALTrain.io.reviewed.default_reviewed`); ``reviewed_slices`` replaces the edited slices.
    Without a recorded model output every structure counts.
    """
    slices = check_slices(reviewed_slices, labels)
    if reviewed_structures is not None:
        return reviewed_regions(labels, reviewed_structures, slices), "chosen structures"
    model_output = recorded_model_output(segmentation)
    if model_output is not None:
        return default_reviewed(model_output, labels, slices), "edited structures on the edited slices"
    edited = edited_structures(segmentation, labels)  # a scene saved before the model's labels were recorded
    if edited is not None:
        return reviewed_regions(labels, edited, slices), "edited structures"
    every = [label.segment_id for label in CARDIAC_LABELS]
    return reviewed_regions(labels, every, slices), "every structure (the model's output was not recorded)"


def corrected_case(volume: object, segmentation: object) -> tuple[Image, Image]:
    """(image, corrected labels on its grid) of a volume and its reviewed segmentation, both checked."""
    check_scalar_volume(volume, allow_labelmap=False)
    if segmentation is None or not hasattr(segmentation, "IsA") or not segmentation.IsA("vtkMRMLSegmentationNode"):
        raise IdealError("no corrected segmentation selected: choose the segmentation node you reviewed")
    contents = segmentation.GetSegmentation()
    missing = [label.segment_id for label in CARDIAC_LABELS if contents.GetSegment(label.segment_id) is None]
    if missing:
        raise IdealError(
            f"segmentation {node_label(segmentation)} has no segment with ID {', '.join(missing)} (it has "
            f"{', '.join(contents.GetSegmentIDs()) or 'none'}): correct a segmentation made by IDEALSegment, whose "
            "segments keep those IDs when renamed, or copy your segments into it"
        )
    image = image_from_volume(volume, allow_labelmap=False)
    labels = labels_from_segmentation(segmentation, volume, CARDIAC_LABELS)
    if not labels.array.any():
        raise IdealError(
            f"segmentation {node_label(segmentation)} is empty on volume {node_label(volume)}: nothing to learn from; "
            "add the volume as unlabelled instead"
        )
    return image, labels


def export_correction(
    dataset_dir: str | Path,
    volume: object,
    segmentation: object,
    *,
    case_id: str | None = None,
    reviewer: str = "",
    reviewed_slices: Sequence[int] | None = None,
    reviewed_structures: Sequence[str] | Mapping[str, Sequence[int]] | None = None,
    patient_id: str | None = None,
    overwrite: bool = False,
    scans: object | None = None,
    pool: bool = True,
) -> Path:
    """Add a reviewed case (image + corrected labels) to a corrections data set; return its label file.

    Labels are read back through the standard segment IDs on the volume's grid. What was reviewed:
    see :func:`reviewed_of`. ``patient_id`` groups cases for the patient-level hold-out (default: the
    volume's or the cine's patient in the subject hierarchy, else the cine's name, else the case id). With ``pool`` the scans behind the
    case join the unlabelled pool: ``scans`` (the cine the frame belongs to: ``<cine>_scan_frameNN``)
    or the volume itself (``<case>_scan``), each scan once.
    """
    case = _case_id(case_id, volume)
    image, labels = corrected_case(volume, segmentation)
    reviewed, rule = reviewed_of(segmentation, labels, reviewed_structures, reviewed_slices)
    if not reviewed:
        raise IdealError(
            f"nothing reviewed on {node_label(volume)}: no edited or checked structure has voxels on the reviewed slices; "
            "tick the structures you reviewed in Mark reviewed"
        )
    provenance = read_provenance(segmentation)
    patient = (patient_id or patient_of_volume(volume) or patient_of_volume(scans)
               or (safe_case_id(scans.GetName()) if scans is not None else case))  # a cine's frames: one patient
    path = write_case(
        dataset_dir, image, labels, reviewed, case_id=case, rule=rule, source=_source(volume), reviewer=reviewer,
        patient_id=patient, overwrite=overwrite,
        model=None if provenance is None else {
            "model_id": provenance.model_id, "model_version": provenance.model_version, "created": provenance.created,
        },
    )
    if pool and scans is not None:
        add_to_pool(dataset_dir, scans, f"{safe_case_id(scans.GetName())}_scan", patient_id=patient, skip_known=True)
    elif pool:
        add_unlabeled_volume(dataset_dir, volume, f"{case}_scan", patient_id=patient, overwrite=overwrite, skip_known=True)
    return path


def add_unlabeled_volume(
    dataset_dir: str | Path, volume: object, case_id: str | None = None, *, overwrite: bool = False,
    patient_id: str | None = None, skip_known: bool = False,
) -> Path | None:
    """Add a volume without labels (for the unlabelled term of finetuning); return its image file
    (None when ``skip_known`` and the pool already holds the same voxels)."""
    check_scalar_volume(volume, allow_labelmap=False)
    case = _case_id(case_id, volume)
    image = image_from_volume(volume, allow_labelmap=False)
    return add_unlabeled_image(
        dataset_dir, image, case, source=_source(volume), patient_id=patient_id or patient_of_volume(volume),
        overwrite=overwrite, skip_known=skip_known,
    )


def add_to_pool(
    dataset_dir: str | Path, node: object, case_id: str | None = None, *, patient_id: str | None = None, skip_known: bool = False,
) -> list[Path]:
    """Add a loaded volume, or every frame of a cine (sequence node), to the unlabelled pool; return the files added.

    A cine's frames become cases ``<case>_frameNN`` of one patient (its DICOM patient, else the cine's
    name); a case already in the pool is refused (choose another id) unless ``skip_known``, which
    skips scans whose voxels the pool already holds.
    """
    from .cine import is_cine, sequence_frames

    if is_cine(node):
        case = _case_id(case_id, node)
        patient = patient_id or patient_of_volume(node) or case
        frames = sequence_frames(node)
        added = [
            add_unlabeled_volume(dataset_dir, frame, f"{case}_frame{index:02d}", patient_id=patient, skip_known=skip_known)
            for index, frame in enumerate(frames)
        ]
    else:
        added = [add_unlabeled_volume(dataset_dir, node, case_id, patient_id=patient_id, skip_known=skip_known)]
    return [path for path in added if path is not None]
