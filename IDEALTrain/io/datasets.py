"""Data specifications (``folder:DIR``, ``ssl4mis:DIR[:LIST]``, ``sunnybrook:DIR``, ``dicom:DIR``,
``sample:DIR``: the shipped sample with its expert labels) as lists of cases.

A case is one volume (or one SSL4MIS slice) with its optional label, both carrying geometry. The
spec strings are part of the command-line contract.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import IdealError
from .image import Image
from .volume_files import VOLUME_SUFFIXES, has_volume_suffix, read_image, read_label, strip_volume_suffix

SPEC_KINDS = ("folder", "ssl4mis", "sunnybrook", "dicom", "sample")


@dataclass
class Case:
    """One image and, when known, its label map on the same grid."""

    name: str
    image: Image
    label: Image | None = None


def parse_spec(spec: str) -> tuple[str, Path, str | None]:
    """Split ``KIND:DIR[:LIST]`` into its parts, checking the kind and that DIR exists."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in SPEC_KINDS:
        raise IdealError(f"invalid data spec {spec!r}; use folder:DIR, ssl4mis:DIR[:LIST], sunnybrook:DIR, dicom:DIR or sample:DIR")
    path_text, _, list_name = rest.partition(":") if kind == "ssl4mis" else (rest, "", "")
    path = Path(path_text)
    if not path.is_dir():
        raise IdealError(f"data spec {spec!r}: folder {path} does not exist")
    return kind, path, list_name or None


def load_folder_cases(root: Path, require_labels: bool = False) -> list[Case]:
    """``root/images/NAME.ext`` with ``root/labels/NAME.ext`` (labels optional unless required)."""
    images_dir, labels_dir = root / "images", root / "labels"
    if not images_dir.is_dir():
        raise IdealError(f"{root}: a folder dataset needs an images/ subfolder (and labels/ with the same file names)")
    labels = {strip_volume_suffix(p.name): p for p in labels_dir.iterdir() if has_volume_suffix(p)} if labels_dir.is_dir() else {}
    cases = []
    for path in sorted(p for p in images_dir.iterdir() if has_volume_suffix(p)):
        name = strip_volume_suffix(path.name)
        image = read_image(path)
        label = read_label(labels[name]) if name in labels else None
        if label is None and require_labels:
            raise IdealError(f"{path}: no matching label in {labels_dir} (expected a file named {name}.*)")
        if label is not None and not image.same_grid(label):
            raise IdealError(f"{labels[name]}: label grid (size/spacing/origin/direction) differs from its image {path}")
        cases.append(Case(name, image, label))
    if not cases:
        raise IdealError(f"{images_dir}: no images found ({', '.join(VOLUME_SUFFIXES)})")
    return cases


def load_ssl4mis_cases(root: Path, list_name: str) -> list[Case]:
    """The volumes or slices named by an SSL4MIS list file (e.g. val.list, train_slices.list)."""
    from .ssl4mis import list_cases, read_case

    return [Case(case.name, *read_case(case)) for case in list_cases(root, list_name)]


def load_sunnybrook_cases(root: Path) -> list[Case]:
    """Every Sunnybrook patient's ED and ES volumes with labels from the expert contours."""
    from .sunnybrook import list_sunnybrook_patients, read_sunnybrook_patient

    cases = []
    for patient in list_sunnybrook_patients(root):
        for phase in read_sunnybrook_patient(root, patient):
            cases.append(Case(f"{patient}_{phase.phase}", phase.image, phase.label))
    return cases


def load_sample_cases(root: Path) -> list[Case]:
    """The shipped sample's ED and ES volumes on the slices the expert drew, with the expert's labels (no contour
    rasterising: works in Slicer)."""
    from .sample_data import load_sample, read_sample_labels, read_sample_phase

    sample = load_sample(root)
    return [Case(f"{sample.patient}_{phase}", read_sample_phase(sample, phase, contoured_only=True), read_sample_labels(sample, phase))
            for phase in ("ED", "ES")]


def load_dicom_cases(root: Path) -> list[Case]:
    """Every frame of every DICOM series under ``root``, unlabelled (e.g. for pretraining)."""
    from .dicom_series import list_series, read_dicom_frames

    cases = []
    for series in list_series(root):
        frames = read_dicom_frames(root, series.uid)
        for index, image in enumerate(frames):
            suffix = f"_frame{index:02d}" if len(frames) > 1 else ""
            cases.append(Case(f"{series.uid}{suffix}", image))
    return cases


def load_cases(spec: str, *, default_list: str = "val.list", require_labels: bool = False) -> list[Case]:
    """Load every case a data spec names."""
    kind, path, list_name = parse_spec(spec)
    if kind == "folder":
        return load_folder_cases(path, require_labels)
    if kind == "ssl4mis":
        cases = load_ssl4mis_cases(path, list_name or default_list)
    elif kind == "sunnybrook":
        cases = load_sunnybrook_cases(path)
    elif kind == "sample":
        cases = load_sample_cases(path)
    else:
        cases = load_dicom_cases(path)
    if require_labels:
        missing = [case.name for case in cases if case.label is None]
        if missing:
            raise IdealError(f"{spec}: {len(missing)} case(s) have no label, e.g. {missing[:3]}")
    return cases
