"""DICOM Segmentation (SEG) objects through ``highdicom``: what PACS and DICOM viewers read.

A SEG written here references the source images it was drawn on (their SOP Instance UIDs, series
and Frame of Reference), carries one segment per structure of the label map with its SNOMED CT
terminology code (category Anatomical Structure), and holds one frame per source slice and segment.
The label array is on the source images' own grid (k = the k-th slice along the stack normal, as
:func:`IDEALTrain.io.dicom_series.read_slices` stacks them), so nothing is resampled.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import IdealError
from ..labels import ANATOMICAL_STRUCTURE, LabelInfo
from .atomic import atomic_path
from .image import Image

INSTALL_HINT = "DICOM SEG needs highdicom: pip install 'idealsegment[dicom]' (or pip install highdicom==0.28.2)"


def _highdicom():
    """The highdicom module, or an IdealError saying how to install it."""
    try:
        import highdicom
    except ImportError:
        raise IdealError(INSTALL_HINT) from None
    return highdicom


def _read_sources(files: Sequence[Path]) -> list:
    """The source images; dates a calendar cannot hold (anonymised ``00000000``, Sunnybrook's ``20120000``) blanked
    in memory, as highdicom copies the patient and study module into the SEG."""
    import datetime

    import pydicom

    sources = []
    with warnings.catch_warnings():  # e.g. scanners' UIDs with leading zeros: read as they are
        warnings.simplefilter("ignore")
        for path in files:
            ds = pydicom.dcmread(str(path))
            for keyword in ("PatientBirthDate", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
                value = str(ds.get(keyword, "") or "")
                try:
                    if value:
                        datetime.datetime.strptime(value, "%Y%m%d")
                except ValueError:
                    setattr(ds, keyword, "")
            sources.append(ds)
    return sources


def check_seg_sources(sources: Sequence) -> None:
    """Refuse source images a SEG cannot reference: no FrameOfReferenceUID, or several (datasets or file paths)."""
    import pydicom

    with warnings.catch_warnings():  # pydicom validates UIDs lazily, on access
        warnings.simplefilter("ignore")
        headers = [pydicom.dcmread(str(s), stop_before_pixels=True) if isinstance(s, (str, Path)) else s for s in sources]
        if any("FrameOfReferenceUID" not in ds for ds in headers):
            raise IdealError("a source DICOM image has no FrameOfReferenceUID: a DICOM SEG cannot reference its geometry")
        frames_of_reference = {str(ds.FrameOfReferenceUID) for ds in headers}
    if len(frames_of_reference) > 1:
        raise IdealError(
            f"the {len(headers)} source DICOM images carry {len(frames_of_reference)} different FrameOfReferenceUIDs "
            "(an anonymiser regenerated them?): a DICOM SEG must reference one frame of reference; write .seg.nrrd or "
            "NIfTI instead, or fix the series' FrameOfReferenceUID"
        )


def write_dicom_seg(
    labels: Image,
    source_files: Sequence[str | Path],
    path: str | Path,
    label_map: Sequence[LabelInfo],
    *,
    algorithm: tuple[str, str] = ("IDEALSegment", "unknown"),
    series_description: str = "IDEALSegment segmentation",
) -> Path:
    """Write ``labels`` (k, j, i) as a binary DICOM SEG over ``source_files`` (in stack order), atomically.

    ``algorithm`` is (model id, version): recorded as the segments' algorithm identification.
    """
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    sources = _read_sources([Path(p) for p in source_files])
    if len(sources) != labels.array.shape[0]:
        raise IdealError(f"the labels have {labels.array.shape[0]} slices but {len(sources)} source DICOM images were given")
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    if labels.array.shape[1:] != (rows, columns):
        raise IdealError(f"the labels' slices are {labels.array.shape[1:]} but the source images are {(rows, columns)}")
    check_seg_sources(sources)
    category_code, category_meaning = ANATOMICAL_STRUCTURE.split("^")[1:3]
    category = hd.sr.CodedConcept(category_code, "SCT", category_meaning)
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=algorithm[0], version=algorithm[1], family=codes.cid7162.ArtificialIntelligence
    )
    descriptions, planes = [], np.zeros(labels.array.shape, np.uint8)
    for number, info in enumerate(sorted(label_map, key=lambda label: label.value), start=1):
        planes[labels.array == info.value] = number
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=info.name,
            segmented_property_category=category,
            segmented_property_type=hd.sr.CodedConcept(info.snomed_code, "SCT", info.snomed_meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_id,
            tracking_id=info.segment_id,
            tracking_uid=hd.UID(),
            display_color=hd.color.CIELabColor.from_rgb(*(int(round(c * 255)) for c in info.color)),
        ))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=planes,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=max(int(sources[0].get("SeriesNumber", 0) or 0), 0) + 1000,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="IDEALSegment",
            manufacturer_model_name=algorithm[0],
            software_versions=algorithm[1],
            device_serial_number="none",
            series_description=series_description,
            omit_empty_frames=True,
        )
    path = Path(path)
    with atomic_path(path) as temp:
        seg.save_as(str(temp))
    return path


def read_dicom_seg(path: str | Path, source_uids: Sequence[str]) -> np.ndarray:
    """The label map (k, j, i) of a SEG over the source images ``source_uids`` (stack order): each voxel holds its
    segment number (the label map's values in increasing order are segments 1..n: the cardiac map's 1, 2, 3)."""
    hd = _highdicom()
    seg = hd.seg.segread(str(path))
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(source_uids), combine_segments=True, assert_missing_frames_are_empty=True,
    )
