"""Sunnybrook Cardiac Data (expert LV contours on short-axis cine DICOM) as ED/ES image + label volumes.

Layout under a root folder: ``dicoms/SCD0000X01/N.dcm``, ``contourfiles/SC-HF-I-*/i-contours/
IM-0001-NNNN-icontour-manual.txt`` (endocardium) and ``o-contours/...-ocontour-manual.txt``
(epicardium), ``link.csv`` mapping the two folder names. Image ``N.dcm`` pairs with contour number N.

Phases: the series splits into cine frames (see :func:`dicom_series.group_frames`); exactly two
frames carry contours. End-diastole is the one with the larger LV blood-pool volume, end-systole the
other (the clinical definition). On this data that is also the frame with the epicardial contours and
the later trigger time (ED 623-976 ms, ES 224-315 ms after the R wave).

Labels (ACDC convention, no RV): 3 = LV blood pool (inside the inner contour), 2 = LV myocardium
(inside the outer contour, outside the inner one), 0 otherwise. Myocardium is labelled only on slices
with a usable outer contour (``myocardium_slices``): never at ES, where none is drawn, and never where
the outer contour does not enclose the inner one. That rule drops all of SCD0000501's (SC-HF-I-6)
outer contours: they are byte-identical copies of SCD0000101's (SC-HF-I-1) and lie 12-20 pixels off
that patient's heart, so SCD0000501 has blood-pool labels only.

Contour files hold ``x y`` pixel coordinates counted from 1 (x = column, y = row; MATLAB's
convention): :func:`read_contour` subtracts 1, so its points are ITK / scikit-image continuous indices
(integer values at pixel centres) and a pixel is labelled when its centre is inside the polygon. The
origin was settled against the images themselves: shifting the 96 endocardial contours over a
quarter-pixel grid, the blood-pool edge is strongest at (-1, -1) pixel from the written points
(bootstrap 95 % interval -1 to -0.75 in both x and y; ``benchmarks/contour_alignment.py``). Used as
written, the labels sat one pixel off the heart towards +x, +y.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import IdealError
from .dicom_series import DicomSlice, group_frames, read_slices, series_slices, sort_slices
from .image import Image

LV_BLOOD_POOL = 3
LV_MYOCARDIUM = 2
MIN_CONTAINMENT = 0.98  # share of the inner contour's pixels an outer contour must enclose to be used
_TIE_BREAK = np.array([1e-6, 0.7e-6])  # (x, y) pixels: far below any real precision, breaks exact ties
CONTOUR_ORIGIN = 1.0  # the files' pixel index of the first pixel centre (see the module docstring)


@dataclass(frozen=True)
class SunnybrookPhase:
    """One contoured cardiac phase of a patient: image, label on the same grid, and its sources."""

    patient: str
    phase: str  # "ED" or "ES"
    image: Image
    label: Image
    files: tuple[Path, ...]  # DICOM file of each slice k
    contour_files: tuple[Path, ...]
    myocardium_slices: tuple[bool, ...]  # per slice k: a usable outer contour, so label 2 is annotated


def _links(root: Path) -> dict[str, str]:
    """patient id (dicoms/ folder) -> contour folder name, from link.csv."""
    path = root / "link.csv"
    if not path.is_file():
        raise IdealError(
            f"{path} not found: point to the Sunnybrook folder that holds link.csv, dicoms/ and contourfiles/"
        )
    with path.open(newline="") as handle:
        return {row["patient_id"].strip(): row["original_id"].strip() for row in csv.DictReader(handle)}


def list_sunnybrook_patients(root: str | Path) -> list[str]:
    """Patient ids (e.g. "SCD0000101") listed in link.csv, sorted."""
    return sorted(_links(Path(root)))


def read_contour(path: str | Path) -> np.ndarray:
    """Polygon of a contour file as an (N, 2) array of 0-based (x = column, y = row) pixel indices."""
    try:
        points = np.loadtxt(path, ndmin=2)
    except (OSError, ValueError) as error:
        raise IdealError(f"cannot read contour file {path}: {error}") from None
    if points.shape[1] != 2 or len(points) < 3:
        raise IdealError(f"{path} is not a contour file of 'x y' lines (got shape {points.shape})")
    return points - CONTOUR_ORIGIN


def contour_mask(points_xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean (rows, columns) mask of the pixels whose centres lie inside the polygon.

    Sunnybrook points lie on a half-pixel lattice, so many pixel centres fall exactly on the contour;
    scikit-image counts all of them as inside (masks 2.4 % larger than the polygon area on this data).
    Nudging the polygon by ``_TIE_BREAK`` pixel splits those ties evenly (mask area = polygon area).
    """
    try:
        from skimage.draw import polygon2mask
    except ImportError:
        raise IdealError("reading Sunnybrook contours needs scikit-image: pip install scikit-image") from None
    return polygon2mask(shape, (np.asarray(points_xy, float) + _TIE_BREAK)[:, ::-1])


def _contours(folder: Path, dicom: DicomSlice) -> tuple[Path | None, Path | None]:
    """(inner, outer) contour files of one DICOM image, None where absent."""
    try:
        number = int(dicom.path.stem)
    except ValueError:
        raise IdealError(f"{dicom.path}: Sunnybrook images are named N.dcm, N being the image number") from None
    inner = folder / "i-contours" / f"IM-0001-{number:04d}-icontour-manual.txt"
    outer = folder / "o-contours" / f"IM-0001-{number:04d}-ocontour-manual.txt"
    return (inner if inner.is_file() else None, outer if outer.is_file() else None)


def read_sunnybrook_patient(root: str | Path, patient_id: str) -> list[SunnybrookPhase]:
    """The ED and ES phases (in that order) of one patient, id as in link.csv (either column)."""
    root = Path(root)
    links = _links(root)
    patient = {v: k for k, v in links.items()}.get(patient_id, patient_id)
    if patient not in links:
        raise IdealError(f"Sunnybrook patient {patient_id} not in link.csv; known: {', '.join(sorted(links))}")
    contour_folder = root / "contourfiles" / links[patient]
    stacks = []
    for frame in group_frames(series_slices(root / "dicoms" / patient)):
        contours = [_contours(contour_folder, s) for s in frame]
        if any(inner for inner, _ in contours):
            stacks.append(_stack(patient, frame, contours))
    if len(stacks) != 2:
        raise IdealError(
            f"Sunnybrook patient {patient}: expected endocardial contours on two cine frames (ED and ES), "
            f"found them on {len(stacks)}"
        )
    es, ed = sorted(stacks, key=lambda p: np.sum(p.label.array == LV_BLOOD_POOL) * np.prod(p.label.spacing))
    return [replace(ed, phase="ED"), replace(es, phase="ES")]


def _stack(
    patient: str, frame: list[DicomSlice], contours: list[tuple[Path | None, Path | None]]
) -> SunnybrookPhase:
    """Stack the slices of one frame that have an inner contour; rasterise their contours on that grid.

    The phase name is left empty for the caller, which decides ED / ES by volume.
    """
    by_path = {s.path: c for s, c in zip(frame, contours)}
    try:
        ordered = sort_slices([s for s, (inner, _) in zip(frame, contours) if inner])
    except IdealError as error:
        raise IdealError(
            f"Sunnybrook patient {patient}: the contoured slices of a phase do not form a regular stack ({error})"
        ) from None
    image = read_slices(ordered)
    label = np.zeros(image.array.shape, np.uint8)
    used: list[Path] = []
    with_myocardium: list[bool] = []
    for k, dicom in enumerate(ordered):
        inner_path, outer_path = by_path[dicom.path]
        inner = contour_mask(read_contour(inner_path), label.shape[1:])
        outer = None if outer_path is None else contour_mask(read_contour(outer_path), label.shape[1:])
        usable = outer is not None and np.sum(inner & outer) >= MIN_CONTAINMENT * np.sum(inner)
        if usable:
            label[k][outer] = LV_MYOCARDIUM
            used.append(outer_path)
        label[k][inner] = LV_BLOOD_POOL
        used.append(inner_path)
        with_myocardium.append(bool(usable))
    return SunnybrookPhase(
        patient=patient,
        phase="",
        image=image,
        label=image.with_array(label),
        files=tuple(s.path for s in ordered),
        contour_files=tuple(used),
        myocardium_slices=tuple(with_myocardium),
    )
