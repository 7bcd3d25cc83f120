"""All model work of the Slicer panels runs as background processes: ``python -m IDEALTrain ...
--progress-json`` (training, segmentation, model comparison) with a structured progress stream and
a Cancel that ends the whole process tree.

The child runs in its own process group (a new session on POSIX, a new process group on Windows)
so that cancelling also reaches processes it started (``torchrun`` workers). On Windows every child
starts with ``CREATE_NO_WINDOW``: PythonSlicer is a console program, and without it each child would
open a console window whose closing kills the job (Slicer's own ``launchConsoleProcess`` does the same). Two reader threads
only move its output lines into a queue (no model work runs in this process); nothing here
touches Qt or MRML, and nothing a GUI calls blocks: it polls :meth:`TrainingJob.poll` and
:attr:`TrainingJob.finished` from a timer and cancels with :meth:`TrainingJob.request_cancel`.
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
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from IDEALTrain.errors import IdealError
from IDEALTrain.io.volume_files import has_volume_suffix

PROGRESS_FLAG = "--progress-json"
_WINDOWS = sys.platform == "win32"
#: Seconds a cancelled process tree gets to end after SIGTERM before :meth:`TrainingJob.poll` kills it.
CANCEL_GRACE_SECONDS = 10.0
#: Windows process-creation flags and console event (the subprocess and signal modules name them only on Windows).
CREATE_NEW_PROCESS_GROUP = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200)
CREATE_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)
CTRL_BREAK_EVENT = getattr(signal, "CTRL_BREAK_EVENT", 1)


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
    """One ``idealtrain`` run in the background (any command with ``--progress-json``): start, poll, cancel."""

    def __init__(self, arguments: Sequence[str], log_path: Path | None = None) -> None:
        self.arguments = [str(a) for a in arguments]
        if PROGRESS_FLAG not in self.arguments:
            self.arguments.append(PROGRESS_FLAG)
        self.log_path = Path(log_path) if log_path is not None else None
        self.latest: dict | None = None  # newest event other than log lines
        self.cancelled = False
        self._kill_at: float | None = None  # after request_cancel: when poll() ends the tree for good
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
        group = new_process_group()
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
        """The events that arrived since the last call (never blocks); ends a cancelled tree after its grace time."""
        if self._kill_at is not None and time.monotonic() >= self._kill_at and self._process.poll() is None:
            self._signal_group(terminate=False)
            self._kill_at = None
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
    def finished(self) -> bool:
        """The process has ended and all its output has been read (never blocks)."""
        if self._process is None or self._process.poll() is None:
            return False
        if any(reader.is_alive() for reader in self._readers):
            return False
        self._close_log()
        return True

    def request_cancel(self, grace: float = CANCEL_GRACE_SECONDS) -> None:
        """Ask the whole process tree to stop (SIGTERM) and return at once; :meth:`poll` kills it after ``grace`` s."""
        if self._process is None or self._process.poll() is not None:
            self.cancelled = self._process is not None or self.cancelled
            return
        self.cancelled = True
        self._kill_at = time.monotonic() + grace  # armed first: the tree is killed even if the signal goes nowhere
        self._signal_group(terminate=True)

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
        """Stop the whole process tree and wait: SIGTERM to the group (training saves a checkpoint), then SIGKILL.

        Returns once the main process is gone and the group is empty (or killed after ``timeout`` s).
        Scripts and tests use it; a GUI calls :meth:`request_cancel` instead, which does not wait.
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
        signal_process_group(self._process, terminate)

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


def new_process_group() -> dict:
    """Popen keyword arguments that start a child in its own process group (so a cancel reaches its children).

    On Windows also without a console window (see the module docstring).
    """
    return {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW} if _WINDOWS else {"start_new_session": True}


def no_console_window() -> dict:
    """Popen / run keyword arguments for a short-lived child: on Windows, no console window opens for it."""
    return {"creationflags": CREATE_NO_WINDOW} if _WINDOWS else {}


def signal_process_group(process: subprocess.Popen, terminate: bool) -> None:
    """SIGTERM (``terminate``) or SIGKILL to a child's whole process group (Windows: CTRL_BREAK, taskkill /T).

    Never raises for a tree that is still running: on Windows, Slicer has no console to send CTRL_BREAK
    from (``os.kill`` raises OSError), and then the tree is ended at once with taskkill instead.
    """
    if _WINDOWS:
        if terminate:
            try:
                process.send_signal(CTRL_BREAK_EVENT)
                return
            except OSError:
                pass  # no console to send it from: nothing graceful can reach the child, so end the tree now
        # taskkill /T ends the process and every process it started
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, **no_console_window())
        return
    try:
        os.killpg(process.pid, signal.SIGTERM if terminate else signal.SIGKILL)
    except ProcessLookupError:
        pass


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


class JobChain:
    """``idealtrain`` runs one after another (pretrain then finetune; ED then ES; old then new model), polled from a timer.

    :attr:`state` is ``running``, ``done``, ``failed`` (:attr:`error` says why) or ``cancelled``;
    :attr:`fraction` is the overall progress from the runs' ``progress`` events (``fraction``, or
    ``iteration``/``total``); :attr:`events` keeps every other JSON event (``segmented``, ``done``...).
    """

    def __init__(self, steps: Sequence[Sequence[str]], log_path: Path | None = None, job_class: type | None = None) -> None:
        if not steps:
            raise IdealError("nothing to run")
        self.steps = [list(step) for step in steps]
        self.log_path = log_path
        self.job_class = job_class or TrainingJob  # or worker.WorkerJob: the same interface, in a warm worker
        self.state = "new"
        self.error: str | None = None
        self.fraction = 0.0
        self.step = -1
        self.events: list[dict] = []
        self.job = None  # the running TrainingJob (or WorkerJob)

    def start(self) -> None:
        """Start the first run."""
        self.state = "running"
        self._start(0)

    def _start(self, step: int) -> None:
        self.step = step
        self.job = self.job_class(self.steps[step], log_path=self.log_path)
        self.job.start()

    def poll(self) -> list[dict]:
        """The new events (never blocks); starts the next run when one ends well, and sets :attr:`state`."""
        if self.state != "running" or self.job is None:
            return []
        events = self.job.poll()
        for event in events:
            kind = event.get("event")
            if kind == "progress":
                fraction = event.get("fraction")
                if not isinstance(fraction, (int, float)) and isinstance(event.get("iteration"), (int, float)):
                    fraction = event["iteration"] / (event.get("total") or 1)
                if isinstance(fraction, (int, float)):
                    self.fraction = (self.step + min(max(float(fraction), 0.0), 1.0)) / len(self.steps)
            elif kind != "log":
                self.events.append(event)
        if not self.job.finished:
            return events
        events += self.job.poll()
        if self.job.cancelled:
            self.state = "cancelled"
        elif self.job.returncode != 0:
            self.state, self.error = "failed", self.job.error or f"idealtrain ended with exit status {self.job.returncode}"
        elif self.step + 1 < len(self.steps):
            self._start(self.step + 1)
        else:
            self.state, self.fraction = "done", 1.0
        return events

    def cancel(self) -> None:
        """Stop the running process tree (returns at once; :meth:`poll` reports ``cancelled`` once it has ended)."""
        if self.state == "running" and self.job is not None:
            self.job.request_cancel()
