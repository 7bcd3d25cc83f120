"""The warm ``idealtrain`` worker (``python -m IDEALTrain.worker``) seen from Slicer's process.

Starting Python and importing torch costs seconds per child; a panel starts a worker when it opens
(:func:`prestart`), so a Segment click only hands files over. :class:`WorkerJob` has
:class:`~.jobs.TrainingJob`'s interface (``start``, ``poll``, ``finished``, ``returncode``,
``error``, ``cancelled``, ``request_cancel``), so a :class:`~.jobs.JobChain` runs either. A worker
runs one command at a time; a busy one is never shared (:func:`acquire` starts another). Cancel ends
the worker's whole process group; the next command starts a fresh worker. One reader thread per
worker moves its output lines into a queue; no model work runs in this process.
"""
from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO

from IDEALTrain.errors import IdealError

from .jobs import (
    CANCEL_GRACE_SECONDS,
    PROGRESS_FLAG,
    _child_environment,
    new_process_group,
    parse_line,
    python_executable,
    signal_process_group,
)

#: Idle workers kept for the next command (a second is started only while the first is busy).
POOL_SIZE = 2


class Worker:
    """One ``python -m IDEALTrain.worker`` child in its own process group."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.lines: queue.Queue[dict] = queue.Queue()
        self.stderr: deque[str] = deque(maxlen=50)
        self.busy = False
        #: Set by :meth:`stop`: the process is ending (it may still look alive for a moment) and never gets another command.
        self.retired = False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def usable(self) -> bool:
        """Idle, running and not being stopped: may take the next command."""
        return not self.busy and not self.retired and self.alive

    def start(self) -> None:
        """Start the child unless it runs (returns at once; it imports torch in the background)."""
        if self.retired:
            raise IdealError("this IDEALTrain worker has been stopped; acquire() another")
        if self.alive:
            return
        self.lines = queue.Queue()
        try:
            self.process = subprocess.Popen(
                [str(python_executable()), "-m", "IDEALTrain.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", bufsize=1, env=_child_environment(),
                **new_process_group(),
            )
        except OSError as error:
            raise IdealError(f"could not start the IDEALTrain worker with {python_executable()}: {error.strerror or error}") from None
        threading.Thread(target=self._read_stdout, args=(self.process, self.process.stdout), daemon=True, name="worker-stdout").start()
        threading.Thread(target=self._read_stderr, args=(self.process, self.process.stderr), daemon=True, name="worker-stderr").start()

    def _read_stdout(self, process: subprocess.Popen, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(parse_line(line))
        last = self.stderr[-1] if self.stderr else "no message"
        self.lines.put({"event": "exit", "returncode": process.wait(), "error": f"the IDEALTrain worker stopped ({last})", "stopped": True})

    def _read_stderr(self, process: subprocess.Popen, stream: IO[str]) -> None:
        for line in stream:
            if line.strip():
                self.stderr.append(line.rstrip("\r\n"))

    def send(self, arguments: list[str]) -> None:
        """Hand one idealtrain command line to the worker."""
        try:
            self.process.stdin.write(json.dumps({"args": [str(a) for a in arguments]}) + "\n")
            self.process.stdin.flush()
        except (OSError, ValueError) as error:
            raise IdealError(f"the IDEALTrain worker is not running ({error})") from None

    def stop(self, terminate: bool = True) -> None:
        """End the worker's process group (SIGTERM, or SIGKILL with ``terminate=False``); returns at once. From now
        on it is retired: until the system has reaped it, it can look alive and idle, and must not get a command."""
        self.retired = True
        if self.alive:
            signal_process_group(self.process, terminate)


_pool: list[Worker] = []


def acquire() -> Worker:
    """An idle, running worker (started now if there is none); marked busy until its job ends. A worker being
    stopped (a cancel) is never handed out, even while its process has not ended yet."""
    _pool[:] = [w for w in _pool if w.busy or (w.alive and not w.retired)]
    worker = next((w for w in _pool if not w.busy and not w.retired), None)
    if worker is None:
        worker = Worker()
        if len(_pool) < POOL_SIZE:
            _pool.append(worker)
    worker.start()
    worker.busy = True
    return worker


def prestart() -> None:
    """Start a worker in the background unless one is idle (a panel calls this when it opens)."""
    if not any(w.usable for w in _pool):
        acquire().busy = False


def shutdown() -> None:
    """Stop every idle worker (Slicer exits, or the module is reloaded)."""
    for worker in _pool:
        if not worker.busy:
            worker.stop()


class WorkerJob:
    """One idealtrain command run by a warm worker; :class:`~.jobs.TrainingJob`'s interface."""

    def __init__(self, arguments: list[str], log_path: Path | None = None) -> None:
        self.arguments = [str(a) for a in arguments] + ([] if PROGRESS_FLAG in arguments else [PROGRESS_FLAG])
        self.log_path = Path(log_path) if log_path is not None else None
        self.worker: Worker | None = None
        self.cancelled = False
        self.latest: dict | None = None
        self._exit: dict | None = None
        self._kill_at: float | None = None

    def start(self) -> None:
        if self.worker is not None:
            raise IdealError("this job has already been started; create a new one to run again")
        self.worker = acquire()
        self.worker.send(self.arguments)

    def poll(self) -> list[dict]:
        """The events that arrived since the last call (never blocks)."""
        if self.worker is None or self._exit is not None:
            return []
        if self._kill_at is not None and time.monotonic() >= self._kill_at:
            self.worker.stop(terminate=False)
            self._kill_at = None
        events = []
        while self._exit is None:
            try:
                event = self.worker.lines.get_nowait()
            except queue.Empty:
                break
            self._log(event)
            if event.get("event") == "exit":
                self._exit = event
                if self.cancelled or event.get("stopped") or self.worker not in _pool:  # retired before it is idle
                    self.worker.stop(terminate=not (self.cancelled or event.get("stopped")))  # an extra worker is not kept
                self.worker.busy = False
            elif event.get("event") != "ready":
                events.append(event)
                if event.get("event") != "log":
                    self.latest = event
        return events

    def _log(self, event: dict) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write((event["text"] if event.get("event") == "log" else json.dumps(event)) + "\n")

    @property
    def finished(self) -> bool:
        """The command has ended and all its output has been read (by :meth:`poll`)."""
        return self._exit is not None

    @property
    def running(self) -> bool:
        return self.worker is not None and self._exit is None

    @property
    def returncode(self) -> int | None:
        return None if self._exit is None else int(self._exit.get("returncode") or 0)

    @property
    def error(self) -> str | None:
        return None if self._exit is None or self.returncode == 0 else (self._exit.get("error") or f"exit status {self.returncode}")

    def request_cancel(self, grace: float = CANCEL_GRACE_SECONDS) -> None:
        """End the worker running this command (returns at once); :meth:`poll` kills it after ``grace`` s."""
        if self.worker is None or self._exit is not None:
            return
        self.cancelled = True
        self._kill_at = time.monotonic() + grace  # armed first: the worker is killed even if the signal goes nowhere
        self.worker.stop()
