"""SSL4MIS-layout h5 data (the ACDC split every semi-supervised paper uses) <-> :class:`Image`.

Layout under a root folder: ``data/NAME.h5`` volumes (``image`` float (slices, H, W), ``label``
uint8) named by ``train.list`` / ``val.list``, and ``data/slices/NAME.h5`` single slices (``image``
(H, W)) named by ``train_slices.list``. The original files store no geometry, so they read with unit
spacing, zero origin and identity direction (distances in voxels, as in the papers); files written
by :func:`write_ssl4mis_volume` carry ``spacing``, ``origin`` and ``direction`` attributes and
read back with that geometry.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import IdealError
from .image import Image


@dataclass(frozen=True)
class Ssl4misCase:
    """One entry of a list: its name, its h5 file and whether that file holds a 2D slice."""

    name: str
    path: Path
    is_slice: bool


def read_list(root: str | Path, list_name: str) -> list[str]:
    """Case names of ``root/<list_name>.list`` (e.g. "train_slices", "val"), in file order."""
    name = list_name[: -len(".list")] if list_name.endswith(".list") else list_name
    path = Path(root) / f"{name}.list"
    if not path.is_file():
        raise IdealError(f"SSL4MIS list not found: {path} (expected train_slices.list, train.list or val.list)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def list_cases(root: str | Path, list_name: str) -> list[Ssl4misCase]:
    """Cases of a list with their files: a list whose name holds "slices" names ``data/slices/`` files.

    Files are not checked here (this ACDC copy holds only the volumes of val.list, not of train.list);
    reading a missing one raises an IdealError.
    """
    is_slice = "slices" in Path(list_name).stem
    folder = Path(root) / "data" / ("slices" if is_slice else "")
    return [Ssl4misCase(n, folder / f"{n}.h5", is_slice) for n in read_list(root, list_name)]


def _geometry(attrs: h5py.AttributeManager) -> dict:
    """Geometry stored by our writer, or the SSL4MIS default (voxel units)."""
    if "spacing" not in attrs:
        return {}
    return {
        "spacing": tuple(np.asarray(attrs["spacing"], float)),
        "origin": tuple(np.asarray(attrs["origin"], float)),
        "direction": np.asarray(attrs["direction"], float).reshape(3, 3),
    }


def read_ssl4mis(path: str | Path) -> tuple[Image, Image | None]:
    """Image and label (None when the file has none) of a volume or slice h5 file.

    A slice (H, W) becomes a one-slice volume (1, H, W); the label shares the image's geometry.
    """
    path = Path(path)
    if not path.is_file():
        raise IdealError(f"SSL4MIS file not found: {path}")
    try:
        with h5py.File(path, "r") as h5:
            if "image" not in h5:
                raise IdealError(f"{path} has no 'image' dataset: it is not an SSL4MIS h5 file")
            array = np.asarray(h5["image"][()])
            label = np.asarray(h5["label"][()]) if "label" in h5 else None
            geometry = _geometry(h5.attrs)
    except OSError as error:
        raise IdealError(f"cannot read {path} as HDF5: {error}") from None
    if array.ndim == 2:
        array = array[np.newaxis]
        label = None if label is None else label[np.newaxis]
    if array.ndim != 3:
        raise IdealError(f"{path}: 'image' has shape {array.shape}, expected (H, W) or (slices, H, W)")
    image = Image(array, **geometry)
    if label is None:
        return image, None
    if label.shape != array.shape:
        raise IdealError(f"{path}: 'label' shape {label.shape} differs from 'image' shape {array.shape}")
    return image, image.with_array(label.astype(np.uint8))


def read_case(case: Ssl4misCase) -> tuple[Image, Image | None]:
    """Image and label of one list entry."""
    return read_ssl4mis(case.path)


def write_ssl4mis_volume(path: str | Path, image: Image, label: Image | None = None) -> None:
    """Write a volume h5 (``image`` as its own dtype, ``label`` uint8) with its geometry as attributes.

    Atomic: written to a temporary file in the same folder, then renamed over ``path``.
    """
    path = Path(path)
    if label is not None:
        if not label.same_grid(image):
            raise IdealError("label and image must share one voxel grid to be written together")
        values = label.array
        if values.size and (values.min() < 0 or values.max() > 255 or np.any(np.mod(values, 1))):
            raise IdealError("label values must be integers 0-255 to be stored as uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(temporary, "w") as h5:
            h5.create_dataset("image", data=image.array, compression="gzip")
            if label is not None:
                h5.create_dataset("label", data=label.array.astype(np.uint8), compression="gzip")
            h5.attrs["spacing"] = np.asarray(image.spacing, float)
            h5.attrs["origin"] = np.asarray(image.origin, float)
            h5.attrs["direction"] = image.direction.reshape(9)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
