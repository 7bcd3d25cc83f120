"""Reading and writing volumes as files (NIfTI, NRRD, MHA) or DICOM folders, keeping geometry.

Everything enters and leaves as :class:`~IDEALTrain.io.image.Image`. A 4D file or a cine DICOM
series is a list of frames; asking for one volume from it without choosing a frame is an error.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import IdealError
from ..labels import LabelInfo
from .atomic import atomic_path
from .file_check import check_complete, check_nifti
from .image import Image

SEGMENTATION_SUFFIX = ".seg.nrrd"
#: Every file type read and written here; longest first, so ``.seg.nrrd`` is stripped before ``.nrrd``.
VOLUME_SUFFIXES = (".nii.gz", ".nii", SEGMENTATION_SUFFIX, ".nrrd", ".mha", ".mhd")


def has_volume_suffix(path: str | Path) -> bool:
    """True for file names this module can read or write."""
    return str(path).lower().endswith(VOLUME_SUFFIXES)


def check_output_type(path: str | Path) -> Path:
    """Refuse, before any work, an output name this module cannot write and read back: an unknown suffix,
    or ``.MHA``/``.MHD`` not in lower case (ITK reads those only in lower case; ``.NII.GZ`` and ``.NRRD`` are fine)."""
    path = Path(path)
    if not has_volume_suffix(path):
        raise IdealError(f"{path}: unsupported output type; use {', '.join(VOLUME_SUFFIXES)}")
    suffix = path.suffix
    if suffix.lower() in (".mha", ".mhd") and suffix != suffix.lower():
        raise IdealError(f"{path}: write the suffix in lower case ({suffix.lower()}); ITK cannot read a {suffix} file back")
    return path


def strip_volume_suffix(name: str) -> str:
    """A file name without its volume suffix (``a.nii.gz`` -> ``a``, ``b.seg.nrrd`` -> ``b``): case and node names."""
    lower = name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def frame_path(path: str | Path, frame: int) -> Path:
    """``out.seg.nrrd`` -> ``out_frame03.seg.nrrd``: the one naming rule of per-frame cine outputs."""
    return tagged_path(path, f"frame{frame:02d}")


def tagged_path(path: str | Path, tag: str) -> Path:
    """``out.seg.nrrd`` -> ``out_<tag>.seg.nrrd`` (cine frames, ED/ES outputs of a pair)."""
    path = Path(path)
    stem = path.name.split(".")[0]
    return path.with_name(f"{stem}_{tag}{path.name[len(stem):]}")


def _checked_reader(path: Path) -> sitk.ImageFileReader:
    """The header reader of a whole image file of a supported type (truncated, corrupt, non-finite or
    zero-spacing files refused)."""
    if not path.exists():
        raise IdealError(f"{path}: no such file or folder")
    if not has_volume_suffix(path):
        raise IdealError(f"{path}: unsupported file type; use {', '.join(VOLUME_SUFFIXES)} or a DICOM folder")
    reader = check_complete(path)
    check_nifti(path, reader)
    return reader


def _read_sitk(path: Path, reader: sitk.ImageFileReader | None = None) -> sitk.Image:
    """The voxels of ``path``, through ``reader`` when the file has already been checked."""
    try:
        return (reader or _checked_reader(path)).Execute()
    except RuntimeError:
        raise IdealError(f"{path}: not a readable image file (corrupt or not the format its name says)") from None


def read_cine_file(path: str | Path) -> list[Image] | None:
    """The frames of a 4D image file, None for a 3D one (its voxels unread); the file is checked whole once."""
    path = Path(path)
    reader = _checked_reader(path)
    if reader.GetDimension() != 4 and not _is_frame_list(reader):
        return None
    return _frames_from_sitk(_read_sitk(path, reader), path)


def _is_frame_list(image: sitk.Image | sitk.ImageFileReader) -> bool:
    """True for a NRRD whose per-voxel 'list' axis is time: Slicer's ``.seq.nrrd`` (volume sequence storage node)."""
    return (
        image.GetNumberOfComponents() > 1 if isinstance(image, sitk.ImageFileReader) else image.GetNumberOfComponentsPerPixel() > 1
    ) and image.HasMetaDataKey("NRRD_kinds[pixel]") and image.GetMetaData("NRRD_kinds[pixel]") == "list"


def _frames_from_sitk(image: sitk.Image, path: Path) -> list[Image]:
    if _is_frame_list(image) and image.GetDimension() == 3:
        # Slicer's .seq.nrrd: frames are the components of a 3D vector image, in sequence order.
        return [Image.from_sitk(sitk.VectorIndexSelectionCast(image, t)) for t in range(image.GetNumberOfComponentsPerPixel())]
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
        from .dicom_series import read_dicom_frames

        return read_dicom_frames(path, series_uid)
    return _frames_from_sitk(_read_sitk(path), path)


def read_image(path: str | Path, frame: int | None = None, series_uid: str | None = None, *, all_frames: bool = True) -> Image:
    """One 3D volume from a file or DICOM folder; ``frame`` picks one frame of a 4D/cine input.

    ``all_frames``: whether the command reading it has ``--all-frames`` to suggest for a cine."""
    if Path(path).is_dir():
        from .dicom_series import read_dicom

        return read_dicom(path, series_uid, frame, all_frames=all_frames)  # reads only the chosen frame's files
    frames = read_frames(path)
    if frame is None:
        if len(frames) > 1:
            raise IdealError(
                f"{path}: is a cine/4D image with {len(frames)} frames: choose one with --frame N "
                f"(0-{len(frames) - 1})" + (", or segment every frame with --all-frames" if all_frames else "")
            )
        return frames[0]
    if not 0 <= frame < len(frames):
        raise IdealError(f"{path}: has {len(frames)} frame(s); --frame {frame} is out of range 0-{len(frames) - 1}")
    return frames[frame]


def write_image(
    image: Image, path: str | Path, labels: tuple[LabelInfo, ...] | None = None, segment_tags: dict[str, str] | None = None
) -> Path:
    """Write ``image`` atomically; a ``.seg.nrrd`` path with ``labels`` becomes a Slicer segmentation.

    The one ``.seg.nrrd`` writer (CLI and batch): Slicer reads it as its own storage node's file, with
    the label map's IDs, names, colours and terminology, the image as reference geometry, and
    ``segment_tags`` (e.g. which model made it) on every segment.
    """
    path = check_output_type(path)
    sitk_image = image.to_sitk()
    if str(path).lower().endswith(".seg.nrrd"):
        if labels is None:
            raise IdealError(f"{path}: writing a .seg.nrrd needs the label map (segment names and colours)")
        _add_segmentation_metadata(sitk_image, image, labels, segment_tags or {})
    if path.name.lower().endswith(".mhd"):
        return _write_header_and_data(sitk_image, path)
    with atomic_path(path, verify=lambda temp: _verify_written(temp, sitk_image, path)) as temp:
        _sitk_write(sitk_image, temp, path)
    return path


def _sitk_write(sitk_image: sitk.Image, temp: Path, path: Path) -> None:
    try:
        sitk.WriteImage(sitk_image, str(temp), useCompression=True)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1][:200]
        raise IdealError(f"{path}: could not write the image ({reason})") from None


def _verify_written(temp: Path, sitk_image: sitk.Image, path: Path) -> None:
    """The file just written must be whole and say the size and type that were meant (ITK's NIfTI writer
    does not raise on a full disk). A failure names the output, never the hidden temporary file."""
    try:
        reader = check_complete(temp)
        problem = "" if reader.GetSize() == sitk_image.GetSize() and reader.GetPixelID() == sitk_image.GetPixelID() else "other"
    except IdealError as error:
        problem = "truncated" if "truncated" in str(error) else "unreadable"
    if problem:
        raise IdealError(f"{path}: could not write the image: the written file reads back {problem} "
                         "(disk full or failing?); nothing was replaced")


def _write_header_and_data(sitk_image: sitk.Image, path: Path) -> Path:
    """A ``.mhd`` header and its ``.zraw`` data under their final names: written in a hidden folder,
    verified, then the data moved first and the header last, so the header never points at a missing file."""
    import os
    import shutil
    import tempfile

    from .atomic import file_mode, os_error_message
    from .output_guard import temp_prefix

    data = path.with_suffix(".zraw")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), dir=path.parent))
    except OSError as error:
        raise IdealError(os_error_message(path, error)) from None
    header = folder / f"{path.stem}.mhd"  # ITK picks the MetaImage writer by a lower-case suffix
    try:
        _sitk_write(sitk_image, header, path)
        _verify_written(header, sitk_image, path)
        for written, name in ((data.name, data.name), (header.name, path.name)):
            os.chmod(folder / written, file_mode())
            os.replace(folder / written, path.parent / name)
    except OSError as error:
        raise IdealError(os_error_message(path, error)) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def read_label(path: str | Path, frame: int | None = None) -> Image:
    """A label map file: whole-number values 0-255 (as uint8), else an error naming the file and the values."""
    image = read_image(path, frame)
    array = image.array
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise IdealError(f"{path}: label map holds NaN or infinite values")
        fractional = array[array != np.round(array)]
        if fractional.size:
            raise IdealError(f"{path}: label map holds non-integer values (e.g. {fractional.flat[0]:g}): is it an intensity image?")
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < 0 or high > 255:
        raise IdealError(f"{path}: label values must be 0-255, found {low:g}..{high:g}")
    return image.with_array(array.astype(np.uint8))


def _add_segmentation_metadata(sitk_image: sitk.Image, image: Image, labels: tuple[LabelInfo, ...], tags: dict[str, str]) -> None:
    """Slicer's .seg.nrrd fields: one labelmap layer, one segment per label value, the image as reference geometry."""
    sitk_image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    sitk_image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    sitk_image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.index_to_physical  # Slicer's geometry string is in RAS
    extent = ";".join(f"0;{n - 1}" for n in image.size)
    geometry = ";".join(repr(float(v)) for v in ijk_to_ras.ravel()) + f";{extent};"
    sitk_image.SetMetaData("Segmentation_ConversionParameters", f"Reference image geometry|{geometry}|Image geometry of the labelmap&")
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
        sitk_image.SetMetaData(prefix + "NameAutoGenerated", "0")
        sitk_image.SetMetaData(prefix + "ColorAutoGenerated", "0")
        segment_tags = sorted({**tags, "TerminologyEntry": label.terminology_entry}.items())  # Slicer's order
        sitk_image.SetMetaData(prefix + "Tags", "".join(f"{key}:{value}|" for key, value in segment_tags))
