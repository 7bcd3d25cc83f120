"""The Windows branches of the child processes, run here by patching ``jobs._WINDOWS`` and ``subprocess``.

On Windows, PythonSlicer is a console program: every child (device probe, warm worker, training or
segmentation job, taskkill) must start with CREATE_NO_WINDOW, or a console window opens whose closing
kills the job. Cancel sends CTRL_BREAK, which fails with OSError from Slicer (it has no console): the
tree must then be killed at once, and the hard-kill timer is armed before any signal is sent.
What only a real Windows Slicer can show (that no window opens, that taskkill ends torchrun workers)
is listed in the issue-28 note and docs/reliability.md.
"""
from __future__ import annotations

import io
import subprocess
import time

import pytest
from IDEALSegmentLib import jobs, worker
from IDEALSegmentLib.devices import DeviceProbe
from IDEALSegmentLib.jobs import CREATE_NEW_PROCESS_GROUP, CREATE_NO_WINDOW, TrainingJob


class FakeProcess:
    """A running child as Popen returns it; ``send_signal`` fails as os.kill does from a process with no console."""

    def __init__(self, *args, signal_error: OSError | None = None, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs
        self.pid = 4242
        self.stdin = io.StringIO()
        self.stdout = io.StringIO("")
        self.stderr = io.StringIO("")
        self.signal_error = signal_error
        self.signals: list[int] = []

    def poll(self):
        return None

    def wait(self, timeout=None):
        return 0

    def send_signal(self, number: int) -> None:
        if self.signal_error is not None:
            raise self.signal_error
        self.signals.append(number)


@pytest.fixture
def windows(monkeypatch):
    """jobs._WINDOWS on; every Popen and run recorded instead of started."""
    monkeypatch.setattr(jobs, "_WINDOWS", True)
    started: list[FakeProcess] = []
    ran: list[tuple[list, dict]] = []

    def popen(*args, **kwargs):
        started.append(FakeProcess(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(subprocess, "run", lambda command, **kwargs: ran.append((command, kwargs)))
    return started, ran


def test_every_child_starts_without_a_console_window(windows, tmp_path):
    started, _ = windows
    TrainingJob(["segment", "--help"]).start()
    worker.Worker().start()
    DeviceProbe(tmp_path / "devices.json").start()
    assert [p.args[0][1:3] for p in started[:2]] == [["-m", "IDEALTrain"], ["-m", "IDEALTrain.worker"]]
    assert started[2].args[0][1] == "-c" and "torch" in started[2].args[0][2]
    for process in started:
        assert process.kwargs["creationflags"] & CREATE_NO_WINDOW, process.args
        assert "start_new_session" not in process.kwargs  # a POSIX-only argument
    job, warm, _probe = started
    assert job.kwargs["creationflags"] & CREATE_NEW_PROCESS_GROUP and warm.kwargs["creationflags"] & CREATE_NEW_PROCESS_GROUP


def test_posix_children_get_their_own_session_and_no_windows_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "_WINDOWS", False)
    assert jobs.new_process_group() == {"start_new_session": True}
    assert jobs.no_console_window() == {}


def test_cancel_without_a_console_kills_the_tree_at_once(windows):
    _, ran = windows
    job = TrainingJob(["train"])
    job._process = FakeProcess(signal_error=OSError(6, "The handle is invalid"))
    job.request_cancel()  # raised OSError before: onCancel and cleanup did not catch it, training went on
    assert job.cancelled and job._kill_at is not None
    (command, kwargs), = ran
    assert command == ["taskkill", "/F", "/T", "/PID", "4242"] and kwargs["creationflags"] & CREATE_NO_WINDOW


def test_a_delivered_ctrl_break_leaves_the_kill_to_the_timer(windows):
    _, ran = windows
    job = TrainingJob(["train"])
    job._process = FakeProcess()
    job.request_cancel(grace=0.0)
    assert job._process.signals == [jobs.CTRL_BREAK_EVENT] and ran == []
    job.poll()  # the grace time is over and the tree still runs: taskkill /T
    assert [command for command, _ in ran] == [["taskkill", "/F", "/T", "/PID", "4242"]]


def test_the_kill_timer_is_armed_before_the_signal_is_sent(windows, monkeypatch):
    job = TrainingJob(["train"])
    job._process = FakeProcess()
    armed = []
    monkeypatch.setattr(job, "_signal_group", lambda terminate: armed.append(job._kill_at))
    before = time.monotonic()
    job.request_cancel(grace=5.0)
    assert armed and armed[0] is not None and armed[0] >= before + 5.0


def test_a_warm_worker_cancelled_without_a_console_is_killed(windows):
    _, ran = windows
    warm = worker.Worker()
    warm.process = FakeProcess(signal_error=OSError(6, "The handle is invalid"))
    command = worker.WorkerJob(["segment"])
    command.worker = warm
    command.request_cancel()
    assert command.cancelled and command._kill_at is not None
    assert [c for c, _ in ran] == [["taskkill", "/F", "/T", "/PID", "4242"]]


def test_a_failed_probe_is_not_cached_so_torch_installed_later_is_probed_again(tmp_path, monkeypatch):
    """Without torch the probe exits 1: the device list shows CPU only, and the next fill probes again."""
    cache = tmp_path / "devices.json"
    monkeypatch.setattr("IDEALSegmentLib.devices.PROBE_CODE", "raise SystemExit(1)")
    probe = DeviceProbe(cache)
    probe.start()
    deadline, devices = time.monotonic() + 30, None
    while devices is None and time.monotonic() < deadline:
        devices = probe.poll()
        time.sleep(0.02)
    assert devices == []
    assert probe.cached() is None and not cache.exists()  # cached [] before: the GPUs never appeared after installing torch
