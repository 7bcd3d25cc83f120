"""Training runs as background processes: ``python -m IDEALTrain ... --progress-json`` with a
structured progress stream and a Cancel that ends the whole process tree.

The child runs in its own process group (a new session on POSIX, a new process group on Windows)
so that cancelling also reaches processes it started (``torchrun`` workers). Reader threads turn its
stdout into events; nothing here touches Qt or MRML, so a GUI polls :meth:`TrainingJob.poll` from a
timer on the main thread.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Sequence

from IDEALTrain.errors import IdealError
from IDEALTrain.io.volume_files import has_volume_suffix

PROGRESS_FLAG = "--progress-json"
_WINDOWS = sys.platform == "win32"


def python_executable() -> Path:
    """The Python to run IDEALTrain with: ``PythonSlicer`` beside ``sys.executable`` when present.

    Inside Slicer ``sys.executable`` can be the Slicer launcher rather than a Python interpreter;
    Slicer ships its interpreter as ``PythonSlicer`` in the same folder. Elsewhere (a venv, CI) it
    is ``sys.executable`` itself.
    """
    executable = Path(sys.executable)
    for name in ("PythonSlicer.exe", "PythonSlicer") if _WINDOWS else ("PythonSlicer",):
        candidate = executable.with_name(name)
        if candidate.is_file():
            return candidate
    return executable


def _child_environment() -> dict[str, str]:
    """This environment plus the folder holding IDEALTrain on PYTHONPATH (Slicer does not pip-install it)."""
    import IDEALTrain

    environment = dict(os.environ)
    root = str(Path(IDEALTrain.__file__).resolve().parent.parent)
    paths = [root] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def parse_line(line: str) -> dict:
    """A JSON event from one output line; any other line becomes ``{"event": "log", "text": line}``."""
    text = line.rstrip("\r\n")
    try:
        event = json.loads(text)
    except ValueError:
        return {"event": "log", "text": text}
    return event if isinstance(event, dict) and "event" in event else {"event": "log", "text": text}


class TrainingJob:
    """One ``idealtrain`` run in the background: start, poll events, cancel, wait."""

    def __init__(self, arguments: Sequence[str], log_path: Path | None = None) -> None:
        self.arguments = [str(a) for a in arguments]
        if PROGRESS_FLAG not in self.arguments:
            self.arguments.append(PROGRESS_FLAG)
        self.log_path = Path(log_path) if log_path is not None else None
        self.latest: dict | None = None  # newest event other than log lines
        self.cancelled = False
        self._process: subprocess.Popen | None = None
        self._events: queue.Queue[dict] = queue.Queue()
        self._stderr: deque[str] = deque(maxlen=200)
        self._readers: list[threading.Thread] = []
        self._log: IO[str] | None = None
        self._log_lock = threading.Lock()

    @property
    def command(self) -> list[str]:
        """The full command line that :meth:`start` runs."""
        return [str(python_executable()), "-m", "IDEALTrain", *self.arguments]

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Launch the process in its own process group; output is read by two threads."""
        if self._process is not None:
            raise IdealError("this training job has already been started; create a new one to run again")
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a", encoding="utf-8")
        group = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if _WINDOWS else {"start_new_session": True}
        try:
            self._process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, encoding="utf-8", errors="replace", bufsize=1, env=_child_environment(), **group,
            )
        except OSError as error:
            self._close_log()
            raise IdealError(f"could not start training with {self.command[0]}: {error.strerror or error}") from None
        self._readers = [
            threading.Thread(target=self._read_stdout, name="idealtrain-stdout", daemon=True),
            threading.Thread(target=self._read_stderr, name="idealtrain-stderr", daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _write_log(self, line: str) -> None:
        if self._log is not None:
            with self._log_lock:
                self._log.write(line if line.endswith("\n") else line + "\n")
                self._log.flush()

    def _read_stdout(self) -> None:
        for line in self._process.stdout:
            self._write_log(line)
            self._events.put(parse_line(line))
        self._process.stdout.close()

    def _read_stderr(self) -> None:
        for line in self._process.stderr:
            self._write_log(line)
            if line.strip():
                self._stderr.append(line.rstrip("\r\n"))
        self._process.stderr.close()

    def poll(self) -> list[dict]:
        """The events that arrived since the last call (never blocks)."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            events.append(event)
            if event.get("event") != "log":
                self.latest = event
        return events

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    @property
    def error(self) -> str | None:
        """The last line the process wrote to stderr, when it ended with a non-zero status."""
        code = self.returncode
        if code in (None, 0):
            return None
        self._join_readers(1.0)
        return self._stderr[-1] if self._stderr else f"training ended with exit status {code}"

    @property
    def stderr(self) -> list[str]:
        """The last (up to 200) non-empty stderr lines, for a details box."""
        return list(self._stderr)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to end (``subprocess.TimeoutExpired`` after ``timeout`` s); its exit status."""
        if self._process is None:
            raise IdealError("the training job has not been started")
        code = self._process.wait(timeout)
        self._join_readers(None if timeout is None else 5.0)
        return code

    def cancel(self, timeout: float = 10.0) -> None:
        """Stop the whole process tree: SIGTERM to the group (training saves a checkpoint), then SIGKILL.

        Returns once the main process is gone and the group is empty (or killed after ``timeout`` s).
        """
        if self._process is None:
            return
        self.cancelled = True
        if self._process.poll() is None:
            self._signal_group(terminate=True)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + (timeout if self._group_alive() else 0.0)
        while self._group_alive() and time.monotonic() < deadline:
            time.sleep(0.05)  # children (torchrun workers) finishing their own SIGTERM handling
        if self._process.poll() is None or self._group_alive():
            self._signal_group(terminate=False)
            self._process.wait()
        self._join_readers(5.0)

    def _signal_group(self, terminate: bool) -> None:
        if _WINDOWS:
            if terminate:
                self._process.send_signal(signal.CTRL_BREAK_EVENT)
            else:  # taskkill /T ends the process and every process it started
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._process.pid)], capture_output=True)
            return
        try:
            os.killpg(self._process.pid, signal.SIGTERM if terminate else signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _group_alive(self) -> bool:
        """Whether any process of the job's group is still running (POSIX; on Windows the main one)."""
        if _WINDOWS:
            return self._process.poll() is None
        try:
            os.killpg(self._process.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _join_readers(self, timeout: float | None) -> None:
        for reader in self._readers:
            reader.join(timeout)
        if not any(reader.is_alive() for reader in self._readers):
            self._close_log()

    def _close_log(self) -> None:
        with self._log_lock:
            if self._log is not None:
                self._log.close()
                self._log = None


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and any(has_volume_suffix(p) for p in folder.iterdir())


def _data_spec(value: str | Path) -> str:
    """A data spec as given (``folder:DIR``, ``ssl4mis:DIR`` ...) or ``folder:`` + a plain path."""
    from IDEALTrain.io.datasets import SPEC_KINDS

    text = str(value)
    kind, sep, _ = text.partition(":")
    return text if sep and kind in SPEC_KINDS else f"folder:{text}"


def finetune_arguments(
    *,
    corrections_dir: str | Path,
    out: str | Path,
    iterations: int,
    pretrained: str | Path | None = None,
    unlabeled: str | Path | None = None,
    device: str = "auto",
    extra: Sequence[str] = (),
) -> list[str]:
    """Arguments of ``idealtrain finetune`` on a corrections dataset folder.

    Labelled data: ``folder:DIR`` (DIR/images + DIR/labels). Unlabelled: ``unlabeled`` when given (a
    spec or a folder), else ``folder:DIR/unlabeled`` when DIR/unlabeled/images holds images, else
    ``--supervised-only``. ``pretrained`` is an encoder bundle from ``idealtrain pretrain``.
    """
    folder = Path(corrections_dir)
    if not _has_images(folder / "images") or not (folder / "labels").is_dir():
        raise IdealError(f"{folder}: not a corrections dataset (needs images/ and labels/ with at least one case); export corrections first")
    if iterations < 1:
        raise IdealError(f"iterations must be at least 1, got {iterations}")
    arguments = ["finetune", "--labeled", f"folder:{folder}", "--out", str(out), "--iterations", str(iterations), "--device", device]
    if unlabeled is not None:
        arguments += ["--unlabeled", _data_spec(unlabeled)]
    elif _has_images(folder / "unlabeled" / "images"):
        arguments += ["--unlabeled", f"folder:{folder / 'unlabeled'}"]
    else:
        arguments.append("--supervised-only")
    if pretrained is not None:
        arguments += ["--pretrained", str(pretrained)]
    return arguments + [str(a) for a in extra]
