"""``idealtrain export-corrections``: an image and its corrected segmentation -> the corrections data set the Slicer
module writes (same manifest, same reviewed-structure and reviewed-slice record), for ``finetune --preset continue``."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from ..errors import IdealError

SEGMENTATION_SUFFIX = ".seg.nrrd"


def read_segmentation_file(path: str | Path, image) -> object:
    """Cardiac labels (0 background, 1 RV, 2 myocardium, 3 LV) on ``image``'s grid from a label map or a Slicer ``.seg.nrrd``.

    A ``.seg.nrrd`` is mapped by segment ID (RV, LV_Myocardium, LV: the IDs IDEALSegment's segments keep when
    renamed); a file on the same voxel lattice but cropped (Slicer saves segmentations cropped) is placed
    back onto the image's grid.
    """
    import SimpleITK as sitk

    from ..io.image import Image
    from ..io.volume_files import read_label
    from ..labels import CARDIAC_LABELS

    path = Path(path)
    if not path.exists():
        raise IdealError(f"{path} does not exist: give the corrected segmentation (NIfTI/NRRD label map or .seg.nrrd)")
    if str(path).lower().endswith(SEGMENTATION_SUFFIX):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            raw = reader.Execute()
        except RuntimeError as error:
            raise IdealError(f"{path}: not a readable .seg.nrrd ({str(error).strip().splitlines()[-1]})") from None
        if raw.GetNumberOfComponentsPerPixel() > 1:
            raise IdealError(f"{path}: its segments overlap (several layers): remove the overlap in Slicer's Segment Editor first")
        keys = set(reader.GetMetaDataKeys())
        ids = {int(m.group(1)): reader.GetMetaData(key) for key in keys if (m := re.fullmatch(r"Segment(\d+)_ID", key))}
        values = {label.segment_id: label.value for label in CARDIAC_LABELS}
        unknown = sorted(set(ids.values()) - set(values))
        if unknown or not ids:
            raise IdealError(
                f"{path}: segment IDs {unknown or 'none'} are not IDEALSegment's ({', '.join(values)}): correct a "
                "segmentation made by IDEALSegment (its segment IDs stay when renamed), or copy your segments into one"
            )
        stored = Image.from_sitk(raw)
        array = np.zeros(stored.array.shape, np.uint8)
        for index, segment_id in ids.items():
            value = int(reader.GetMetaData(f"Segment{index}_LabelValue")) if f"Segment{index}_LabelValue" in keys else index + 1
            array[stored.array == value] = values[segment_id]
        labels = stored.with_array(array)
    else:
        labels = read_label(path)
        extra = sorted(set(np.unique(labels.array).tolist()) - {0, *(label.value for label in CARDIAC_LABELS)})
        if extra:
            raise IdealError(f"{path}: label values {extra} are not cardiac labels (0 background, 1 RV, 2 myocardium, 3 LV)")
    if labels.same_grid(image):
        return labels
    same_lattice = np.allclose(labels.spacing, image.spacing, atol=1e-3) and np.allclose(labels.direction, image.direction, atol=1e-4)
    if not same_lattice:
        raise IdealError(
            f"{path} is not on the image's voxel grid (spacing {tuple(labels.spacing)} vs {tuple(image.spacing)}): "
            "give the segmentation made on this image"
        )
    placed = sitk.Resample(labels.to_sitk(), image.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    result = image.with_array(sitk.GetArrayFromImage(placed).astype(np.uint8))
    if np.count_nonzero(result.array) != np.count_nonzero(labels.array):
        raise IdealError(f"{path} reaches outside the image: give the segmentation made on this image")
    return result


def dicom_patient_id(path: Path) -> str | None:
    """The PatientID of a DICOM folder's first image (SimpleITK reads the header), None for anything else."""
    if not path.is_dir():
        return None
    import SimpleITK as sitk

    from ..io.dicom_series import series_slices

    try:
        first = series_slices(path, None)[0].path
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(first))
        reader.ReadImageInformation()
        if not reader.HasMetaDataKey("0010|0020"):
            return None
        return reader.GetMetaData("0010|0020").strip() or None
    except (IdealError, RuntimeError, IndexError):
        return None


def cmd_export_corrections(args: argparse.Namespace) -> None:
    """Write one reviewed case (and the scans behind it, to the pool) into a corrections data set."""
    from ..io.corrections import add_unlabeled_image, pool_count, safe_case_id, write_case
    from ..io.reviewed import default_reviewed, describe_reviewed, parse_slices, reviewed_regions
    from ..io.volume_files import read_frames, read_image, strip_volume_suffix
    from ..labels import CARDIAC_LABELS

    source = Path(args.image)
    image = read_image(source, args.frame)
    labels = read_segmentation_file(args.labels, image)
    if not labels.array.any():
        raise IdealError(f"{args.labels} is empty on {source}: nothing to learn from")
    stem = safe_case_id(strip_volume_suffix(source.name))
    case_id = args.case_id or (f"{stem}_frame{args.frame:02d}" if args.frame is not None else stem)
    slices = parse_slices(args.slices) if args.slices else None
    if args.structures:
        structures = [name.strip() for name in args.structures.split(",") if name.strip()]
        reviewed, rule = reviewed_regions(labels, structures, slices), "chosen structures"
    elif args.model_output:
        model = read_segmentation_file(args.model_output, image)
        reviewed, rule = default_reviewed(model.array, labels, slices), "edited structures on the edited slices"
    else:
        every = [label.segment_id for label in CARDIAC_LABELS]
        reviewed, rule = reviewed_regions(labels, every, slices), "every structure (no --model-output or --structures given)"
    # Frames of one cine are one patient: the DICOM patient, else the cine's (file or folder) name.
    patient = args.patient or dicom_patient_id(source) or stem
    path = write_case(
        args.out, image, labels, reviewed, case_id=case_id, rule=rule, reviewer=args.reviewer, patient_id=patient,
        source={"image_file": source.name, "labels_file": Path(args.labels).name, "frame": args.frame}, overwrite=args.overwrite,
    )
    added = 0
    if not args.no_pool:  # the scans behind the case: the whole cine of a frame, else the image itself
        scans = Path(args.scans) if args.scans else source
        frames = read_frames(scans) if (args.frame is not None or args.scans) else [image]
        scan_stem = safe_case_id(strip_volume_suffix(scans.name))
        for index, frame in enumerate(frames):
            scan_id = f"{scan_stem}_scan_frame{index:02d}" if len(frames) > 1 else f"{case_id}_scan"
            added += add_unlabeled_image(args.out, frame, scan_id, source={"image_file": scans.name, "frame": index},
                                         patient_id=patient, skip_known=True) is not None
    print(f"{case_id} (patient {patient}): teaches {describe_reviewed(reviewed)} ({rule})")
    print(f"wrote {path}; {added} scan(s) added to the unlabelled pool, which holds {pool_count(args.out)}")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Register export-corrections."""
    p = commands.add_parser(
        "export-corrections",
        help="add an image and its corrected segmentation to a corrections data set (what finetune --preset continue learns from)",
        description="Add one reviewed case to a corrections data set (the format IDEALSegment's Mark reviewed writes): "
        "the image, the corrected labels, which structures were reviewed on which slices, and the patient. "
        "By default the scans behind the case join the unlabelled pool (against forgetting).",
    )
    p.add_argument("--image", required=True, help="the image: NIfTI/NRRD/MHA file, 4D cine file, or DICOM folder")
    p.add_argument("--frame", type=int, help="the frame of a cine (4D file or cine DICOM folder)")
    p.add_argument("--labels", required=True, help="the corrected segmentation: label map (0/1 RV/2 myocardium/3 LV) or Slicer .seg.nrrd")
    p.add_argument("--model-output", help="the model's uncorrected labels: then the reviewed structures are the ones you edited, "
                   "on the slices where you edited them (default without it or --structures: every structure)")
    p.add_argument("--structures", help="the structures you reviewed, comma-separated segment IDs: RV,LV_Myocardium,LV")
    p.add_argument("--slices", help="the reviewed slices, e.g. 2-7,9 (default: where each structure is drawn, or was edited)")
    p.add_argument("--case-id", help="case id (default: the image's name, plus _frameNN for a cine frame)")
    p.add_argument("--patient", help="patient id for the patient-level hold-out (default: the DICOM PatientID, else the image's name)")
    p.add_argument("--reviewer", default="", help="who reviewed the case")
    p.add_argument("--scans", help="the scans behind the case for the unlabelled pool, e.g. the whole cine (default: the image, "
                   "or every frame of a cine image)")
    p.add_argument("--no-pool", action="store_true", help="do not add the scans to the unlabelled pool")
    p.add_argument("--overwrite", action="store_true", help="replace a case of the same id")
    p.add_argument("--out", required=True, help="the corrections data set folder (new, empty, or one written before)")
    p.set_defaults(func=cmd_export_corrections)
