"""Safe outputs: a reader never sees a half-written file, a failed write never replaces a good one,
and every output path is checked before any work starts.

:func:`atomic_path` writes to a temporary file beside the target, flushes it to disk, lets the
caller verify it (size, a read-back of the header) and only then renames it onto the target.
:func:`check_outputs` is the one output-path check every command and the batch script run first.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ..errors import IdealError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a new output file: 0666 minus the umask (0644 usually), as ``open()`` would give."""
    return 0o666 & ~_umask()


def os_error_message(path: str | Path, error: OSError) -> str:
    """One line for a failed write: the path and the system's reason (e.g. 'No space left on device')."""
    return f"{path}: could not write ({error.strerror or error})"


@contextlib.contextmanager
def atomic_path(path: str | Path, verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that is renamed onto it only if the block succeeds.

    The written file must be non-empty and is synced to disk; ``verify`` (if given) then checks it,
    raising IdealError if it is not what was meant. The temporary name keeps the full suffix
    (``.nii.gz``, ``.seg.nrrd``) so writers that pick a format by extension choose the right one.
    A write that fails (a full disk included) raises IdealError and leaves ``path`` as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(path.suffixes) or ".tmp"
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.stem.split('.')[0]}-", suffix=suffix, dir=path.parent)
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


def _existing_folder(path: Path) -> Path:
    """The nearest existing ancestor of ``path`` (``path`` itself if it exists), which must be a folder."""
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise IdealError(f"{path}: {parent} is a file, not a folder" if parent != path else f"{path}: is a file, not a folder")
            return parent
    return Path.cwd()


def check_writable_folder(folder: str | Path) -> None:
    """Refuse a folder (existing or to be created) that cannot take new files; a real probe, not os.access."""
    folder = Path(folder)
    base = _existing_folder(folder)
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as error:
        raise IdealError(f"{folder}: cannot write there ({error.strerror or error})") from None


def check_outputs(paths: Iterable[str | Path | None], overwrite: bool, hint: str = "pass --overwrite to replace it") -> list[Path]:
    """The one output-path check, run before any work: no two outputs on one path, no parent that is a
    file, a writable folder, and no existing output unless ``overwrite``. Returns the paths, absolute."""
    resolved, seen = [], {}
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        absolute = Path(os.path.abspath(path))
        if absolute in seen:
            raise IdealError(f"two outputs would be written to the same file {path}: choose different names")
        seen[absolute] = path
        resolved.append(absolute)
    for path in resolved:
        check_writable_folder(path.parent)
    existing = [str(seen[p]) for p in resolved if p.exists()]
    if existing and not overwrite:
        raise IdealError(f"output already exists: {', '.join(existing)}; {hint}")
    return resolved
