"""Atomic file writes: a reader never sees a half-written file, a failure leaves nothing behind."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that is renamed onto it only if the block succeeds.

    The temporary name keeps the full suffix (``.nii.gz``, ``.seg.nrrd``) so writers that pick a
    format by extension choose the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.stem.split('.')[0]}-", suffix=suffix, dir=path.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
