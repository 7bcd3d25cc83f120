"""The corrections data set (the training-folder format of a clinician's reviewed cases), without Slicer.

The IDEALSegment Logic (from MRML nodes) and ``idealtrain export-corrections`` (from files) both write
it through :func:`write_case` and :func:`add_unlabeled_image`. Layout of a data set ``DIR``
(``folder:DIR`` labelled, ``folder:DIR/unlabeled`` unlabelled)::

    DIR/images/<case>.nii.gz            image of a reviewed case (exact geometry)
    DIR/labels/<case>.nii.gz            its corrected labels (0 background, 1 RV, 2 LV myocardium, 3 LV)
    DIR/unlabeled/images/<case>.nii.gz  volumes without labels, for the unlabelled (consistency) term
    DIR/manifest.json                   one entry per case: where it came from, who reviewed it, what was reviewed

What was reviewed is recorded per case as ``reviewed``: segment ID -> slice indices (along the
image's slice axis) on which the clinician checked that structure. Retraining takes labels only
there (:mod:`IDEALTrain.training.partial_labels`); everything else trains as unlabelled.

Every file is written atomically, the manifest last; an existing case is replaced only when asked
(and the manifest keeps what was replaced).
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

from .. import __version__
from ..errors import IdealError
from ..labels import CARDIAC_LABELS
from .atomic import atomic_path
from .image import Image
from .volume_files import write_image

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


def check_case_id(case_id: str | None, name: str) -> str:
    """The given id (checked: it becomes a file name) or one derived from ``name`` (a node or file name)."""
    if case_id is None:
        return safe_case_id(name)
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



# -- writing cases ------------------------------------------------------------------------------
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




def write_case(
    dataset_dir: str | Path,
    image: Image,
    labels: Image,
    reviewed: Mapping[str, Sequence[int]],
    *,
    case_id: str,
    rule: str,
    source: dict,
    reviewer: str = "",
    patient_id: str | None = None,
    model: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Add a reviewed case (image + corrected labels + what was reviewed) to a data set; return its label file.

    ``reviewed``: segment ID -> slice indices (see :mod:`IDEALTrain.io.reviewed`); ``rule`` says how
    it was chosen; ``patient_id`` groups cases for the patient-level hold-out (default: the case id).
    """
    case = check_case_id(case_id, case_id)
    if image.array.shape != labels.array.shape:
        raise IdealError(f"case {case}: the labels have shape {labels.array.shape} but the image {image.array.shape}: not the same grid")
    if not labels.array.any():
        raise IdealError(f"case {case}: the corrected labels are empty: nothing to learn from; add the image as unlabelled instead")
    reviewed = {name: [int(k) for k in slices] for name, slices in reviewed.items() if slices}
    if not reviewed:
        raise IdealError(
            f"nothing reviewed on case {case}: no edited or checked structure has voxels on the reviewed slices; "
            "tick (or name) the structures you reviewed"
        )
    root, document = _open_dataset(dataset_dir)
    files = {"image": f"images/{case}{SUFFIX}", "label": f"labels/{case}{SUFFIX}"}
    entry = {
        "case_id": case,
        "kind": LABELED,
        "files": files,
        "source": {**source, "image_sha256": voxel_sha256(image)},
        "model": model,
        "reviewer": reviewer,
        "exported_at": _now(),
        "slice_axis": image.slice_axis,
        "reviewed_slices": sorted({k for ks in reviewed.values() for k in ks}),
        "reviewed": reviewed,
        "reviewed_rule": rule,
        "patient_id": patient_id or case,
        "label_voxels": {label.segment_id: int(np.count_nonzero(labels.array == label.value)) for label in CARDIAC_LABELS},
        "size": list(image.size),
        "spacing": list(image.spacing),
        "idealtrain_version": __version__,
    }
    _commit(root, document, entry, {files["image"]: image, files["label"]: labels}, overwrite)
    return root / files["label"]


def add_unlabeled_image(
    dataset_dir: str | Path, image: Image, case_id: str, *, source: dict, patient_id: str | None = None,
    overwrite: bool = False, skip_known: bool = False,
) -> Path | None:
    """Add an image without labels to the unlabelled pool; return its file (None when ``skip_known`` and the pool
    already holds the same voxels: adding the scans behind every reviewed frame of a cine then adds the cine once)."""
    case = check_case_id(case_id, case_id)
    digest = voxel_sha256(image)
    root, document = _open_dataset(dataset_dir)
    if skip_known and any(
        entry["kind"] == UNLABELED and (entry.get("source") or {}).get("image_sha256") == digest for entry in document["cases"]
    ):
        return None
    files = {"image": f"unlabeled/images/{case}{SUFFIX}"}
    entry = {
        "case_id": case,
        "kind": UNLABELED,
        "files": files,
        "source": {**source, "image_sha256": digest},
        "patient_id": patient_id,
        "exported_at": _now(),
        "size": list(image.size),
        "spacing": list(image.spacing),
        "idealtrain_version": __version__,
    }
    _commit(root, document, entry, {files["image"]: image}, overwrite)
    return root / files["image"]


def pool_count(dataset_dir: str | Path) -> int:
    """How many unlabelled volumes the pool holds (0 for a folder that is no data set yet)."""
    if not _manifest_path(dataset_dir).is_file():
        return 0
    return sum(case["kind"] == UNLABELED for case in read_manifest(dataset_dir))


# -- training from a data set -------------------------------------------------------------------
def case_reviewed(entry: dict) -> dict[str, list[int] | None]:
    """Segment ID -> reviewed slices of a manifest entry; a version-1 entry (no record) was reviewed everywhere (None)."""
    reviewed = entry.get("reviewed")
    if reviewed is None:
        return {label.segment_id: entry.get("reviewed_slices") for label in CARDIAC_LABELS}
    return reviewed


def reviewed_training_labels(labels: Image, entry: dict) -> Image:
    """A case's labels kept only where reviewed (partial labels, see :mod:`IDEALTrain.training.partial_labels`)."""
    from ..training.partial_labels import reviewed_labels

    values = {item.segment_id: item.value for item in CARDIAC_LABELS}
    every = list(range(labels.array.shape[labels.slice_axis]))
    reviewed = {values[name]: every if slices is None else slices for name, slices in case_reviewed(entry).items()}
    return labels.with_array(reviewed_labels(labels.array, reviewed, labels.slice_axis, len(CARDIAC_LABELS) + 1))


def is_corrections_dataset(folder: str | Path) -> bool:
    """Whether a folder holds a corrections data set (its manifest)."""
    return _manifest_path(folder).is_file()


def apply_reviewed(cases: list, dataset_dir: str | Path) -> list:
    """The labelled cases of a corrections data set with labels kept only where reviewed (what training may learn)."""
    from dataclasses import replace

    entries = {entry["case_id"]: entry for entry in read_manifest(dataset_dir) if entry["kind"] == LABELED}
    out = []
    for case in cases:
        entry = entries.get(case.name)
        if entry is None or case.label is None:
            raise IdealError(f"case {case.name} of {dataset_dir} is not a reviewed case of its manifest: export it with export-corrections")
        out.append(replace(case, label=reviewed_training_labels(case.label, entry)))
    return out


def corrections_provenance(entries: Sequence[dict]) -> dict:
    """What a new model's card records about the corrections it learnt from: cases, patients, reviewers, structures."""
    return {
        "cases": [
            {"case_id": e["case_id"], "patient_id": e.get("patient_id"), "reviewer": e.get("reviewer") or None,
             "structures": sorted(name for name, slices in case_reviewed(e).items() if slices != []),
             "reviewed": case_reviewed(e), "source_sha256": (e.get("source") or {}).get("image_sha256")}
            for e in entries
        ],
        "reviewers": sorted({e.get("reviewer") for e in entries if e.get("reviewer")}),
        "patients": len({e.get("patient_id") or e["case_id"] for e in entries}),
    }
