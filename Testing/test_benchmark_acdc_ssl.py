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


VAL_LIST = [f"patient{p:03d}_frame0{f}" for p in (28, 85, 82, 87, 19, 30, 78, 45, 2, 39) for f in (1, 2)]  # SSL4MIS order
SELECT = {"patient002", "patient028", "patient039", "patient078", "patient085"}


def _scored(select: float, report: float) -> dict:
    """A run whose volumes all score ``select`` (select half) or ``report`` (report half), every class alike."""
    def volume(dice: float) -> dict:
        return {"unit": "voxel", "classes": {c: {"dice": dice, "hd95": 1.0} for c in ("RV", "LV_Myocardium", "LV")}}

    per_volume = {v: volume(select if v.split("_frame")[0] in SELECT else report) for v in VAL_LIST}
    return {"mean": {"dice": (select + report) / 2}, "per_volume": per_volume}


def test_val_list_splits_by_patient_into_select_and_report_halves() -> None:
    summary = _benchmark("ssl_summary")
    split = summary.split_volumes(reversed(VAL_LIST))
    assert {summary.patient_of(v) for v in split["select"]} == SELECT
    assert len(split["select"]) == len(split["report"]) == 10 and split["all"] == sorted(VAL_LIST)
    assert not {summary.patient_of(v) for v in split["select"]} & {summary.patient_of(v) for v in split["report"]}
    assert summary.split_volumes(VAL_LIST) == split  # the order of val.list does not matter


def test_summary_gives_each_half_and_the_claim_is_judged_on_the_report_half() -> None:
    benchmark = _benchmark()
    report_dice = {  # (patients, method) -> report-half Dice of seeds 0, 1, 2
        (3, "supervised-only"): (0.60, 0.62, 0.61), (3, "finetune-no-pretraining"): (0.64, 0.63, 0.66),
        (3, "ideal"): (0.66, 0.62, 0.70),  # behind with seed 1 only
        (7, "supervised-only"): (0.80, 0.81, 0.82), (7, "finetune-no-pretraining"): (0.83, 0.84, 0.85),
        (7, "ideal"): (0.86, 0.85, 0.87),
    }
    runs = {benchmark.run_key(p, m, s): _scored(0.9 if m == "supervised-only" else 0.5, d)  # select half ranks the other way
            for (p, m), dice in report_dice.items() for s, d in enumerate(dice)}
    summary, old_claim = benchmark.summarize(runs, [3, 7], list(benchmark.METHODS), [0, 1, 2])
    entry = summary["3_patients/ideal"]
    assert entry["seed_ids"] == [0, 1, 2] and entry["report"]["per_seed"] == pytest.approx([0.66, 0.62, 0.70])
    assert entry["select"]["mean_dice"] == pytest.approx(0.5) and entry["report"]["mean_dice"] == pytest.approx(0.66)
    assert entry["all"]["mean_dice"] == pytest.approx(entry["mean_dice"]) == pytest.approx((0.5 + 0.66) / 2)
    assert old_claim["3"]["on_the_mean"] is False  # the earlier claim, on all of val.list, is kept as it was

    result = _benchmark("ssl_summary").summarize_report(runs, [3, 7], list(benchmark.METHODS), [0, 1, 2])
    assert result["val_split"]["select"] == sorted(SELECT)
    claim = result["claim"]
    three = claim["label_counts"]["3"]
    assert three["ordering_on_the_mean"] is True and three["ideal_beats_no_pretraining_seeds"] == 2 and three["holds"] is True
    assert three["per_seed_differences"]["ideal - finetune-no-pretraining"] == pytest.approx(
        {"seed0": 0.02, "seed1": -0.01, "seed2": 0.04})
    assert three["per_seed_differences"]["finetune-no-pretraining - supervised-only"]["seed2"] == pytest.approx(0.05)
    assert claim["ideal_7p_report_mean"] == pytest.approx(0.86) and claim["ideal_7p_report_at_least_0.85"] is True
    assert claim["holds"] is True

    del runs[benchmark.run_key(7, "finetune-no-pretraining", 2)]  # a run not finished yet: no verdict at 7 patients
    claim = _benchmark("ssl_summary").summarize_report(runs, [3, 7], list(benchmark.METHODS), [0, 1, 2])["claim"]
    assert claim["label_counts"]["7"]["holds"] is None and claim["holds"] is None
    assert claim["label_counts"]["7"]["per_seed_differences"]["ideal - finetune-no-pretraining"].keys() == {"seed0", "seed1"}


def test_stored_results_resummarise_with_their_halves() -> None:
    summary = _benchmark("ssl_summary")
    stored = json.loads((BENCHMARKS / "results" / "acdc_ssl_gpu_h100.json").read_text())
    result = summary.resummarize(stored)
    for key, entry in stored["summary"].items():
        assert result["summary"][key]["all"]["mean_dice"] == pytest.approx(entry["mean_dice"])
        assert result["summary"][key]["report"]["mean_dice"] is not None
    assert result["claim"]["seeds"] == [0, 1] and result["claim"]["holds"] is False


def test_resume_skips_finished_runs_and_refuses_another_budget(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    benchmark = _benchmark()
    data, out = _tiny_ssl4mis(tmp_path / "acdc"), tmp_path / "report.json"
    argv = ["--data", str(data), "--out", str(out), "--work", str(tmp_path / "work"), "--labeled-patients", "1",
            "--methods", "supervised-only", "--seeds", "0", "--iterations", "3", "--device", "cpu", "--resume"]
    budget = {k: getattr(benchmark.parse_arguments(argv), k) for k in benchmark.BUDGET_KEYS}
    run = {"patients": 1, "method": "supervised-only", "seed": 0, **_scored(0.7, 0.8)}
    out.write_text(json.dumps({"budget": budget, "machine": {}, "runs": {"1_patients/supervised-only/seed0": run}}))
    assert benchmark.main(argv) == 0  # nothing left to train
    report = json.loads(out.read_text())
    assert report["runs"]["1_patients/supervised-only/seed0"] == run and len(report["resumed"]) == 1
    assert report["summary"]["1_patients/supervised-only"]["report"]["mean_dice"] == pytest.approx(0.8)
    assert benchmark.main(argv[:-1] + ["--iterations", "4", "--resume"]) == 2
    assert "iterations: 3 there, 4 now" in capsys.readouterr().err
    assert json.loads(out.read_text()) == report  # refused before touching the file
