"""Reading and writing volumes as files (NIfTI, NRRD, MHA) or DICOM folders, keeping geometry.

Everything enters and leaves as :class:`~IDEALTrain.io.image.Image`. A 4D file or a cine DICOM
series is a list of frames; asking for one volume from it without choosing a frame is an error.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..io.atomic import atomic_path
from ..errors import IdealError
from ..io.image import Image
from ..labels import LabelInfo

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mha", ".mhd")


def has_volume_suffix(path: str | Path) -> bool:
    """True for file names this module can read or write."""
    return str(path).lower().endswith(VOLUME_SUFFIXES)


def _read_sitk(path: Path) -> sitk.Image:
    if not path.exists():
        raise IdealError(f"{path}: no such file or folder")
    if not has_volume_suffix(path):
        raise IdealError(f"{path}: unsupported file type; use {', '.join(VOLUME_SUFFIXES)} or a DICOM folder")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError:
        raise IdealError(f"{path}: not a readable image file (corrupt or not the format its name says)") from None


def _frames_from_sitk(image: sitk.Image, path: Path) -> list[Image]:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise IdealError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected a scalar (grey-level) volume")
    dimension = image.GetDimension()
    if dimension == 3:
        return [Image.from_sitk(image)]
    if dimension == 2:
        raise IdealError(f"{path}: is a 2D image; IDEALSegment needs a 3D short-axis stack (several slices)")
    if dimension != 4:
        raise IdealError(f"{path}: is a {dimension}D image; expected 3D or a 4D cine (3D + time)")
    size = list(image.GetSize())
    frames = []
    for t in range(size[3]):
        frame = sitk.Extract(image, size[:3] + [0], [0, 0, 0, t], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
        frames.append(Image.from_sitk(frame))
    return frames


def read_frames(path: str | Path, series_uid: str | None = None) -> list[Image]:
    """Every frame of a volume file or DICOM folder (one frame for a plain 3D volume)."""
    path = Path(path)
    if path.is_dir():
        from ..io.dicom_series import read_dicom_frames

        return read_dicom_frames(path, series_uid)
    return _frames_from_sitk(_read_sitk(path), path)


def read_image(path: str | Path, frame: int | None = None, series_uid: str | None = None) -> Image:
    """One 3D volume from a file or DICOM folder; ``frame`` picks one frame of a 4D/cine input."""
    if Path(path).is_dir():
        from ..io.dicom_series import read_dicom

        return read_dicom(path, series_uid, frame)  # reads only the chosen frame's files
    frames = read_frames(path)
    if frame is None:
        if len(frames) > 1:
            raise IdealError(
                f"{path}: is a cine/4D image with {len(frames)} frames: choose one with --frame N "
                f"(0-{len(frames) - 1}), or segment every frame with --all-frames"
            )
        return frames[0]
    if not 0 <= frame < len(frames):
        raise IdealError(f"{path}: has {len(frames)} frame(s); --frame {frame} is out of range 0-{len(frames) - 1}")
    return frames[frame]


def write_image(image: Image, path: str | Path, labels: tuple[LabelInfo, ...] | None = None) -> Path:
    """Write ``image`` atomically; a ``.seg.nrrd`` path with ``labels`` becomes a Slicer segmentation."""
    path = Path(path)
    if not has_volume_suffix(path):
        raise IdealError(f"{path}: unsupported output type; use {', '.join(VOLUME_SUFFIXES)}")
    sitk_image = image.to_sitk()
    if str(path).lower().endswith(".seg.nrrd"):
        if labels is None:
            raise IdealError(f"{path}: writing a .seg.nrrd needs the label map (segment names and colours)")
        _add_segmentation_metadata(sitk_image, image, labels)
    with atomic_path(path) as temp:
        sitk.WriteImage(sitk_image, str(temp), useCompression=True)
    return path


def _add_segmentation_metadata(sitk_image: sitk.Image, image: Image, labels: tuple[LabelInfo, ...]) -> None:
    """Slicer's .seg.nrrd fields: one labelmap layer, one segment per label value."""
    sitk_image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    sitk_image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    sitk_image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    for index, label in enumerate(labels):
        present = np.argwhere(image.array == label.value)
        if present.size:
            low, high = present.min(axis=0)[::-1], present.max(axis=0)[::-1]
            extent = " ".join(f"{lo} {hi}" for lo, hi in zip(low, high))
        else:
            extent = "0 -1 0 -1 0 -1"
        prefix = f"Segment{index}_"
        sitk_image.SetMetaData(prefix + "ID", label.segment_id)
        sitk_image.SetMetaData(prefix + "Name", label.name)
        sitk_image.SetMetaData(prefix + "Color", " ".join(f"{c:.6g}" for c in label.color))
        sitk_image.SetMetaData(prefix + "LabelValue", str(label.value))
        sitk_image.SetMetaData(prefix + "Layer", "0")
        sitk_image.SetMetaData(prefix + "Extent", extent)
        sitk_image.SetMetaData(prefix + "Tags", f"TerminologyEntry:{label.terminology_entry}|")
