"""Training jobs: a real tiny ``idealtrain finetune`` in the background, its events, and a clean cancel."""
from __future__ import annotations

import os
import shutil
import sys
import time

import pytest
from IDEALSegmentLib.jobs import TrainingJob, finetune_arguments, parse_line, python_executable

from IDEALTrain.errors import IdealError
from IDEALTrain.io.phantom import write_phantom_dataset
from IDEALTrain.model.bundle import load_bundle

TINY = ["--base-channels", "4", "--depth", "3", "--inplane", "spacing", "--spacing", "4", "--batch-size", "2",
        "--unlabeled-batch-size", "2", "--validate-every", "1000"]


@pytest.fixture(scope="module")
def corrections(tmp_path_factory):
    """A corrections dataset: two labelled phantoms, one unlabelled image."""
    folder = tmp_path_factory.mktemp("corrections")
    write_phantom_dataset(folder, 2, seed=5)
    unlabeled = folder / "unlabeled" / "images"
    unlabeled.mkdir(parents=True)
    shutil.copy(folder / "images" / "phantom_0000.nii.gz", unlabeled / "extra_0000.nii.gz")
    return folder


def wait_for(job, predicate, timeout=60.0):
    """Poll the job until an event satisfies ``predicate``; all events seen so far."""
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += job.poll()
        if any(predicate(e) for e in events):
            return events
        if not job.running and not job.poll():
            break
        time.sleep(0.05)
    raise AssertionError(f"no matching event; seen {events[-5:]}, stderr {job.stderr[-3:]}")


def test_finetune_arguments_follow_the_dataset_layout(corrections, tmp_path):
    arguments = finetune_arguments(corrections_dir=corrections, out=tmp_path / "m", iterations=5, device="cpu", extra=["--seed", "3"])
    assert arguments[:3] == ["finetune", "--labeled", f"folder:{corrections}"]
    assert arguments[arguments.index("--unlabeled") + 1] == f"folder:{corrections / 'unlabeled'}"
    assert "--supervised-only" not in arguments and arguments[-2:] == ["--seed", "3"]
    given = finetune_arguments(corrections_dir=corrections, out="m", iterations=5, unlabeled="ssl4mis:/data/acdc", pretrained="enc")
    assert given[given.index("--unlabeled") + 1] == "ssl4mis:/data/acdc" and given[given.index("--pretrained") + 1] == "enc"
    labelled_only = tmp_path / "labelled_only"
    shutil.copytree(corrections / "images", labelled_only / "images")
    shutil.copytree(corrections / "labels", labelled_only / "labels")
    arguments = finetune_arguments(corrections_dir=labelled_only, out="m", iterations=5)
    assert "--supervised-only" in arguments and "--unlabeled" not in arguments
    with pytest.raises(IdealError, match="not a corrections dataset"):
        finetune_arguments(corrections_dir=tmp_path / "absent", out="m", iterations=5)


def test_a_tiny_finetune_runs_to_a_loadable_bundle(corrections, tmp_path):
    out = tmp_path / "model"
    arguments = finetune_arguments(corrections_dir=corrections, out=out, iterations=2, device="cpu", extra=TINY)
    job = TrainingJob(arguments, log_path=tmp_path / "logs" / "train.log")
    assert job.command[-1] == "--progress-json" and job.command[1:3] == ["-m", "IDEALTrain"]
    job.start()
    assert job.wait(timeout=120) == 0, job.stderr[-5:]
    events = job.poll()
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["iteration"] for e in progress] == [1, 2] and all(e["total"] == 2 for e in progress)
    assert job.latest == {"event": "done", "bundle": str(out)} and events[-1] == job.latest
    assert job.error is None and not job.running and job.returncode == 0
    assert load_bundle(out).training["unlabeled_data"] == f"folder:{corrections / 'unlabeled'}"
    assert '"event": "done"' in (tmp_path / "logs" / "train.log").read_text()
    with pytest.raises(IdealError, match="already been started"):
        job.start()


def test_cancel_ends_the_whole_process_group(corrections, tmp_path):
    out = tmp_path / "model"
    arguments = finetune_arguments(corrections_dir=corrections, out=out, iterations=100000, device="cpu", extra=TINY)
    job = TrainingJob(arguments)
    job.start()
    pgid = os.getpgid(job.pid)
    assert pgid == job.pid != os.getpgid(0)  # its own group, so the group can be signalled alone
    wait_for(job, lambda e: e["event"] == "progress")
    started = time.monotonic()
    job.cancel(timeout=10)
    assert time.monotonic() - started < 15
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert job.returncode is not None and job.returncode != 0 and not job.running and job.cancelled
    assert "stopped" in job.error  # SIGTERM: idealtrain saves its state and says so on stderr
    assert not out.exists()
    job.cancel()  # cancelling again is harmless


def test_errors_and_plain_lines(tmp_path):
    job = TrainingJob(["finetune", "--labeled", f"folder:{tmp_path / 'absent'}", "--out", str(tmp_path / "m"), "--iterations", "1"])
    job.start()
    assert job.wait(timeout=60) == 2
    assert "does not exist" in job.error and job.latest is None
    assert parse_line("epoch 3 done\n") == {"event": "log", "text": "epoch 3 done"}
    assert parse_line('{"event": "progress", "iteration": 1}') == {"event": "progress", "iteration": 1}
    assert parse_line("[1, 2]") == {"event": "log", "text": "[1, 2]"}


def test_python_inside_slicer_is_pythonslicer_beside_the_launcher(tmp_path, monkeypatch):
    assert python_executable() == type(python_executable())(sys.executable)
    (tmp_path / "Slicer").write_text("")
    (tmp_path / "PythonSlicer").write_text("")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "Slicer"))
    assert python_executable() == tmp_path / "PythonSlicer"


def test_request_cancel_returns_at_once_and_poll_ends_a_stubborn_tree(tmp_path):
    """What the GUI calls never waits on the child: request_cancel returns at once; poll SIGKILLs after the grace time."""
    script = tmp_path / "stubborn.py"
    script.write_text("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(60)\n")

    class StubbornJob(TrainingJob):  # the stubborn script instead of idealtrain, with the same process-group machinery
        @property
        def command(self) -> list[str]:
            return [sys.executable, str(script)]

    job = StubbornJob([])
    job.start()
    wait_for(job, lambda e: e.get("text") == "up")
    assert not job.finished
    start = time.monotonic()
    job.request_cancel(grace=0.5)
    assert time.monotonic() - start < 0.2 and job.cancelled
    deadline = time.monotonic() + 10
    while not job.finished and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    assert job.finished and job.returncode != 0  # SIGTERM was ignored: poll killed the group
