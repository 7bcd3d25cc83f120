"""Clinician-corrected segmentations -> a training data set that ``idealtrain finetune`` reads.

Layout of a corrections data set ``DIR`` (``folder:DIR`` labelled, ``folder:DIR/unlabeled`` unlabelled)::

    DIR/images/<case>.nii.gz            image of a reviewed case (exact geometry)
    DIR/labels/<case>.nii.gz            its corrected labels (0 background, 1 RV, 2 LV myocardium, 3 LV)
    DIR/unlabeled/images/<case>.nii.gz  volumes without labels, for the unlabelled (consistency) term
    DIR/manifest.json                   one entry per case: where it came from, who reviewed it, what was reviewed

What was reviewed is recorded per case as ``reviewed``: segment ID -> slice indices (along the
image's slice axis) on which the clinician checked that structure. Retraining takes labels only
there (:mod:`IDEALTrain.training.partial_labels`); everything else trains as unlabelled.

Every file is written atomically, the manifest last; an existing case is replaced only when asked
(and the manifest keeps what was replaced). Exporting reads the scene and never changes it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import IDEALTrain
from IDEALTrain.errors import IdealError
from IDEALTrain.io.atomic import atomic_path
from IDEALTrain.io.image import Image
from IDEALTrain.io.volume_files import write_image
from IDEALTrain.labels import CARDIAC_LABELS

from .review import check_slices, edited_structures, patient_of_volume, reviewed_regions
from .segmentations import labels_from_segmentation, read_provenance
from .volumes import check_scalar_volume, image_from_volume, node_label

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "idealsegment-corrections"
MANIFEST_VERSION = 2  # 2 added per-case ``reviewed`` structures and slices, and ``patient_id``
LABELED, UNLABELED = "labeled", "unlabeled"
SUFFIX = ".nii.gz"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


# -- case ids and hashes ----------------------------------------------------------------------
def safe_case_id(name: str) -> str:
    """A file-name-safe case id from a node name: runs of other characters become '_'."""
    case_id = re.sub(r"[^A-Za-z0-9._-]+", "_", name or "").strip("._-")[:100]
    return case_id or "case"


def _case_id(case_id: str | None, volume: object) -> str:
    """The given id (checked) or one derived from the volume's name."""
    if case_id is None:
        return safe_case_id(volume.GetName())
    if not _SAFE_ID.match(case_id) or case_id.endswith("."):
        raise IdealError(
            f"case id {case_id!r} is not a safe file name: use letters, digits, '.', '_' and '-' "
            f"(at most 100, starting with a letter or digit), e.g. {safe_case_id(case_id)!r}"
        )
    return case_id


def voxel_sha256(image: Image) -> str:
    """SHA-256 of an image's voxels (dtype, shape and bytes): the same scan always hashes the same."""
    array = np.ascontiguousarray(image.array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


# -- manifest ---------------------------------------------------------------------------------
def _manifest_path(dataset_dir: str | Path) -> Path:
    return Path(dataset_dir) / MANIFEST_NAME


def _case_files(entry: dict) -> list[str]:
    files = entry.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(p, str) for p in files.values()):
        raise ValueError(f"case {entry.get('case_id')!r} has no valid 'files'")
    outside = [name for name in files.values() if Path(name).is_absolute() or ".." in Path(name).parts]
    if outside:
        raise ValueError(f"case {entry.get('case_id')!r} lists files outside the data set folder: {outside}")
    return list(files.values())


def _load_manifest(dataset_dir: Path) -> dict:
    """The manifest document, checked for format, entries and listed files (IdealError otherwise)."""
    path = _manifest_path(dataset_dir)
    if not path.is_file():
        raise IdealError(f"{dataset_dir} has no {MANIFEST_NAME}: it is not a corrections data set (export a correction into it first)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IdealError(f"{path} is corrupt ({error}): restore it from a backup, or export the cases into a new folder") from None
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise IdealError(f"{path} is not an IDEALSegment corrections manifest (format {MANIFEST_FORMAT!r})")
    if not isinstance(document.get("version"), int) or document["version"] > MANIFEST_VERSION:
        raise IdealError(
            f"{path} has manifest version {document.get('version')!r}; this IDEALSegment reads versions up to "
            f"{MANIFEST_VERSION}: update IDEALSegment"
        )
    cases = document.get("cases")
    if not isinstance(cases, list):
        raise IdealError(f"{path} is corrupt: 'cases' must be a list")
    seen: set[str] = set()
    missing: list[str] = []
    for entry in cases:
        try:
            if not isinstance(entry, dict) or not isinstance(entry.get("case_id"), str):
                raise ValueError(f"entry {entry!r} has no case_id")
            if entry.get("kind") not in (LABELED, UNLABELED):
                raise ValueError(f"case {entry['case_id']!r} has kind {entry.get('kind')!r}, not {LABELED!r} or {UNLABELED!r}")
            if entry["case_id"] in seen:
                raise ValueError(f"case {entry['case_id']!r} is listed twice")
            files = _case_files(entry)
        except ValueError as error:
            raise IdealError(f"{path} is corrupt: {error}") from None
        seen.add(entry["case_id"])
        missing += [name for name in files if not (dataset_dir / name).is_file()]
    if missing:
        raise IdealError(
            f"{path} lists {len(missing)} file(s) that are missing, e.g. {missing[:3]}: restore them, "
            "or remove their cases from the manifest"
        )
    return document


def _new_manifest() -> dict:
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "cases": []}


def _open_dataset(dataset_dir: str | Path) -> tuple[Path, dict]:
    """The data set folder and its manifest; a new or empty folder starts a new data set."""
    root = Path(dataset_dir)
    if root.exists() and not root.is_dir():
        raise IdealError(f"{root} is a file: choose a folder for the corrections data set")
    if _manifest_path(root).exists():
        return root, _load_manifest(root)
    if root.is_dir() and any(not p.name.startswith(".") for p in root.iterdir()):
        raise IdealError(
            f"{root} already holds files but no {MANIFEST_NAME}: it is not a corrections data set; "
            "choose an empty or new folder"
        )
    return root, _new_manifest()


def _write_manifest(root: Path, document: dict) -> None:
    with atomic_path(_manifest_path(root)) as temp:
        temp.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_manifest(dataset_dir: str | Path) -> list[dict]:
    """Every case entry of a corrections data set, after checking the manifest and its files."""
    return _load_manifest(Path(dataset_dir))["cases"]


def dataset_summary(dataset_dir: str | Path) -> dict:
    """Counts for a corrections data set: cases, reviewed slices, unlabelled volumes, drafting models."""
    cases = read_manifest(dataset_dir)
    try:
        labeled = [case for case in cases if case["kind"] == LABELED]
        models: dict[str, int] = {}
        for case in labeled:
            model = case.get("model")
            key = f"{model['model_id']} {model['model_version']}" if model else "drawn by hand"
            models[key] = models.get(key, 0) + 1
        return {
            "cases": len(labeled),
            "reviewed_slices": sum(len(case.get("reviewed_slices") or []) for case in labeled),
            "unlabeled_volumes": sum(case["kind"] == UNLABELED for case in cases),
            "patients": len({case.get("patient_id") or case["case_id"] for case in labeled}),
            "models": models,
            "reviewers": sorted({str(case.get("reviewer")) for case in labeled if case.get("reviewer")}),
        }
    except (KeyError, TypeError, AttributeError) as error:  # an entry of the wrong shape: a hand-edited manifest
        raise IdealError(f"{dataset_dir}: the corrections manifest is corrupt ({type(error).__name__}: {error})") from None


# -- export -----------------------------------------------------------------------------------
def _source(volume: object, image: Image) -> dict:
    """Where the image came from: node name, the file it was loaded from or saved to, voxel hash."""
    storage = volume.GetStorageNode()
    file_name = storage.GetFileName() if storage is not None else None
    return {
        "volume_name": volume.GetName(),
        "storage_file": Path(file_name).name if file_name else None,
        "image_sha256": voxel_sha256(image),
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _commit(root: Path, document: dict, entry: dict, images: dict[str, Image], overwrite: bool) -> None:
    """Write the case's files (staged, then renamed into place) and the manifest, last."""
    cases = document["cases"]
    previous = next((case for case in cases if case["case_id"] == entry["case_id"]), None)
    if previous is not None:
        if not overwrite:
            raise IdealError(
                f"case {entry['case_id']!r} is already in {root} (exported {previous.get('exported_at')}): "
                "choose another case id, or pass overwrite=True to replace it"
            )
        history = previous.get("replaced", [])
        summary = {key: previous.get(key) for key in ("kind", "exported_at", "reviewer", "model", "source")}
        entry["replaced"] = history + [summary]
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        staged = {relative: write_image(image, staging / f"{index}{SUFFIX}") for index, (relative, image) in enumerate(images.items())}
        for relative, path in staged.items():
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, root / relative)
        for stale in _case_files(previous) if previous is not None else []:
            if stale not in images:
                (root / stale).unlink(missing_ok=True)  # e.g. an unlabelled volume that now has labels
        document["cases"] = [case for case in cases if case is not previous] + [entry]
        _write_manifest(root, document)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
) -> Path:
    """Add a reviewed case (image + corrected labels) to a corrections data set; return its label file.

    Labels are read back through the standard segment IDs on the volume's grid. What was reviewed:
    ``reviewed_structures`` (segment IDs, each on every slice where the labels have it, or segment
    ID -> slices), by default the structures the clinician edited (see :func:`mark_model_output`),
    or every structure when the model's output was not recorded; ``reviewed_slices`` (indices along
    the slice axis) limits them. ``patient_id`` groups cases for a patient-level hold-out.
    """
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
    case = _case_id(case_id, volume)
    image = image_from_volume(volume, allow_labelmap=False)
    labels = labels_from_segmentation(segmentation, volume, CARDIAC_LABELS)
    if not labels.array.any():
        raise IdealError(
            f"segmentation {node_label(segmentation)} is empty on volume {node_label(volume)}: nothing to learn from; "
            "add the volume as unlabelled instead"
        )
    slices = check_slices(reviewed_slices, image)
    rule = "chosen structures"
    if reviewed_structures is None:
        edited = edited_structures(segmentation, labels)
        rule = "edited structures" if edited is not None else "every structure (the model's output was not recorded)"
        reviewed_structures = edited if edited is not None else [label.segment_id for label in CARDIAC_LABELS]
    reviewed = reviewed_regions(labels, reviewed_structures, slices)
    if not reviewed:
        raise IdealError(
            f"nothing reviewed on {node_label(volume)}: no edited or checked structure has voxels on the reviewed slices; "
            "tick the structures you reviewed in Mark reviewed"
        )
    root, document = _open_dataset(dataset_dir)
    provenance = read_provenance(segmentation)
    files = {"image": f"images/{case}{SUFFIX}", "label": f"labels/{case}{SUFFIX}"}
    entry = {
        "case_id": case,
        "kind": LABELED,
        "files": files,
        "source": _source(volume, image),
        "model": None if provenance is None else {
            "model_id": provenance.model_id, "model_version": provenance.model_version, "created": provenance.created,
        },
        "reviewer": reviewer,
        "exported_at": _now(),
        "slice_axis": image.slice_axis,
        "reviewed_slices": slices if slices is not None else sorted({k for ks in reviewed.values() for k in ks}),
        "reviewed": reviewed,
        "reviewed_rule": rule,
        "patient_id": patient_id or patient_of_volume(volume, case),
        "label_voxels": {label.segment_id: int(np.count_nonzero(labels.array == label.value)) for label in CARDIAC_LABELS},
        "size": list(image.size),
        "spacing": list(image.spacing),
        "idealtrain_version": IDEALTrain.__version__,
    }
    _commit(root, document, entry, {files["image"]: image, files["label"]: labels}, overwrite)
    return root / files["label"]


def add_unlabeled_volume(dataset_dir: str | Path, volume: object, case_id: str | None = None, *, overwrite: bool = False) -> Path:
    """Add a volume without labels (for the unlabelled term of finetuning); return its image file."""
    check_scalar_volume(volume, allow_labelmap=False)
    case = _case_id(case_id, volume)
    image = image_from_volume(volume, allow_labelmap=False)
    root, document = _open_dataset(dataset_dir)
    files = {"image": f"unlabeled/images/{case}{SUFFIX}"}
    entry = {
        "case_id": case,
        "kind": UNLABELED,
        "files": files,
        "source": _source(volume, image),
        "exported_at": _now(),
        "size": list(image.size),
        "spacing": list(image.spacing),
        "idealtrain_version": IDEALTrain.__version__,
    }
    _commit(root, document, entry, {files["image"]: image}, overwrite)
    return root / files["image"]


def add_to_pool(dataset_dir: str | Path, node: object, case_id: str | None = None) -> list[Path]:
    """Add a loaded volume, or every frame of a cine (sequence node), to the unlabelled pool; return the files.

    The only way scans enter the pool: nothing is copied without this call. A cine's frames become
    cases ``<case>_frameNN``; a case already in the pool is refused (choose another id).
    """
    from .cine import is_cine, sequence_frames

    if is_cine(node):
        case = _case_id(case_id, node)
        frames = sequence_frames(node)
        return [add_unlabeled_volume(dataset_dir, frame, f"{case}_frame{index:02d}") for index, frame in enumerate(frames)]
    return [add_unlabeled_volume(dataset_dir, node, case_id)]


def pool_count(dataset_dir: str | Path) -> int:
    """How many unlabelled volumes the pool holds (0 for a folder that is no data set yet)."""
    if not _manifest_path(dataset_dir).is_file():
        return 0
    return sum(case["kind"] == UNLABELED for case in read_manifest(dataset_dir))
