"""Safe outputs: a reader never sees a half-written file, a failed write never replaces a good one,
and every output path is checked before any work starts.

:func:`atomic_path` writes to a temporary file beside the target, flushes it to disk, lets the
caller verify it (size, a read-back of the header) and only then renames it onto the target.
:func:`check_outputs` (from :mod:`.output_guard`) is the one output-path check every command and the batch
script run first.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import IdealError
from .output_guard import check_outputs, check_writable_folder, os_error_message, temp_prefix

#: The output checks live in :mod:`.output_guard`; callers have always imported them from here too.
__all__ = ["atomic_path", "check_outputs", "check_writable_folder", "file_mode", "os_error_message"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a new output file: 0666 minus the umask (0644 usually), as ``open()`` would give."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path, verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that is renamed onto it only if the block succeeds.

    The written file must be non-empty and is synced to disk; ``verify`` (if given) then checks it,
    raising IdealError if it is not what was meant. The temporary name keeps the full suffix
    (``.nii.gz``, ``.seg.nrrd``, in lower case) so writers that pick a format by extension choose the right
    one; its name marks it as this process's, for :func:`.output_guard.sweep_leftovers` after a kill.
    A write that fails (a full disk included) raises IdealError and leaves ``path`` as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(path.suffixes).lower() or ".tmp"  # lower case: ITK picks its writer by a case-sensitive suffix
        handle, temp_name = tempfile.mkstemp(prefix=temp_prefix(path.name.split(".")[0]), suffix=suffix, dir=path.parent)
        os.close(handle)
    except OSError as error:
        raise IdealError(os_error_message(path, error)) from None
    temp = Path(temp_name)
    try:
        yield temp
        _finish(temp, path, verify)
    except OSError as error:
        raise IdealError(os_error_message(path, error)) from None
    finally:
        temp.unlink(missing_ok=True)


def _finish(temp: Path, path: Path, verify: Callable[[Path], None] | None) -> None:
    """Sync, check and publish a finished temporary file."""
    if temp.stat().st_size == 0:
        raise IdealError(f"{path}: the write produced an empty file (disk full?); nothing was replaced")
    with open(temp, "rb+") as handle:
        os.fsync(handle.fileno())
    if verify is not None:
        verify(temp)
    os.chmod(temp, file_mode())
    os.replace(temp, path)
