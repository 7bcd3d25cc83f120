"""Fault injection on runs: training killed (SIGTERM, SIGKILL) at random points and resumed to identical
weights, concurrent runs on one checkpoint folder, and batch.py's hostile cases (relative --mrb, an
--output that is a file, an existing CSV, a truncated input, a hand-broken corrections manifest)."""
from __future__ import annotations

import importlib.util
import json
import os
import queue
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import import_slicer_core, tiny_bundle
from safetensors.torch import load_file

slicer = import_slicer_core()

from IDEALTrain.cli import main  # noqa: E402
from IDEALTrain.errors import IdealError  # noqa: E402
from IDEALTrain.io.phantom import make_phantom, write_phantom_dataset  # noqa: E402
from IDEALTrain.io.volume_files import write_image  # noqa: E402
from IDEALTrain.model.bundle import save_bundle  # noqa: E402
from IDEALTrain.training.checkpoint import CheckpointLock  # noqa: E402

BATCH = Path(__file__).resolve().parents[1] / "IDEALSegment" / "IDEALSegmentBatch" / "batch.py"
ITERATIONS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_phantom_dataset(root, 2, seed=4)
    return root


def train_command(data: Path, out: Path, checkpoints: Path | None, *extra: str, iterations: int = ITERATIONS) -> list[str]:
    command = [sys.executable, "-m", "IDEALTrain", "train", "--data", f"folder:{data}", "--iterations", str(iterations),
               "--out", str(out), "--size", "32", "--base-channels", "4", "--depth", "3", "--batch-size", "2",
               "--device", "cpu", "--progress-json", "--checkpoint-every", "1", *extra]
    return command + (["--checkpoint-dir", str(checkpoints)] if checkpoints else [])


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def start_and_signal(command: list[str], at_iteration: int, sig: int) -> subprocess.Popen:
    """Start a run and send ``sig`` once it reports ``at_iteration``; the finished process."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    for line in process.stdout:
        event = json.loads(line) if line.startswith("{") else {}
        if event.get("event") == "progress" and event.get("iteration", 0) >= at_iteration:
            process.send_signal(sig)
            break
    process.communicate(timeout=120)
    return process


@pytest.fixture(scope="module")
def one_thread():
    """In-process runs with the one thread the killed child has, so their arithmetic is the same."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def in_process(command: list[str]) -> int:
    return main(command[3:])  # without "python -m IDEALTrain"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory, one_thread):
    """The weights of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "model"
    assert in_process(train_command(data, out, None)) == 0
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_run_resumes_to_identical_weights(data, reference, tmp_path, capsys, sig):
    at = random.Random().randint(2, ITERATIONS - 2)  # progress N is printed after checkpoint N - 1 is saved
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "model"
    killed = start_and_signal(train_command(data, out, checkpoints), at, sig)
    assert killed.returncode == (3 if sig == signal.SIGTERM else -signal.SIGKILL), (at, killed.stderr[-2000:])
    assert not out.exists()
    capsys.readouterr()
    assert in_process(train_command(data, out, checkpoints)) == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--resume" in err
    assert in_process(train_command(data, out, checkpoints, "--resume")) == 0, f"killed at iteration {at}"
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == reference.keys()
    assert all(bool((weights[name] == reference[name]).all()) for name in reference), f"killed at iteration {at}"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.safetensors"]  # no lock or temporary file left


def test_two_runs_on_one_checkpoint_folder(data, tmp_path, capsys):
    checkpoints = tmp_path / "checkpoints"
    first = subprocess.Popen(train_command(data, tmp_path / "a", checkpoints, iterations=100000)[:-2]
                             + ["--checkpoint-every", "100000", "--checkpoint-dir", str(checkpoints)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=environment())
    try:
        assert '"progress"' in next(line for line in first.stdout if '"progress"' in line)  # it holds the folder now
        second = train_command(data, tmp_path / "b", checkpoints, iterations=1)[3:]
        capsys.readouterr()
        assert main(second) == 2
        err = capsys.readouterr().err
        assert f"in use by another training run (pid {first.pid})" in err
    finally:
        first.kill()
        first.wait()
    assert (checkpoints / CheckpointLock.NAME).exists()  # a killed owner leaves its lock file ...
    assert main(second) == 0  # ... which the next run takes over
    assert (tmp_path / "b").is_dir()


def test_a_lock_is_refused_in_process_too(tmp_path):
    held = CheckpointLock(tmp_path).acquire()
    try:
        with pytest.raises(IdealError, match=f"pid {os.getpid()}"):
            CheckpointLock(tmp_path).acquire()
    finally:
        held.release()
    CheckpointLock(tmp_path).acquire().release()
    assert not (tmp_path / CheckpointLock.NAME).exists()


# -- batch.py ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch():
    spec = importlib.util.spec_from_file_location("idealsegment_batch_reliability", BATCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    image, _ = make_phantom(2, size=(40, 36, 6))
    write_image(image, root / "in" / "heart.nii.gz")
    return root, save_bundle(tiny_bundle(), root / "model")


def test_batch_with_a_relative_output_writes_the_mrb(batch, inputs, tmp_path, monkeypatch):
    root, model = inputs
    monkeypatch.chdir(tmp_path)
    arguments = ["--model", str(model), "--input", str(root / "in"), "--output", "out", "--mrb", "--device", "cpu"]
    assert batch.main(arguments) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["batch-vtk.log", "heart.mrb", "heart.seg.nrrd"]


def test_batch_refuses_bad_places_before_segmenting(batch, inputs, tmp_path, capsys):
    root, model = inputs
    (tmp_path / "file").write_text("x")
    common = ["--model", str(model), "--input", str(root / "in"), "--device", "cpu"]
    assert batch.main([*common, "--output", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    table = tmp_path / "volumes.csv"
    table.write_text("kept")
    assert batch.main([*common, "--output", str(tmp_path / "out"), "--measurements-csv", str(table)]) == 2
    assert "already exists" in capsys.readouterr().err and table.read_text() == "kept"
    assert not list((tmp_path / "out").glob("*.seg.nrrd"))  # refused before any case was segmented


def test_batch_refuses_a_truncated_case_and_leaves_nothing(batch, inputs, tmp_path, capsys):
    root, model = inputs
    data = (root / "in" / "heart.nii.gz").read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    status = batch.main(["--model", str(model), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                         "--mrb", "--device", "cpu"])
    assert status == 1 and "truncated" in capsys.readouterr().out
    assert list((tmp_path / "out").iterdir()) == []


def test_a_hand_broken_corrections_manifest_is_called_corrupt(tmp_path):
    from IDEALSegmentLib.corrections import dataset_summary, export_correction
    from IDEALSegmentLib.segmentations import segmentation_from_labels
    from IDEALSegmentLib.volumes import volume_from_image

    image, label = make_phantom(3, size=(32, 32, 4))
    scene = slicer.vtkMRMLScene()
    volume = volume_from_image(image, scene, "case")
    export_correction(tmp_path, volume, segmentation_from_labels(label, volume))
    manifest = tmp_path / "manifest.json"
    document = json.loads(manifest.read_text())
    for field, value in (("reviewed_slices", 5), ("model", "text")):
        broken = {**document, "cases": [{**document["cases"][0], field: value}]}
        manifest.write_text(json.dumps(broken))
        with pytest.raises(IdealError, match="manifest is corrupt"):
            dataset_summary(tmp_path)


# -- issue 27: SIGTERM and SIGKILL while segmenting, refining and batching -----------------------------------
def idealtrain_command(*arguments) -> list[str]:
    return [sys.executable, "-m", "IDEALTrain", *map(str, arguments)]


@pytest.fixture(scope="module")
def kill_inputs(tmp_path_factory):
    """An 8-frame cine, a 3D scan with a draft and a click, a folder of two cases, and a tiny model."""
    import numpy as np
    import SimpleITK as sitk
    from helpers import oblique_image

    root = tmp_path_factory.mktemp("kill")
    frames = [oblique_image().with_array(oblique_image(seed=t).array).to_sitk() for t in range(8)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(root / "cine.nii.gz"))
    scan = write_image(oblique_image(), root / "scan.nii.gz")
    draft = write_image(oblique_image().with_array(np.zeros((7, 40, 48), np.uint8)), root / "draft.nii.gz")
    (root / "clicks.json").write_text(json.dumps({"clicks": [{"point": list(oblique_image().origin), "label": 3}]}))
    for n in range(2):
        write_image(make_phantom(n, size=(40, 36, 6))[0], root / "cases" / f"case{n}.nii.gz")
    return {"root": root, "cine": root / "cine.nii.gz", "scan": scan, "draft": draft, "clicks": root / "clicks.json",
            "cases": root / "cases", "model": save_bundle(tiny_bundle(), root / "model")}


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def test_sigterm_during_all_frames_leaves_no_frame_and_the_rerun_works(kill_inputs, tmp_path, capsys):
    out = tmp_path / "out"
    command = idealtrain_command("segment", "--model", kill_inputs["model"], "--input", kill_inputs["cine"], "--all-frames",
                                 "--output", out / "seg.nii.gz", "--uncertainty", out / "u.nii.gz", "--device", "cpu",
                                 "--progress-json")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment())
    for line in process.stdout:
        if json.loads(line).get("item", 0) >= 2:  # frames 0 and 1 are done
            process.send_signal(signal.SIGTERM)
            break
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert err.strip().splitlines()[-1] == "idealtrain: interrupted (SIGTERM); unfinished outputs were removed", err[-2000:]
    assert visible(out) == [] and hidden(out) == []
    capsys.readouterr()
    assert main(command[3:]) == 0  # not refused by leftovers
    assert len(visible(out)) == 16 and hidden(out) == []


def _kill_command(tool: str, inputs: dict, out: Path) -> list[str]:
    if tool == "segment":
        return idealtrain_command("segment", "--model", inputs["model"], "--input", inputs["cine"], "--all-frames",
                                  "--output", out / "seg.nii.gz", "--uncertainty", out / "u.nii.gz", "--device", "cpu")
    if tool == "refine":
        return idealtrain_command("refine", "--model", inputs["model"], "--input", inputs["scan"], "--draft", inputs["draft"],
                                  "--clicks", inputs["clicks"], "--output", out / "refined.seg.nrrd", "--device", "cpu")
    return [sys.executable, str(BATCH), "--model", str(inputs["model"]), "--input", str(inputs["cases"]),
            "--output", str(out), "--mrb", "--device", "cpu"]


def _whole_or_nothing(tool: str, out: Path) -> None:
    """Each output present reads whole, and a run's (a batch case's) outputs are all there or none is."""
    import zipfile

    from IDEALTrain.io.volume_files import read_image

    names = visible(out)
    if tool == "segment":
        assert names in ([], sorted([f"seg_frame{n:02d}.nii.gz" for n in range(8)] + [f"u_frame{n:02d}.nii.gz" for n in range(8)]))
    elif tool == "refine":
        assert names in ([], ["refined.seg.nrrd"])
    else:
        for case in ("case0", "case1"):
            assert {n for n in names if n.startswith(f"{case}.")} in (set(), {f"{case}.seg.nrrd", f"{case}.mrb"}), names
    for name in names:
        if name.endswith(".mrb"):
            assert zipfile.is_zipfile(out / name), name
        elif name == "batch-vtk.log":  # batch.py's VTK/MRML messages, text
            continue
        else:
            read_image(out / name)  # refuses a truncated file


def kill_moment(seconds: float, seed: str) -> float:
    """A seeded random moment between 30 % and 100 % of a reference run lasting ``seconds``."""
    return random.Random(seed).uniform(0.3 * seconds, seconds)


@pytest.mark.parametrize("tool", ["segment", "refine", "batch"])
def test_sigkill_at_a_random_point_leaves_whole_outputs_or_nothing(kill_inputs, tmp_path, tool):
    """Killed at a random moment of a whole run (timed first), the output folder holds nothing new or whole
    outputs; the next run reports and removes the leftovers and writes everything."""
    start = time.monotonic()
    whole = subprocess.run(_kill_command(tool, kill_inputs, tmp_path / "timed"), capture_output=True, text=True,
                           env=environment(), timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    at = kill_moment(time.monotonic() - start, tool)  # after the imports, up to the end of the run
    out = tmp_path / "out"
    process = subprocess.Popen(_kill_command(tool, kill_inputs, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=environment())
    try:
        process.wait(timeout=at)
    except subprocess.TimeoutExpired:
        process.kill()
    process.wait()
    _whole_or_nothing(tool, out)
    leftovers = hidden(out)
    again = subprocess.run(_kill_command(tool, kill_inputs, out) + ["--overwrite"], capture_output=True, text=True,
                           env=environment(), timeout=300)
    assert again.returncode == 0, (at, again.stderr[-2000:])
    assert ("leftover temporary file(s) of an interrupted run" in again.stderr) == bool(leftovers), (at, leftovers, again.stderr)
    assert hidden(out) == [], at
    assert visible(out) == visible(tmp_path / "timed")
    _whole_or_nothing(tool, out)


def test_batch_clicks_must_be_a_folder_with_the_cases_clicks(batch, inputs, tmp_path, capsys):
    root, model = inputs
    (tmp_path / "file.json").write_text("{}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "someone-else.clicks.json").write_text('{"clicks": []}')
    common = ["--model", str(model), "--input", str(root / "in"), "--output", str(tmp_path / "out"), "--device", "cpu"]
    for clicks, message in ((tmp_path / "missing", "no such folder"), (tmp_path / "file.json", "is a file"),
                            (tmp_path / "other", "holds none of the cases' clicks files (e.g. heart.clicks.json)")):
        capsys.readouterr()
        assert batch.main([*common, "--clicks", str(clicks)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("batch: error: --clicks") and message in err and "\n" not in err, err
    assert not list((tmp_path / "out").glob("*.seg.nrrd"))


# -- issue 27: the warm worker killed (SIGKILL) or cancelled (SIGTERM) in the middle of a job -----------------
def warm_worker(monkeypatch):
    """A warm worker started by the Logic's client (its own process group, as the panels start it), once ready."""
    from IDEALSegmentLib.worker import Worker

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, "1")
    worker = Worker()
    worker.start()
    assert worker_event(worker, 120).get("event") == "ready", list(worker.stderr)[-5:]
    return worker


def worker_event(worker, timeout: float, until=lambda event: True) -> dict:
    """The first event from ``worker`` for which ``until`` holds, or {} if none comes within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            event = worker.lines.get(timeout=left)
        except queue.Empty:
            break
        if until(event):
            return event
    return {}


def is_exit(event: dict) -> bool:
    return event.get("event") == "exit"


def worker_job(tool: str, inputs: dict, out: Path) -> list[str]:
    """The command line of ``_kill_command`` as a worker request (without ``python -m IDEALTrain``)."""
    return [str(a) for a in _kill_command(tool, inputs, out)[3:]]


def test_sigkill_of_a_worker_job_leaves_whole_outputs_or_nothing(kill_inputs, tmp_path, monkeypatch):
    """A warm worker's process group killed at a random moment of a job (labels and uncertainty of every frame,
    timed first on a warm worker): nothing new or whole outputs; a new worker running the job again reports and
    removes the leftovers and writes everything."""
    workers = []
    try:
        workers.append(timed := warm_worker(monkeypatch))
        start = time.monotonic()
        timed.send(worker_job("segment", kill_inputs, tmp_path / "timed"))
        done = worker_event(timed, 300, is_exit)
        assert done.get("returncode") == 0, (done, list(timed.stderr)[-5:])
        at = kill_moment(time.monotonic() - start, "worker segment")
        workers.append(worker := warm_worker(monkeypatch))
        out = tmp_path / "out"
        worker.send(worker_job("segment", kill_inputs, out))
        worker_event(worker, at, is_exit)  # the job may end before the kill
        worker.stop(terminate=False)  # SIGKILL to the worker's process group, as Cancel does after its grace time
        assert worker.process.wait(timeout=60) == -signal.SIGKILL
    finally:
        for started in workers:
            started.stop(terminate=False)
    _whole_or_nothing("segment", out)
    leftovers = hidden(out)
    request = json.dumps({"args": worker_job("segment", kill_inputs, out) + ["--overwrite"]}) + "\n"
    again = subprocess.run([sys.executable, "-m", "IDEALTrain.worker"], input=request, capture_output=True, text=True,
                           env=environment(), timeout=300)  # a new worker, given the job; it ends when its stdin does
    events = [json.loads(line) for line in again.stdout.splitlines() if line.startswith("{")]
    assert again.returncode == 0 and events[-1] == {"event": "exit", "returncode": 0, "error": None}, (at, again.stdout, again.stderr)
    assert ("leftover temporary file(s) of an interrupted run" in again.stderr) == bool(leftovers), (at, leftovers, again.stderr)
    assert hidden(out) == [], at
    assert visible(out) == visible(tmp_path / "timed")
    _whole_or_nothing("segment", out)


def test_cancelling_a_worker_job_removes_its_temporary_files_at_once(kill_inputs, tmp_path, monkeypatch):
    """Cancel (SIGTERM to the worker's process group) in the middle of a job unwinds the command: its staged
    frames and output locks are gone as soon as the worker has ended (143), before any other run sweeps them."""
    out = tmp_path / "out"
    worker = warm_worker(monkeypatch)
    try:
        worker.send(worker_job("segment", kill_inputs, out) + ["--progress-json"])
        progress = worker_event(worker, 300, lambda event: event.get("item", 0) >= 2 or is_exit(event))
        assert progress.get("event") == "progress", (progress, list(worker.stderr)[-5:])  # frames 0 and 1 are done
        assert hidden(out), "nothing was staged yet: the cancel would prove nothing"
        worker.stop()  # Cancel
        assert worker.process.wait(timeout=60) == 128 + signal.SIGTERM, list(worker.stderr)[-5:]
    finally:
        worker.stop(terminate=False)
    assert visible(out) == [] and hidden(out) == []


MID_COMMIT = """
import os, signal, sys
from pathlib import Path
from IDEALTrain.io import output_guard
out, overwrite = Path(sys.argv[1]), sys.argv[2] == "1"
publish = output_guard.publish
def publish_then_die(staged, target, overwrite):
    publish(staged, target, overwrite)
    os.kill(os.getpid(), signal.SIGKILL)  # the first output is in place, the others not yet
output_guard.publish = publish_then_die
names = ("labels.nii.gz", "later.nii.gz", "u.nii.gz")
with output_guard.OutputSet([out / name for name in names], overwrite) as run:
    for name in names:
        run.staged(out / name).write_text("new")
"""


@pytest.mark.parametrize("overwrite", [False, True], ids=["new outputs", "--overwrite"])
def test_a_sigkill_in_the_middle_of_a_commit_is_finished_by_the_next_run(tmp_path, capsys, overwrite):
    """Killed after moving one of its outputs into place (its commit takes about a millisecond), a run left a
    partial set, and the next run's sweep deleted the rest although every file was verified. Now the sweep
    finishes the commit: the set ends whole, except a file someone put there after the kill, which is kept."""
    from IDEALTrain.io.output_guard import report_leftovers

    if overwrite:
        for name in ("labels.nii.gz", "later.nii.gz", "u.nii.gz"):
            (tmp_path / name).write_text("old")  # an old set being replaced
    killed = subprocess.run([sys.executable, "-c", MID_COMMIT, str(tmp_path), str(int(overwrite))], capture_output=True,
                            text=True, env=environment(), timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "labels.nii.gz").read_text() == "new" and (tmp_path / "u.nii.gz").exists() == overwrite
    time.sleep(0.05)  # file times are coarse: what follows is later than the commit
    (tmp_path / "later.nii.gz").write_text("written after the kill")
    capsys.readouterr()
    report_leftovers(tmp_path)
    err = capsys.readouterr().err
    assert "finished moving 1 output(s) of a run interrupted while committing them" in err and "u.nii.gz" in err, err
    assert {name: (tmp_path / name).read_text() for name in visible(tmp_path)} == {
        "labels.nii.gz": "new", "later.nii.gz": "written after the kill", "u.nii.gz": "new"}
    assert hidden(tmp_path) == []
