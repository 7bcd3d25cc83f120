"""Fault injection on runs: training killed (SIGTERM, SIGKILL) at random points and resumed to identical
weights, concurrent runs on one checkpoint folder, and batch.py's hostile cases (relative --mrb, an
--output that is a file, an existing CSV, a truncated input, a hand-broken corrections manifest)."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
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
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["heart.mrb", "heart.seg.nrrd"]


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
