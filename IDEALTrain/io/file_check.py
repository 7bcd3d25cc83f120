"""Integrity checks of image files: a truncated or corrupt file is refused, never read as zeros.

ITK reads a truncated ``.nii.gz`` or ``.nii`` without an error and fills the missing voxels with
zeros. :func:`check_complete` therefore reads the header, works out how many data bytes the image
needs, and counts the bytes the file really holds, decompressing (and so checksumming) a gzip or
zlib stream to its end. The same check verifies every image this package writes before it is
renamed into place.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import IdealError

_CHUNK = 1 << 20


def read_information(path: str | Path) -> sitk.ImageFileReader:
    """A reader holding ``path``'s header (size, type, geometry), without reading the voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise IdealError(f"{path}: not a readable image file (corrupt or not the format its name says)") from None
    return reader


def data_bytes(reader: sitk.ImageFileReader) -> int:
    """Bytes of voxel data the header announces: voxels x components x bytes per component."""
    components = max(reader.GetNumberOfComponents(), 1)
    sample = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), components)
    return int(np.prod(reader.GetSize(), dtype=np.int64)) * components * sitk.GetArrayViewFromImage(sample).itemsize


def _stream_length(handle, wbits: int) -> int:
    """Decompressed length of the rest of ``handle``; raises ValueError when the stream is cut or corrupt."""
    decompressor, total = zlib.decompressobj(wbits), 0
    while not decompressor.eof:
        chunk = handle.read(_CHUNK)
        if not chunk:
            raise ValueError("the compressed data ends early")
        try:
            total += len(decompressor.decompress(chunk))
        except zlib.error as error:
            raise ValueError(f"the compressed data is corrupt: {error}") from None
    return total


def _text_header(handle, last_key: bytes | None) -> dict[str, str]:
    """``key: value`` (NRRD) or ``Key = Value`` (MetaImage) lines up to the blank line or ``last_key``."""
    fields = {}
    while True:
        line = handle.readline()
        if not line or line in (b"\n", b"\r\n"):
            return fields
        text = line.decode("latin-1").strip()
        key, sep, value = text.partition("=" if last_key else ":")
        if sep:
            fields[key.strip().lower()] = value.strip()
        if last_key and key.strip().lower() == last_key.decode():
            return fields


def _held_bytes(path: Path) -> int:
    """How many voxel data bytes ``path`` really holds (decompressed); ValueError when a stream is broken."""
    name = path.name.lower()
    with open(path, "rb") as handle:
        if name.endswith(".gz"):
            return _stream_length(handle, 31) - 352  # NIfTI-1 single file: 348-byte header + 4 extension bytes
        if name.endswith(".nii"):
            return path.stat().st_size - 352
        if name.endswith(".nrrd"):
            fields = _text_header(handle, None)
            if "data file" in fields or "datafile" in fields:
                return -1  # detached data: ITK reports a missing file itself
            encoding = fields.get("encoding", "raw")
            if encoding in ("gzip", "gz"):
                return _stream_length(handle, 31)
            return path.stat().st_size - handle.tell() if encoding == "raw" else -1
        if name.endswith((".mha", ".mhd")):
            fields = _text_header(handle, b"elementdatafile")
            data_file = fields.get("elementdatafile", "LOCAL")
            if data_file != "LOCAL":
                handle.close()
                handle = open(path.parent / data_file, "rb")  # noqa: SIM115  closed below
            try:
                if fields.get("compresseddata", "False").lower() == "true":
                    return _stream_length(handle, 15)
                return Path(handle.name).stat().st_size - handle.tell()
            finally:
                handle.close()
    return -1


def check_complete(path: str | Path) -> sitk.ImageFileReader:
    """Refuse a truncated or corrupt image file with a clear message; the header reader when it is whole."""
    path = Path(path)
    reader = read_information(path)
    try:
        held = _held_bytes(path)
    except (ValueError, OSError) as error:
        raise IdealError(f"{path}: the file is truncated or corrupt ({error}); it cannot be read safely") from None
    needed = data_bytes(reader)
    if 0 <= held < needed:
        raise IdealError(f"{path}: the file is truncated: it holds {held} of the {needed} bytes of voxel data its header announces")
    return reader


def _nifti_bytes(path: Path, whole: bool) -> tuple[bytes, str]:
    """The header (``whole``: the whole file) of a NIfTI file, decompressed, and its byte order."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read() if whole else handle.read(544)
    little = int.from_bytes(data[:4], "little") in (348, 540)
    return data, "<" if little else ">"


def check_nifti(path: str | Path, reader: sitk.ImageFileReader) -> None:
    """What ITK's NIfTI reader hides: zero or negative voxel spacing (read as 1 mm) and non-finite voxels
    (NaN and +-inf read as 0). Either is refused with one line, the non-finite voxels counted."""
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return
    dtype = {sitk.sitkFloat32: "f4", sitk.sitkFloat64: "f8"}.get(reader.GetPixelID())
    data, order = _nifti_bytes(path, whole=dtype is not None)
    nifti2 = int.from_bytes(data[:4], "little" if order == "<" else "big") == 540
    if nifti2:  # float64 pixdim[8] at 104, int64 vox_offset at 168
        pixdim = np.frombuffer(data[104:168], order + "f8")
        offset = int.from_bytes(data[168:176], "little" if order == "<" else "big")
    else:  # float32 pixdim[8] at 76, float32 vox_offset at 108
        pixdim = np.frombuffer(data[76:108], order + "f4")
        offset = int(np.frombuffer(data[108:112], order + "f4")[0])
    spatial = pixdim[1 : 1 + min(3, reader.GetDimension())]
    if not np.all(np.isfinite(spatial)) or np.any(spatial <= 0):
        raise IdealError(
            f"{path}: the header gives voxel spacing {[float(s) for s in spatial]} mm (pixdim); every spacing "
            "must be a positive number: fix the header (IDEALSegment never guesses a voxel size)"
        )
    if dtype is None:
        return
    voxels = np.frombuffer(data, order + dtype, count=data_bytes(reader) // int(dtype[1]), offset=offset)
    nans = int(np.count_nonzero(np.isnan(voxels)))
    infinite = int(np.count_nonzero(np.isinf(voxels)))
    if nans == voxels.size:
        raise IdealError(f"{path}: every voxel is NaN (not a number): there is no image to use")
    if nans or infinite:
        what = (f"are NaN or infinite ({nans} NaN, {infinite} +-inf)" if nans and infinite
                else "are NaN (not a number)" if nans else "are infinite (+-inf)")
        raise IdealError(f"{path}: {nans + infinite} of {voxels.size} voxels {what}; fix or mask them first")
