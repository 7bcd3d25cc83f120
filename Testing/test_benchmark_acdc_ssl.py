"""The ACDC benchmark drivers: the SSL protocol (seeds, runs in parallel processes, how the claim is
judged) and the linear probe of pretrained encoders."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from IDEALTrain.io.datasets import load_cases
from IDEALTrain.model.bundle import load_bundle, save_bundle
from IDEALTrain.model.networks import NetworkConfig
from IDEALTrain.model.preprocessing import Preprocessing
from IDEALTrain.training.pretraining import PretrainConfig, pretrain

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark(name: str = "acdc_ssl"):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _slice(rng: np.random.Generator, shape=(40, 40)) -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros(shape, np.uint8)
    label[10:30, 8:18], label[12:28, 20:26], label[14:26, 26:32] = 1, 2, 3
    return (0.2 * rng.random(shape) + 0.25 * label).astype(np.float32), label


def _tiny_ssl4mis(root: Path) -> Path:
    """Two patients of three slices each, and one validation volume, in the SSL4MIS layout."""
    rng = np.random.default_rng(0)
    (root / "data" / "slices").mkdir(parents=True)
    names = [f"patient{p:03d}_frame01_slice_{s}" for p in (1, 2) for s in range(3)]
    for name in names:
        image, label = _slice(rng)
        with h5py.File(root / "data" / "slices" / f"{name}.h5", "w") as h5:
            h5["image"], h5["label"] = image, label
    volume = [_slice(rng) for _ in range(3)]
    with h5py.File(root / "data" / "patient009_frame01.h5", "w") as h5:
        h5["image"], h5["label"] = np.stack([v[0] for v in volume]), np.stack([v[1] for v in volume])
    (root / "train_slices.list").write_text("\n".join(names) + "\n")
    (root / "val.list").write_text("patient009_frame01\n")
    return root


def _run(mean: float) -> dict:
    return {"mean": {"dice": mean}}


def test_claim_needs_the_mean_over_seeds_and_says_when_a_seed_disagrees() -> None:
    benchmark = _benchmark()
    runs = {
        "3_patients/supervised-only/seed0": _run(0.60), "3_patients/ideal/seed0": _run(0.66),
        "3_patients/supervised-only/seed1": _run(0.62), "3_patients/ideal/seed1": _run(0.61),
        "7_patients/supervised-only/seed0": _run(0.74), "7_patients/ideal/seed0": _run(0.70),
        "7_patients/supervised-only/seed1": _run(0.73),  # IDEAL's second seed not finished yet
    }
    summary, claim = benchmark.summarize(runs, [3, 7], ["supervised-only", "ideal"], [0, 1])
    assert summary["3_patients/ideal"]["per_seed"] == [0.66, 0.61]
    assert summary["3_patients/ideal"]["mean_dice"] == pytest.approx(0.635)
    assert claim["3"]["on_the_mean"] is True and claim["3"]["with_every_seed"] is False
    assert claim["3"]["margin"] == pytest.approx(0.025)
    assert "7" not in claim  # judged only once every seed of both methods is in
    assert summary["7_patients/ideal"]["seeds"] == 1


def test_parallel_runs_share_one_encoder_and_report_every_seed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, work, out = _tiny_ssl4mis(tmp_path / "acdc"), tmp_path / "work", tmp_path / "report.json"
    status = _benchmark().main([
        "--data", str(data), "--out", str(out), "--work", str(work), "--labeled-patients", "1",
        "--methods", "supervised-only", "ideal", "--seeds", "0", "1", "--parallel", "2", "--device", "cpu",
        "--iterations", "2", "--pretrain-iterations", "2", "--size", "32",
        "--batch-size", "2", "--unlabeled-batch-size", "2", "--pretrain-batch-size", "2",
    ])
    assert status == 0, capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {f"1_patients/{m}/seed{s}" for m in ("supervised-only", "ideal") for s in (0, 1)}
    for key, run in report["runs"].items():
        assert run["labeled_slices"] == 3 and run["unlabeled_slices"] == 3
        assert list(run["per_volume"]) == ["patient009_frame01"]
        assert f"seed{run['seed']}" in key
    assert report["summary"]["1_patients/ideal"]["seeds"] == 2
    assert set(report["claim_ideal_beats_supervised"]["1"]) == {"on_the_mean", "with_every_seed", "margin"}
    encoder = load_bundle(work / "pretrained")
    for seed in (0, 1):
        ideal = load_bundle(work / f"1_patients-ideal-seed{seed}")
        supervised = load_bundle(work / f"1_patients-supervised-only-seed{seed}")
        assert ideal.training["pretrained"]["training"] == encoder.training
        assert ideal.training["recipe"]["seed"] == seed and supervised.training["pretrained"] is None


def test_failed_run_is_reported_and_the_exit_status_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, work = _tiny_ssl4mis(tmp_path / "acdc"), tmp_path / "work"
    status = _benchmark().main([
        "--data", str(data), "--out", str(tmp_path / "report.json"), "--work", str(work), "--labeled-patients", "5",
        "--methods", "supervised-only", "--seeds", "0", "1", "--parallel", "2", "--device", "cpu", "--iterations", "1", "--size", "32",
    ])
    assert status == 1
    printed = capsys.readouterr().out
    for seed in (0, 1):
        assert f"5_patients/supervised-only/seed{seed} failed" in printed
        log = (work / "logs" / f"5_patients-supervised-only-seed{seed}.log").read_text()
        assert "--labeled-patients 5 asks for more than the 2 patients" in log


def test_encoder_probe_scores_random_and_pretrained_encoders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, out = _tiny_ssl4mis(tmp_path / "acdc"), tmp_path / "probe.json"
    config = PretrainConfig(iterations=1, batch_size=2, frozen_levels=1, network=NetworkConfig(),
                            preprocessing=Preprocessing(inplane="size", size=(32, 32)))
    encoder = save_bundle(pretrain(load_cases(f"ssl4mis:{data}:train_slices.list"), config, device="cpu"), tmp_path / "encoder")
    status = _benchmark("encoder_probe").main(["--data", str(data), "--encoders", str(encoder), "--labeled-patients", "1",
                                               "--size", "32", "--steps", "60", "--out", str(out)])
    assert status == 0, capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["budget"]["train_slices"] == 3 and report["budget"]["val_slices"] == 3
    assert list(report["encoders"]) == ["random", str(encoder)]
    assert report["encoders"][str(encoder)]["recipe"]["frozen_levels"] == 1
    for probes in (e["probes"] for e in report["encoders"].values()):
        assert set(probes) == {"level0", "level1", "level2", "level3", "level4", "hypercolumn"}
        assert all(0.0 <= d <= 1.0 for p in probes.values() for d in p["dice"].values())
        assert probes["level0"]["mean_dice"] > 0.5  # intensity codes the label here: the finest features must find it
