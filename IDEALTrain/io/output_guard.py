"""The one output guard every command, ``batch.py`` and the worker use (docs/reliability.md says what it promises).

- :func:`check_outputs`, before any work: resolved paths (symlinks, ``..``, hard links) never replace an
  input; ``overwrite`` replaces only what the tool writes (a file of the kind asked for, or a model bundle
  it recognises), never an arbitrary folder; no two outputs on one path; a writable folder.
- :class:`OutputSet`, while writing: an exclusive lock on every output path, every output staged in a
  hidden folder beside it and committed together (renamed into place one after another) or not at all.
- Every temporary name starts with ``.idealtrain-<pid>-``; :func:`sweep_leftovers` removes those of a
  run that was killed (its pid gone) the next time a run writes to that folder, and says so; a commit the
  kill cut short (its staged folder marked) is finished first, so the outputs end whole.
- :func:`sigterm_as_interrupt`: SIGTERM stops a command as Ctrl-C does, so the clean-up above runs.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import IdealError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

TEMP_PREFIX = ".idealtrain-"
_TEMP = re.compile(r"^\.idealtrain-(\d+)-")
_LOCK = ".idealtrain-lock-"
_REPLACED = "replaced-"  # an old bundle moved aside while its replacement is renamed in
_COMMITTING = f"{TEMP_PREFIX}committing.json"  # in a staged folder: every file is verified and being moved into place
WINDOWS_STALE_SECONDS = 24 * 3600  # no portable liveness test there: a temp this old is a leftover


def temp_prefix(name: str) -> str:
    """The start of every temporary file or folder name this process makes for ``name``."""
    return f"{TEMP_PREFIX}{os.getpid()}-{name}-"


def os_error_message(path: str | Path, error: OSError) -> str:
    """One line for a failed write: the path and the system's reason (e.g. 'No space left on device')."""
    return f"{path}: could not write ({error.strerror or error})"


# -- checks before any work ------------------------------------------------------------------------------
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


def is_bundle(path: Path) -> bool:
    """A model bundle this tool wrote: a folder or .zip whose card.json says the bundle format."""
    from ..model.card import BUNDLE_FORMAT, CARD_NAME

    try:
        if path.is_dir() and not path.is_symlink():
            text = (path / CARD_NAME).read_text(encoding="utf-8")
        elif path.is_file() and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                text = archive.read(CARD_NAME).decode("utf-8")
        else:
            return False
        card = json.loads(text)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return False
    return isinstance(card, dict) and card.get("format") == BUNDLE_FORMAT


def _input_paths(inputs: Iterable[str | Path | None]) -> list[tuple[Path, Path]]:
    """(as given, resolved) for each existing input."""
    found = []
    for given in inputs:
        if given is None or str(given) == "":
            continue
        path = Path(given)
        if path.exists():
            found.append((path, Path(os.path.realpath(path))))
    return found


def _replaces_input(output: Path, real: Path, inputs: list[tuple[Path, Path]]) -> Path | None:
    """The input that writing ``output`` would replace or delete: the same file (a symlink, ``..``, a hard
    link to it) or a folder holding it."""
    for given, resolved in inputs:
        if real == resolved or real in resolved.parents:
            return given
        with contextlib.suppress(OSError):
            if output.exists() and os.path.samefile(output, resolved):
                return given
    return None


def check_outputs(
    paths: Iterable[str | Path | None],
    overwrite: bool,
    hint: str = "pass --overwrite to replace it",
    *,
    inputs: Iterable[str | Path | None] = (),
    kind: str = "file",
) -> list[Path]:
    """The one output-path check, run before any work. Returns the outputs, absolute (not resolved).

    Refused: two outputs on one file; an output that is (or holds) an input, however it is spelt; a parent
    that is a file or a folder that cannot be written; an existing output without ``overwrite``; and, with
    it, an existing output that is not what this tool writes there (``kind`` "file": a folder; "bundle": a
    file or folder that is not a model bundle). Leftovers of killed runs in the output folders are swept.
    """
    absolute, seen = [], {}
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        real = Path(os.path.realpath(path))
        if real in seen:
            raise IdealError(f"two outputs would be written to the same file {path}: choose different names")
        seen[real] = path
        absolute.append((Path(os.path.abspath(path)), real))
    found = _input_paths(inputs)
    for (path, real), given in zip(absolute, seen.values()):
        replaced = _replaces_input(path, real, found)
        if replaced is not None:
            raise IdealError(f"{given}: writing there would replace the input {replaced}; choose another output")
    for path, _ in absolute:
        check_writable_folder(path.parent)
    for folder in dict.fromkeys(path.parent for path, _ in absolute):
        report_leftovers(folder)  # before any refusal: every run cleans up after a killed one
    existing = [(path, given) for (path, _), given in zip(absolute, seen.values()) if path.exists() or path.is_symlink()]
    if existing and not overwrite:
        raise IdealError(f"output already exists: {', '.join(str(g) for _, g in existing)}; {hint}")
    for path, given in existing:
        if kind == "bundle" and not is_bundle(path):
            raise IdealError(
                f"{given} exists and is not a model bundle; --overwrite replaces only a bundle this tool wrote: "
                "choose another output (nothing was changed)"
            )
        if kind == "file" and path.is_dir():
            raise IdealError(f"{given} is a folder; the output must be a file name (nothing was changed)")
    return [path for path, _ in absolute]


# -- leftovers of killed runs --------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":
        return True  # decided by age instead (see _stale)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _stale(entry: Path) -> bool:
    match = _TEMP.match(entry.name)
    if match is None:
        return False
    if os.name == "nt":
        try:
            return time.time() - entry.lstat().st_mtime > WINDOWS_STALE_SECONDS
        except OSError:
            return False
    return not _pid_alive(int(match.group(1)))


def _finish_commit(staged: Path, folder: Path) -> list[str]:
    """Move into place what a run killed part-way through its commit had not moved yet (each file was written
    and verified before the commit began), so its outputs end whole; a file that appeared after the kill is
    kept. The names moved (none for a run killed before its commit: nothing of it is kept)."""
    marker = staged / _COMMITTING
    try:
        plan = json.loads(marker.read_text(encoding="utf-8"))
        names, overwrite, began = set(plan["targets"]), bool(plan["overwrite"]), marker.stat().st_mtime_ns
    except (OSError, ValueError, KeyError, TypeError):
        return []
    moved = []
    for entry in sorted(staged.iterdir(), key=lambda p: (p.name in names, p.name)):  # as commit() orders them
        if entry.name.startswith((TEMP_PREFIX, ".partial-")):
            continue
        target = folder / entry.name
        try:
            newer = target.lstat().st_mtime_ns > began
        except FileNotFoundError:
            newer = None
        if newer is None or (overwrite and not newer):  # absent, or the old file the run was replacing
            with contextlib.suppress(OSError):
                publish(entry, target, overwrite)
                moved.append(entry.name)
    return moved


def sweep_leftovers(folder: str | Path, finished: list[str] | None = None) -> list[str]:
    """Remove the temporary files and folders a killed run left in ``folder`` (and unheld output locks);
    an old bundle moved aside for a replacement that never arrived is put back, and a commit cut short is
    finished (the outputs moved are added to ``finished``). The names removed."""
    folder = Path(folder)
    try:
        entries = [p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX)]
    except OSError:
        return []
    removed = []
    for entry in entries:
        if entry.name.startswith(_LOCK):
            if _remove_unheld_lock(entry):
                removed.append(entry.name)
            continue
        if not _stale(entry):
            continue
        if entry.is_dir() and not entry.is_symlink():
            for aside in entry.glob(f"{_REPLACED}*"):  # killed between moving the old bundle aside and the new one in
                original = folder / aside.name[len(_REPLACED):]
                if not original.exists():
                    with contextlib.suppress(OSError):
                        os.rename(aside, original)
            moved = _finish_commit(entry, folder)
            if finished is not None:
                finished += moved
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        if not entry.exists():
            removed.append(entry.name)
    return removed


def report_leftovers(folder: Path) -> None:
    """Sweep ``folder`` and say on stderr what was removed (a killed run's files are not silently kept or lost)."""
    finished: list[str] = []
    removed = sweep_leftovers(folder, finished)
    if finished:
        print(f"idealtrain: finished moving {len(finished)} output(s) of a run interrupted while committing them into "
              f"{folder}: {', '.join(sorted(finished)[:5])}{' ...' if len(finished) > 5 else ''}", file=sys.stderr, flush=True)
    if removed:
        print(f"idealtrain: removed {len(removed)} leftover temporary file(s) of an interrupted run from {folder}: "
              f"{', '.join(sorted(removed)[:5])}{' ...' if len(removed) > 5 else ''}", file=sys.stderr, flush=True)


# -- exclusive locks on output paths ------------------------------------------------------------------
def _try_lock(handle) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _unlock(handle) -> None:
    if fcntl is not None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    else:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)


def _same_file(path: Path, handle) -> bool:
    """True when ``path`` still names the file ``handle`` has open."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(handle.fileno()))
    except FileNotFoundError:
        return False


def _remove_unheld_lock(path: Path) -> bool:
    """Remove a lock file nobody holds (its owner was killed); False when a live run holds it."""
    try:
        handle = open(path, "a+b", buffering=0)  # noqa: SIM115  closed below
    except OSError:
        return False
    try:
        if not _try_lock(handle):
            return False
        removed = _same_file(path, handle)  # else its owner removed it as it finished: not a leftover
        if removed:
            path.unlink(missing_ok=True)
        _unlock(handle)
        return removed
    finally:
        handle.close()


class PathLock:
    """An OS lock on ``lock_file`` holding the owner's pid; released by the system when the owner dies, so a
    killed run never leaves a lock that holds (its file stays, unlocked, and is taken over or swept)."""

    def __init__(self, lock_file: str | Path, busy: str) -> None:
        self.path = Path(lock_file)
        self.busy = busy  # the refusal, with {pid} for the owner
        self.handle = None

    def acquire(self) -> PathLock:
        """Take the lock, or raise IdealError naming the process (pid) that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+b", buffering=0)  # noqa: SIM115  held until release(); unbuffered: close never writes
            if not _try_lock(handle):
                handle.seek(0)
                owner = handle.read().decode("ascii", "replace").strip() or "unknown"
                handle.close()
                raise IdealError(self.busy.format(pid=owner))
            if _same_file(self.path, handle):
                break
            handle.close()  # the owner (or a sweep) removed the file as we opened it: lock the new one
        self.handle = handle
        with contextlib.suppress(OSError):  # the pid only informs whoever is refused (a full disk cannot take it)
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()).encode())
        return self

    def release(self) -> None:
        """Give the path up and remove the lock file."""
        if self.handle is not None:
            self.path.unlink(missing_ok=True)
            _unlock(self.handle)
            self.handle.close()
            self.handle = None


def output_lock(path: Path) -> PathLock:
    """The lock of one output path (a hidden file beside it)."""
    return PathLock(
        path.parent / f"{_LOCK}{path.name}",
        f"{path} is being written by another run (pid {{pid}}); wait for it to finish or choose another output",
    )


# -- committing a run's outputs together --------------------------------------------------------------
@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait (POSIX, main thread) until the block ends: a commit is not cut in half."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def publish(staged: Path, target: Path, overwrite: bool) -> None:
    """Move a finished file or folder onto ``target``. Without ``overwrite`` an existing target is never
    replaced, not even one that appeared meanwhile; a replaced folder is moved aside first, so a kill in
    between leaves it for :func:`sweep_leftovers` to put back."""
    if staged.is_dir():
        if target.exists() and overwrite:
            aside = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), dir=target.parent))
            os.rename(target, aside / f"{_REPLACED}{target.name}")
            os.rename(staged, target)
            shutil.rmtree(aside, ignore_errors=True)
            return
        if target.exists() or target.is_symlink():
            raise FileExistsError(17, "File exists", str(target))
        os.rename(staged, target)
        return
    if overwrite:
        os.replace(staged, target)
        return
    try:
        os.link(staged, target)  # fails if target exists: never a silent replacement
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links
        if target.exists() or target.is_symlink():
            raise FileExistsError(17, "File exists", str(target)) from None
        os.replace(staged, target)
        return
    staged.unlink()


class OutputSet:
    """The outputs of one run, written together or not at all.

    On entering, the outputs are checked (:func:`check_outputs`) and locked; :meth:`staged` gives each
    one a path of the same name in a hidden folder beside it. When the block ends without an error the
    staged files are moved into place one after another (other files a writer put beside them first, e.g.
    a ``.zraw`` before its ``.mhd``); on any error, Ctrl-C or SIGTERM nothing is moved and the hidden
    folders are removed. Only a SIGKILL leaves them, for the next run's sweep.
    """

    def __init__(self, paths: Iterable[str | Path], overwrite: bool, hint: str = "pass --overwrite to replace it", *,
                 inputs: Iterable[str | Path | None] = (), kind: str = "file") -> None:
        self.given = [Path(p) for p in paths]
        self.overwrite, self.hint, self.inputs, self.kind = overwrite, hint, list(inputs), kind
        self.targets: list[Path] = []
        self._locks: list[PathLock] = []
        self._folders: dict[Path, Path] = {}

    def __enter__(self) -> OutputSet:
        self.targets = check_outputs(self.given, self.overwrite, self.hint, inputs=self.inputs, kind=self.kind)
        try:
            for target in self.targets:
                target.parent.mkdir(parents=True, exist_ok=True)
                self._locks.append(output_lock(target).acquire())
            if not self.overwrite:  # another run may have finished the same output since the check
                existing = [str(t) for t in self.targets if t.exists()]
                if existing:
                    raise IdealError(f"output already exists: {', '.join(existing)}; {self.hint}")
        except OSError as error:
            self._release()
            raise IdealError(os_error_message(self.targets[len(self._locks)], error)) from None
        except BaseException:
            self._release()
            raise
        return self

    def staged(self, path: str | Path) -> Path:
        """Where to write the output ``path`` (one of the set's paths): same name, hidden folder."""
        target = Path(os.path.abspath(path))
        if target not in self.targets:
            raise ValueError(f"{path} is not one of this run's outputs")
        folder = self._folders.get(target.parent)
        if folder is None:
            try:
                folder = Path(tempfile.mkdtemp(prefix=temp_prefix(self.targets[0].name), dir=target.parent))
            except OSError as error:
                raise IdealError(os_error_message(target, error)) from None
            self._folders[target.parent] = folder
        return folder / target.name

    def commit(self) -> None:
        """Move every staged output into place (signals wait until the last one is there). Each staged folder is
        marked first, so a SIGKILL part-way leaves a commit that the next run's sweep finishes, not a partial set."""
        with signals_held():
            for parent, folder in self._folders.items():
                plan = {"targets": [t.name for t in self.targets if t.parent == parent], "overwrite": self.overwrite}
                try:
                    (folder / _COMMITTING).write_text(json.dumps(plan), encoding="utf-8")
                except OSError as error:
                    raise IdealError(os_error_message(self.targets[0], error)) from None
            for parent, folder in self._folders.items():
                names = {t.name for t in self.targets if t.parent == parent}
                staged = sorted(folder.iterdir(), key=lambda p: (p.name in names, p.name))
                for entry in staged:
                    if entry.name.startswith(TEMP_PREFIX) or entry.name.startswith(".partial-"):
                        continue
                    try:
                        if entry.is_file():
                            from .atomic import file_mode

                            os.chmod(entry, file_mode())
                        publish(entry, parent / entry.name, self.overwrite)
                    except FileExistsError:
                        raise IdealError(f"output already exists: {parent / entry.name}; {self.hint}") from None
                    except OSError as error:
                        raise IdealError(os_error_message(parent / entry.name, error)) from None

    def _release(self) -> None:
        for folder in self._folders.values():
            shutil.rmtree(folder, ignore_errors=True)
        self._folders.clear()
        for lock in self._locks:
            lock.release()
        self._locks.clear()

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is None:
                self.commit()
            elif isinstance(error, IdealError):  # a writer's message names the output, never the hidden folder
                text = str(error)
                for target in self.targets:
                    folder = self._folders.get(target.parent)
                    if folder is not None:
                        text = text.replace(str(folder / target.name), str(target))
                if text != str(error):
                    raise IdealError(text) from None
        finally:
            self._release()


# -- SIGTERM as Ctrl-C ---------------------------------------------------------------------------------
class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM (or Ctrl-C), so every ``finally`` and ``with`` cleans up."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGINT raise :class:`Interrupted` in the main thread (elsewhere
    nothing changes); the previous handlers come back after it."""
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):
            previous[sig] = signal.signal(sig, _interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def exit_status(interruption: KeyboardInterrupt) -> int:
    """The shell's status for a run stopped by a signal: 128 + its number (130 Ctrl-C, 143 SIGTERM)."""
    return 128 + int(getattr(interruption, "signum", signal.SIGINT))
