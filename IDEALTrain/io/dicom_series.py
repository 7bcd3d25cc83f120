"""DICOM series -> :class:`Image`, with the true geometry from the headers and cine awareness.

pydicom reads only the few header fields needed to choose, group and order files (series UID,
position, orientation, trigger time); SimpleITK reads and writes the voxels and the geometry, so
spacing, origin and direction come straight from ImagePositionPatient / ImageOrientationPatient /
PixelSpacing.

A cine series holds one image per cardiac phase at every slice position. Trigger times of the same
phase differ by a few ms between positions, so frames are never grouped by exact trigger time:
each position's images are sorted by TriggerTime (InstanceNumber when absent) and frame n is the
n-th image at every position. Writing series (test data, exports) lives in :mod:`.dicom_write`.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from ..errors import IdealError
from .image import Image

# Two images whose positions along the slice normal differ by less than this are at one position.
SAME_POSITION_MM = 0.01
# A slice step may differ from the mean step by this fraction before the stack counts as irregular
# (a missing slice is a 100 % deviation; scanners' rounding, e.g. Sunnybrook's 0.001 mm, is far below).
SLICE_STEP_TOLERANCE = 0.01
ORIENTATION_TOLERANCE = 1e-4

_HEADER_TAGS = [
    "SeriesInstanceUID", "SeriesDescription", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "Rows", "Columns", "TriggerTime", "InstanceNumber", "NumberOfFrames", "SOPInstanceUID",
    "PatientID",
]


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series found in a folder: its UID, description, number of image files, folder, patient, frames."""

    uid: str
    description: str
    file_count: int
    folder: Path
    patient_id: str = ""
    frames: int = 1

    def describe(self, root: str | Path | None = None) -> str:
        """One line for people: UID, description, patient, frames x slices and the sub-folder under ``root``."""
        where = self.folder
        if root is not None:
            try:
                where = self.folder.relative_to(Path(root)) or Path(".")
            except ValueError:
                pass
        slices = self.file_count // max(self.frames, 1)
        return (
            f"{self.uid} '{self.description}' patient {self.patient_id or '?'}, "
            f"{self.frames} frame(s) x {slices} slice(s), in {str(where) or '.'}"
        )


@dataclass(frozen=True)
class DicomSlice:
    """The header facts of one single-frame DICOM image that decide where it goes in a volume."""

    path: Path
    series_uid: str
    description: str
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    shape: tuple[int, int]
    pixel_spacing: tuple[float, float]
    trigger_time: float | None
    instance_number: int | None
    sop_instance_uid: str = ""
    patient_id: str = ""

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal: row direction x column direction (the volume's third axis)."""
        row, col = np.array(self.orientation[:3]), np.array(self.orientation[3:])
        normal = np.cross(row, col)
        return normal / np.linalg.norm(normal)

    def distance(self, normal: np.ndarray | None = None) -> float:
        """Position projected on the slice normal (mm): orders slices through the stack."""
        return float(np.dot(self.position, self.normal if normal is None else normal))


# -- reading headers ---------------------------------------------------------------------------
def read_header(path: str | Path) -> DicomSlice | None:
    """Header of one file, or None when it is not a DICOM image (text, DICOMDIR, report...)."""
    path = Path(path)
    with warnings.catch_warnings():  # pydicom warns on values it converts lazily, e.g. old UIDs
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                raise IdealError(
                    f"{path} is an enhanced multi-frame DICOM file, which is not supported: "
                    "export the series as classic single-frame images"
                )
            if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
                return None
            trigger, instance = ds.get("TriggerTime"), ds.get("InstanceNumber")
            return DicomSlice(
                path=path,
                series_uid=str(ds.get("SeriesInstanceUID", "")),
                description=str(ds.get("SeriesDescription", "")),
                position=tuple(float(v) for v in ds.ImagePositionPatient),
                orientation=tuple(float(v) for v in ds.ImageOrientationPatient),
                shape=(int(ds.Rows), int(ds.Columns)),
                pixel_spacing=tuple(float(v) for v in ds.get("PixelSpacing", (1.0, 1.0))),
                trigger_time=None if trigger in (None, "") else float(trigger),
                instance_number=None if instance in (None, "") else int(instance),
                sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                patient_id=str(ds.get("PatientID", "")),
            )
        except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, KeyError):
            return None


def read_headers(folder: str | Path) -> list[DicomSlice]:
    """Headers of every DICOM image under ``folder`` (recursively); other files are ignored.

    The same instance stored twice (one SOPInstanceUID, e.g. a copied export) is read once: the
    first file in path order is kept.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise IdealError(f"DICOM folder not found: {folder}")
    headers, seen = [], set()
    for path in sorted(folder.rglob("*")):
        header = read_header(path) if path.is_file() else None
        if header is None:
            continue
        if header.sop_instance_uid:
            if header.sop_instance_uid in seen:
                continue
            seen.add(header.sop_instance_uid)
        headers.append(header)
    if not headers:
        raise IdealError(f"no DICOM images found in {folder}: choose the folder that holds the .dcm files")
    return headers


def _series_infos(headers: Sequence[DicomSlice]) -> list[SeriesInfo]:
    infos = []
    for uid in sorted({h.series_uid for h in headers}):
        members = [h for h in headers if h.series_uid == uid]
        folder = Path(os.path.commonpath([str(m.path.parent) for m in members]))
        try:
            frames = len(group_frames(members))
        except IdealError:  # an irregular series is still listed; reading it says what is wrong
            frames = 1
        infos.append(SeriesInfo(uid, members[0].description, len(members), folder, members[0].patient_id, frames))
    return infos


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """The DICOM image series under ``folder``, sorted by UID."""
    return _series_infos(read_headers(folder))


def series_slices(folder: str | Path, series_uid: str | None = None) -> list[DicomSlice]:
    """Headers of one series: the only one in the folder, or the one with ``series_uid``."""
    headers = read_headers(folder)
    infos = _series_infos(headers)
    if series_uid is None:
        if len(infos) > 1:
            listing = "; ".join(s.describe(folder) for s in infos)
            raise IdealError(
                f"{folder} holds {len(infos)} DICOM series, pass --series UID to choose one: {listing}"
            )
        series_uid = infos[0].uid
    chosen = [h for h in headers if h.series_uid == series_uid]
    if not chosen:
        known = ", ".join(s.uid for s in infos)
        raise IdealError(f"DICOM series {series_uid} not found in {folder}; it holds: {known}")
    return chosen


# -- ordering ----------------------------------------------------------------------------------
def _check_compatible(slices: Sequence[DicomSlice]) -> None:
    first = slices[0]
    for s in slices[1:]:
        if not np.allclose(s.orientation, first.orientation, atol=ORIENTATION_TOLERANCE):
            raise IdealError(
                f"DICOM series {first.series_uid} mixes image orientations ({s.path.name} differs from "
                f"{first.path.name}): it is not one stack; choose a series of parallel slices"
            )
        if s.shape != first.shape or not np.allclose(s.pixel_spacing, first.pixel_spacing, atol=1e-4):
            raise IdealError(
                f"DICOM series {first.series_uid} mixes image sizes or pixel spacings ({s.path.name} "
                f"differs from {first.path.name}): it cannot be stacked into one volume"
            )


def group_positions(slices: Sequence[DicomSlice]) -> list[list[DicomSlice]]:
    """Slices grouped by position along the normal, positions in increasing order."""
    _check_compatible(slices)
    normal = slices[0].normal
    ordered = sorted(slices, key=lambda s: (s.distance(normal), str(s.path)))
    groups: list[list[DicomSlice]] = [[ordered[0]]]
    for s in ordered[1:]:
        if s.distance(normal) - groups[-1][0].distance(normal) <= SAME_POSITION_MM:
            groups[-1].append(s)
        else:
            groups.append([s])
    return groups


def group_frames(slices: Sequence[DicomSlice]) -> list[list[DicomSlice]]:
    """Cine frames of one series: frame n is the n-th image in time at every position.

    Images at a position are ordered by TriggerTime (InstanceNumber when any lacks it). Each frame
    lists its slices along the normal. A non-cine series gives one frame.
    """
    positions = group_positions(slices)
    use_trigger = all(s.trigger_time is not None for s in slices)

    def in_time(s: DicomSlice) -> tuple:
        number = s.instance_number if s.instance_number is not None else 0
        return ((s.trigger_time if use_trigger else 0.0), number, str(s.path))

    counts = sorted({len(p) for p in positions})
    if len(counts) > 1:
        raise IdealError(
            f"DICOM series {slices[0].series_uid} has between {counts[0]} and {counts[-1]} images per "
            f"slice position ({len(positions)} positions): it is incomplete or mixes acquisitions, so it "
            "cannot be split into cardiac phases; export the complete series"
        )
    in_order = [sorted(p, key=in_time) for p in positions]
    return [[p[n] for p in in_order] for n in range(counts[0])]


def sort_slices(slices: Sequence[DicomSlice]) -> list[DicomSlice]:
    """Slices of one volume ordered along the normal; IdealError unless they form a regular stack."""
    if not slices:
        raise IdealError("no DICOM slices to stack")
    uid = slices[0].series_uid
    positions = group_positions(slices)
    if any(len(p) > 1 for p in positions):
        raise IdealError(
            f"DICOM series {uid} has several images at one slice position: it is a cine or multi-echo "
            "series; read it frame by frame (read_dicom_frames, --frame N)"
        )
    ordered = [p[0] for p in positions]
    if len(ordered) < 2:
        raise IdealError(
            f"DICOM series {uid} is a single 2D image ({ordered[0].path.name}), not a volume: "
            "choose a series with several slice positions"
        )
    points = np.array([s.position for s in ordered])
    steps = np.diff(points, axis=0)
    along = steps @ ordered[0].normal
    mean_step = float(along.mean())
    lateral = np.linalg.norm(steps - np.outer(along, ordered[0].normal), axis=1)
    if np.abs(along - mean_step).max() > SLICE_STEP_TOLERANCE * mean_step:
        raise IdealError(
            f"DICOM series {uid} has irregular slice spacing (steps {np.round(along, 3).tolist()} mm): "
            "slices are missing or the stack is not regular; export the complete series"
        )
    if lateral.max() > SLICE_STEP_TOLERANCE * mean_step:
        raise IdealError(
            f"DICOM series {uid} is a sheared stack (slice positions drift sideways by up to "
            f"{lateral.max():.3f} mm): it cannot be represented as a volume without resampling"
        )
    return ordered


# -- reading volumes ---------------------------------------------------------------------------
@contextmanager
def _quiet_itk() -> Iterator[None]:
    """Hide ITK's console warnings (e.g. 0.001 mm slice non-uniformity); we validate spacing ourselves."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def read_slices(slices: Sequence[DicomSlice]) -> Image:
    """Stack the given single-position slices into one volume (SimpleITK reads the geometry)."""
    ordered = sort_slices(slices)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(s.path) for s in ordered])
    try:
        with _quiet_itk():
            image = reader.Execute()
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1]
        raise IdealError(f"SimpleITK could not read DICOM series {ordered[0].series_uid}: {reason}") from None
    return Image.from_sitk(image)


def read_dicom_frames(folder: str | Path, series_uid: str | None = None) -> list[Image]:
    """One volume per cardiac phase of a DICOM series (a single one for a non-cine series)."""
    return [read_slices(frame) for frame in group_frames(series_slices(folder, series_uid))]


def frame_files(folder: str | Path, series_uid: str | None = None, frame: int | None = None) -> list[Path]:
    """The DICOM files of one frame (the only one of a non-cine series) in the order :func:`read_slices`
    stacks them: what a DICOM SEG of that volume references, slice k on file k."""
    frames = group_frames(series_slices(folder, series_uid))
    index = 0 if frame is None else frame
    if not 0 <= index < len(frames):
        raise IdealError(f"frame {index} is out of range: the DICOM series has {len(frames)} frame(s) (0-{len(frames) - 1})")
    return [s.path for s in sort_slices(frames[index])]


def read_dicom(
    folder: str | Path, series_uid: str | None = None, frame: int | None = None, *, all_frames: bool = True
) -> Image:
    """One volume of a DICOM series; a cine series needs ``frame`` to say which phase (``all_frames``: whether
    the error may suggest ``--all-frames``)."""
    slices = series_slices(folder, series_uid)
    frames = group_frames(slices)
    uid = slices[0].series_uid
    if frame is None:
        if len(frames) > 1:
            raise IdealError(
                f"DICOM series {uid} is cine with {len(frames)} frames: choose one with --frame N "
                f"(0-{len(frames) - 1})" + (", or segment every frame with --all-frames" if all_frames else "")
            )
        frame = 0
    if not 0 <= frame < len(frames):
        raise IdealError(
            f"frame {frame} is out of range: DICOM series {uid} has {len(frames)} frame(s) (0-{len(frames) - 1})"
        )
    return read_slices(frames[frame])
