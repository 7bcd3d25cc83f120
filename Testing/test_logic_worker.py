"""The warm idealtrain worker: commands run in one long-lived child, errors keep it up, cancel ends it."""
from __future__ import annotations

import time

import pytest
from helpers import tiny_bundle
from IDEALSegmentLib import worker as worker_module
from IDEALSegmentLib.jobs import JobChain
from IDEALSegmentLib.worker import WorkerJob, acquire, prestart

from IDEALTrain.io.phantom import make_phantom
from IDEALTrain.io.volume_files import read_image, write_image
from IDEALTrain.model.bundle import save_bundle


def finish(job, timeout=120.0):
    deadline = time.monotonic() + timeout
    events = []
    while not job.finished and time.monotonic() < deadline:
        events += job.poll()
        time.sleep(0.02)
    assert job.finished, "the worker job did not end"
    return events


@pytest.fixture
def files(tmp_path):
    image, _ = make_phantom(1, size=(32, 32, 4), spacing=(2.0, 2.0, 8.0))
    write_image(image, tmp_path / "in.nrrd")
    return save_bundle(tiny_bundle(0), tmp_path / "model"), tmp_path


def test_commands_share_one_warm_worker_and_an_error_keeps_it(files):
    model, folder = files
    prestart()
    first = WorkerJob(["segment", "--model", model, "--input", folder / "in.nrrd", "--output", folder / "a.nrrd", "--device", "cpu"])
    first.start()
    events = finish(first)
    assert first.returncode == 0 and first.error is None
    assert [e["event"] for e in events if e["event"] != "progress"] == ["segmented"]
    assert read_image(folder / "a.nrrd").same_grid(read_image(folder / "in.nrrd"))
    pid = first.worker.process.pid
    bad = WorkerJob(["segment", "--model", folder / "absent", "--input", folder / "in.nrrd", "--output", folder / "b.nrrd"])
    bad.start()
    finish(bad)
    assert bad.returncode == 2 and "absent" in bad.error
    again = WorkerJob(["segment", "--model", model, "--input", folder / "in.nrrd", "--output", folder / "c.nrrd", "--device", "cpu"])
    again.start()
    finish(again)
    assert again.returncode == 0 and again.worker.process.pid == pid  # the same warm process
    training = WorkerJob(["finetune", "--labeled", "folder:x", "--out", folder / "m", "--iterations", "1"])
    training.start()
    finish(training)
    assert training.returncode == 2 and "runs only segment, evaluate" in training.error


def test_cancel_ends_the_worker_and_the_next_command_gets_a_new_one(files):
    model, folder = files
    job = WorkerJob(["segment", "--model", model, "--input", folder / "in.nrrd", "--output", folder / "a.nrrd", "--device", "cpu"])
    job.start()
    pid = job.worker.process.pid
    job.request_cancel()
    finish(job, 30)
    assert job.cancelled and job.returncode != 0 and not job.worker.alive
    busy = acquire()  # a busy worker is never shared: the next command gets another
    chain = JobChain([["segment", "--model", model, "--input", folder / "in.nrrd", "--output", folder / "d.nrrd", "--device", "cpu"]], job_class=WorkerJob)
    chain.start()
    assert chain.job.worker is not busy and chain.job.worker.process.pid != pid
    deadline = time.monotonic() + 120
    while chain.state == "running" and time.monotonic() < deadline:
        chain.poll()
        time.sleep(0.02)
    assert chain.state == "done" and (folder / "d.nrrd").is_file()
    busy.busy = False
    assert len(worker_module._pool) <= worker_module.POOL_SIZE


def test_a_job_started_right_after_a_cancel_never_goes_to_the_dying_worker(files, monkeypatch):
    """Under load a job started right after a cancel went to the dying worker: a command that ended just as it
    was cancelled left the worker idle and, until the system reaped it, alive. Here the signals are held back
    so that moment lasts: the worker must still never get another command."""
    model, folder = files
    job = WorkerJob(["segment", "--model", folder / "absent", "--input", folder / "in.nrrd", "--output", folder / "x.nrrd"])
    job.start()
    dying = job.worker
    deadline = time.monotonic() + 120
    while not any(e.get("event") == "exit" for e in list(dying.lines.queue)) and time.monotonic() < deadline:
        time.sleep(0.02)  # the command has ended in the worker; the panel has not polled yet
    held = []
    monkeypatch.setattr(worker_module, "signal_process_group", lambda process, terminate: held.append(terminate))
    job.request_cancel()  # Cancel, a moment too late
    finish(job, 30)
    assert job.cancelled and held and dying.alive and not dying.busy  # idle and alive, but on its way out
    monkeypatch.undo()
    nxt = acquire()
    try:
        assert nxt is not dying and nxt.process.pid != dying.process.pid and dying not in worker_module._pool
    finally:
        nxt.busy = False
        dying.stop(terminate=False)


def test_a_second_writer_of_one_output_through_the_worker_is_refused_while_the_first_writes(files):
    """Two runs writing the same new output path both exited 0 (command line and worker) and one result silently
    replaced the other. The worker runs the command line's own output guard: while a writer holds the path's
    lock, a worker command writing there ends with one line and leaves the path alone."""
    output_guard = pytest.importorskip("IDEALTrain.io.output_guard", reason="the output guard (issue 27a) is not merged yet")
    model, folder = files
    target = folder / "shared.nrrd"
    writer = output_guard.output_lock(target).acquire()  # a run in the middle of writing target
    try:
        job = WorkerJob(["segment", "--model", model, "--input", folder / "in.nrrd", "--output", target, "--device", "cpu"])
        job.start()
        finish(job)
        assert job.returncode == 2 and "being written by another run" in job.error and "\n" not in job.error
        assert not target.exists()
    finally:
        writer.release()
    again = WorkerJob(["segment", "--model", model, "--input", folder / "in.nrrd", "--output", target, "--device", "cpu"])
    again.start()
    finish(again)
    assert again.returncode == 0 and read_image(target).same_grid(read_image(folder / "in.nrrd"))
