"""Volume / cine frames -> MR DICOM series with exact geometry (test data, exports).

The counterpart of :mod:`.dicom_series`, which reads what this writes: one int16 file per slice,
positions and orientation from the image geometry, per-position trigger times for a cine.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.uid import generate_uid

from ..errors import IdealError
from .dicom_series import ORIENTATION_TOLERANCE
from .image import Image

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
INT16_MAX = 32767


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    return f"{value:.10g}"


def _rescale_for(array: np.ndarray) -> tuple[float, float] | None:
    """(RescaleSlope, RescaleIntercept) for these voxels, or None to store them as they are.

    Integer values within int16 are stored unchanged (exact round trip). Anything else (fractional or
    out-of-range values) is mapped linearly onto -32767..32767; GDCM rounds to the nearest stored
    value, so a reader gets the values back to within slope / 2.
    """
    if not np.all(np.isfinite(array)):
        raise IdealError("cannot write DICOM: the image holds NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if np.all(np.mod(array, 1) == 0) and -INT16_MAX - 1 <= low and high <= INT16_MAX:
        return None
    slope = float(_ds((high - low) / (2 * INT16_MAX))) or 1.0
    return slope, float(_ds((high + low) / 2))


def _write_frames(
    frames: Sequence[Image],
    folder: str | Path,
    trigger_times: Sequence[Sequence[float]] | None,
    series_uid: str | None,
    description: str,
    series_number: int,
    patient_id: str,
) -> list[Path]:
    """Write frames x slices files; trigger_times[n][k] is frame n's time at slice k."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    first = frames[0]
    if not np.allclose(first.direction.T @ first.direction, np.eye(3), atol=ORIENTATION_TOLERANCE):
        raise IdealError("cannot write DICOM: the image direction matrix is not orthonormal (sheared grid)")
    rescale = _rescale_for(np.stack([f.array for f in frames]))  # one rescale for the series
    normal = first.direction[:, 2]
    common = {
        "0008|0016": MR_IMAGE_STORAGE,
        "0008|0060": "MR",
        "0008|103e": description,
        "0010|0010": patient_id,
        "0010|0020": patient_id,
        "0020|000d": generate_uid(),
        "0020|000e": series_uid or generate_uid(),
        "0020|0052": generate_uid(),
        "0020|0011": str(series_number),
        "0018|0050": _ds(first.spacing[2]),
        "0018|0088": _ds(first.spacing[2]),
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    n_frames, n_slices = len(frames), first.array.shape[0]
    for n, frame in enumerate(frames):
        # Stored values are int16 either way: handing GDCM float voxels makes it switch, depending on
        # global reader state, to Enhanced MR without per-file positions. The rescale tags go in after.
        stored = frame.array if rescale is None else np.rint((frame.array - rescale[1]) / rescale[0]).clip(-INT16_MAX, INT16_MAX)
        voxels = stored.astype(np.int16)
        volume = frame.with_array(voxels).to_sitk()
        for k in range(n_slices):
            plane = volume[:, :, k : k + 1]  # a one-slice 3D image keeps the full geometry
            for tag, value in common.items():
                plane.SetMetaData(tag, value)
            instance = k * n_frames + n + 1  # position-major numbering, as scanners do
            plane.SetMetaData("0008|0018", generate_uid())
            plane.SetMetaData("0020|0013", str(instance))
            position = np.asarray(volume.TransformIndexToPhysicalPoint((0, 0, k)))
            plane.SetMetaData("0020|1041", _ds(float(position @ normal)))
            if trigger_times is not None:
                plane.SetMetaData("0018|1060", _ds(trigger_times[n][k]))
            path = folder / f"IM_{instance:05d}.dcm"
            writer.SetFileName(str(path))
            writer.Execute(plane)
            if rescale is not None:
                _set_rescale(path, *rescale)
            paths.append(path)
    return paths


def _set_rescale(path: Path, slope: float, intercept: float) -> None:
    """Add RescaleSlope/Intercept to a written file (GDCM refuses fractional ones on int16 voxels)."""
    dataset = pydicom.dcmread(path)
    dataset.RescaleSlope, dataset.RescaleIntercept = _ds(slope), _ds(intercept)
    dataset.save_as(path)


def write_dicom_series(
    image: Image,
    folder: str | Path,
    *,
    series_uid: str | None = None,
    description: str = "IDEALSegment",
    series_number: int = 1,
    patient_id: str = "IDEAL",
) -> list[Path]:
    """Write a volume as an MR DICOM series (one int16 file per slice) with its exact geometry.

    Integer voxels within int16 are stored exactly; other values use RescaleSlope/Intercept (see
    ``_rescale_for``). DICOM stacks run along row x column, so a left-handed direction reads back
    with k reversed (same voxels at the same physical points). Returns the written files.
    """
    return _write_frames([image], folder, None, series_uid, description, series_number, patient_id)


def write_dicom_cine(
    frames: Sequence[Image],
    folder: str | Path,
    *,
    trigger_times: Sequence[float] | None = None,
    jitter_ms: float = 3.0,
    seed: int = 0,
    series_uid: str | None = None,
    description: str = "IDEALSegment cine",
    series_number: int = 1,
    patient_id: str = "IDEAL",
) -> list[Path]:
    """Write cine frames (same grid) as one series: every position gets one image per frame.

    Frame n's TriggerTime is ``trigger_times[n]`` (default 40 ms apart) plus a per-position offset
    in [0, jitter_ms) drawn with ``seed``, like the few-ms spread real scanners record.
    """
    if not frames:
        raise IdealError("no frames to write")
    if any(not f.same_grid(frames[0]) for f in frames[1:]):
        raise IdealError("cine frames must share one voxel grid (size, spacing, origin, direction)")
    times = np.arange(len(frames)) * 40.0 if trigger_times is None else np.asarray(trigger_times, float)
    if len(times) != len(frames):
        raise IdealError(f"got {len(times)} trigger times for {len(frames)} frames")
    offsets = np.random.default_rng(seed).uniform(0.0, jitter_ms, frames[0].array.shape[0])
    per_slice = [[float(t + o) for o in offsets] for t in times]
    return _write_frames(frames, folder, per_slice, series_uid, description, series_number, patient_id)
