"""Issue 32's benchmark (``benchmarks/pretrain_budget.py``): the run order, the lr choice on the select
half, the paired-by-seed decision rule and the summary of stored runs, without training anything."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from IDEALTrain.evaluation.metrics import CLASS_NAMES, METRICS

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("pretrain_budget", BENCHMARKS / "pretrain_budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decide_helps_only_with_the_margin_and_every_seed(bench):
    seeds = [0, 1, 2]
    random = {0: 0.50, 1: 0.60, 2: 0.70}
    helps = bench.decide(random, {0: 0.53, 1: 0.625, 2: 0.72}, seeds)  # +0.03, +0.025, +0.02: mean 0.025
    assert helps["verdict"] == "helps" and helps["seeds_better"] == 3
    assert helps["per_seed_differences"]["seed1"] == pytest.approx(0.025)
    assert helps["mean_difference"] == pytest.approx(0.025)
    small = bench.decide(random, {0: 0.51, 1: 0.61, 2: 0.71}, seeds)  # better with every seed, but +0.01
    assert small["verdict"] == "in between"
    two_of_three = bench.decide(random, {0: 0.60, 1: 0.65, 2: 0.69}, seeds)  # mean +0.0133, 2 of 3 seeds
    assert two_of_three["verdict"] == "in between" and two_of_three["seeds_better"] == 2
    big_but_two = bench.decide(random, {0: 0.65, 1: 0.70, 2: 0.69}, seeds)  # mean +0.063 but one seed worse
    assert big_but_two["verdict"] == "in between"


def test_decide_does_not_help(bench):
    seeds = [0, 1, 2]
    random = {0: 0.50, 1: 0.60, 2: 0.70}
    assert bench.decide(random, {0: 0.44, 1: 0.62, 2: 0.73}, seeds)["verdict"] == "does not help"  # mean < 0, 2 better
    one_seed = bench.decide(random, {0: 0.60, 1: 0.59, 2: 0.69}, seeds)  # mean +0.027 but one seed better
    assert one_seed["verdict"] == "does not help" and one_seed["seeds_better"] == 1
    assert bench.decide(random, {0: 0.40, 1: 0.50, 2: 0.60}, seeds)["verdict"] == "does not help"
    assert bench.decide(random, {0: 0.45, 1: 0.62, 2: 0.73}, seeds)["verdict"] == "does not help"  # a mean of exactly 0
    assert bench.decide(random, {0: 0.52, 1: 0.62, 2: 0.72}, seeds)["verdict"] == "helps"  # exactly the margin


def test_decide_waits_for_every_seed_and_scales_to_five(bench):
    random = {0: 0.50, 1: 0.60, 2: 0.70}
    partial = bench.decide(random, {0: 0.60, 1: 0.70}, [0, 1, 2])
    assert partial["verdict"] == "incomplete" and partial["seeds"] == 2
    assert bench.decide({0: 0.5}, {0: 0.6}, [0])["verdict"] == "incomplete"  # the rule needs 3 seeds
    five = {s: 0.5 for s in range(5)}
    four_of_five = {0: 0.55, 1: 0.55, 2: 0.55, 3: 0.55, 4: 0.49}
    assert bench.decide(five, four_of_five, list(range(5)))["verdict"] == "helps"
    two_of_five = {0: 0.60, 1: 0.60, 2: 0.49, 3: 0.49, 4: 0.49}
    assert bench.decide(five, two_of_five, list(range(5)))["verdict"] == "does not help"
    three_of_five = {0: 0.60, 1: 0.60, 2: 0.60, 3: 0.49, 4: 0.49}
    assert bench.decide(five, three_of_five, list(range(5)))["verdict"] == "in between"


def test_confirm_passes_at_a_mean_difference_of_zero_or_more(bench):
    random = {0: 0.70, 1: 0.72, 2: 0.74}
    assert bench.confirm(random, {0: 0.69, 1: 0.73, 2: 0.74}, [0, 1, 2])["verdict"] == "passes"
    assert bench.confirm(random, {0: 0.69, 1: 0.72, 2: 0.74}, [0, 1, 2])["verdict"] == "fails"
    assert bench.confirm(random, {0: 0.80}, [0, 1, 2])["verdict"] == "incomplete"


def test_choose_lr_on_the_seeds_every_lr_has(bench):
    select = {0.01: {0: 0.40, 1: 0.50}, 0.03: {0: 0.45, 1: 0.44, 2: 0.99}}
    assert bench.choose_lr(select) == (0.01, [0, 1])  # seed 2 (only lr 0.03) does not count: 0.45 vs 0.445
    assert bench.choose_lr({0.01: {0: 0.5}, 0.03: {0: 0.5}}) == (0.01, [0])  # a tie: the smaller lr
    assert bench.choose_lr({0.01: {0: 0.5}, 0.03: {1: 0.6}}) == (None, [])
    assert bench.choose_lr({}) == (None, [])


def test_plan_finishes_each_seeds_pairs_first(bench):
    args = bench.parse_arguments(["--work", "w"])
    tasks = bench.plan(args)
    names = [name for name, _ in tasks]
    assert names[:5] == ["3p-random-lr0.03-seed0", "encoder-seed0", "3p-pretrained-lr0.03-seed0",
                         "3p-random-lr0.01-seed0", "3p-pretrained-lr0.01-seed0"]
    assert len(names) == 15 and names.count("encoder-seed1") == 1
    needs = dict(tasks)
    assert needs["3p-pretrained-lr0.01-seed2"] == ["encoder-seed2"] and needs["3p-random-lr0.01-seed2"] == []
    mix = bench.plan(bench.parse_arguments(["--pretrained-mix", "0.5", "--lrs", "0.03"]))
    assert [n for n, _ in mix][:3] == ["3p-random-lr0.03-seed0", "encoder-seed0", "3p-pretrained-mix0.5-lr0.03-seed0"]
    decoder = bench.plan(bench.parse_arguments(["--decoder-pretraining", "2", "--lrs", "0.03", "--seeds", "4"]))
    assert decoder == [("3p-random-lr0.03-seed4", []), ("encoder-decoder2-seed4", []),
                       ("3p-pretrained-decoder2-lr0.03-seed4", ["encoder-decoder2-seed4"])]
    assert bench.seed_of("encoder-decoder2-seed4") == 4 and bench.seed_of("encoder-seed12") == 12


def test_the_benchmark_measures_the_trainers_pretrain_plan(bench, tmp_path):
    """The arm called "pretrained" is the trainer's *Pretrain first* plan: its pretraining and finetuning
    lengths and the finetuning lr of ``idealtrain finetune`` are among those the benchmark runs."""
    from IDEALSegmentLib.retraining import RetrainingRun, training_plan

    from IDEALTrain.cli import build_parser

    args = bench.parse_arguments([])
    run = RetrainingRun(tmp_path / "run", tmp_path / "corrections", ("case1",), (), None)
    for sub in ("images", "labels"):
        (run.train_dir / sub).mkdir(parents=True)
        (run.train_dir / sub / "case1.nii.gz").write_bytes(b"x")
    plan = training_plan(run, encoder="pretrain")
    (_, pretraining), (_, finetuning) = plan
    assert int(pretraining[pretraining.index("--iterations") + 1]) == args.pretrain_iterations == 500
    assert int(finetuning[finetuning.index("--iterations") + 1]) == args.iterations == 1000
    parsed = build_parser().parse_args(finetuning)
    assert parsed.lr in args.lrs


def _run(bench, arm: str, lr: float, seed: int, select: float, report: float, patients: int = 3) -> dict:
    """A stored run whose select-half volumes all score ``select`` and report-half volumes ``report``."""
    from ssl_summary import split_volumes

    volumes = [f"patient{p:03d}_frame01" for p in (2, 19, 28, 30)]
    split = split_volumes(volumes)

    def scores(dice: float) -> dict:
        return {"unit": "voxel", "classes": {name: {m: dice if m == "dice" else 3.0 for m in METRICS} for name in CLASS_NAMES.values()}}

    per_volume = {v: scores(select if v in split["select"] else report) for v in volumes}
    return {"task": bench.run_name(patients, arm, lr, seed), "arm": arm, "lr": lr, "seed": seed,
            "budget": {"patients": patients}, "per_volume": per_volume, "final_supervised_loss": 0.3,
            "cpu_seconds": 600.0, "encoder_cpu_seconds": 200.0 if arm != "random" else 0.0}


def test_summary_chooses_each_arms_lr_on_select_and_judges_on_report(bench, tmp_path):
    args = bench.parse_arguments(["--results", str(tmp_path)])
    runs = []
    for seed in (0, 1, 2):
        # random: lr 0.03 wins on select; pretrained: lr 0.01 wins on select, though lr 0.03 reports higher
        runs += [_run(bench, "random", 0.03, seed, 0.60, 0.60), _run(bench, "random", 0.01, seed, 0.50, 0.70),
                 _run(bench, "pretrained", 0.01, seed, 0.65, 0.63 + 0.01 * seed), _run(bench, "pretrained", 0.03, seed, 0.60, 0.90)]
    for run in runs:
        bench.write_json(tmp_path / f"{run['task']}.json", run)
    summary = bench.summarize(bench.load_results(tmp_path), args)
    assert summary["chosen_lr"]["random"]["lr"] == 0.03 and summary["chosen_lr"]["pretrained"]["lr"] == 0.01
    decision = summary["decision"]
    assert decision["per_seed_differences"] == pytest.approx({"seed0": 0.03, "seed1": 0.04, "seed2": 0.05})
    assert decision["verdict"] == "helps"
    cell = summary["table"]["pretrained"]["0.01"]["seed0"]
    assert cell["charged_cpu_seconds"] == 800.0 and cell["report"]["classes"]["LV"]["hd95"] == 3.0
    json.dumps(summary)  # what --summary writes
    table = bench.markdown(summary)
    assert "| pretrained | 0.01 | 2 | 0.650 | 0.650 | 0.650 | 0.650 | 0.650 | 3.0 | 0.300 | 10.0 (13.3) |" in table
    assert "seed2 +0.050" in table and "verdict: **helps**" in table

    (tmp_path / "3p-pretrained-lr0.03-seed2.json").unlink()  # a lr choice not final yet: no verdict
    assert bench.summarize(bench.load_results(tmp_path), args)["decision"]["verdict"] == "incomplete"


def test_two_more_seeds_at_the_chosen_lrs_complete_an_in_between(bench, tmp_path):
    runs = []
    for seed in (0, 1, 2):  # pretrained better with 2 of 3 seeds: in between
        runs += [_run(bench, "random", 0.03, seed, 0.60, 0.60), _run(bench, "random", 0.01, seed, 0.50, 0.50),
                 _run(bench, "pretrained", 0.03, seed, 0.60, 0.59 if seed == 0 else 0.62), _run(bench, "pretrained", 0.01, seed, 0.5, 0.5)]
    for run in runs:
        bench.write_json(tmp_path / f"{run['task']}.json", run)
    stage1 = bench.summarize(bench.load_results(tmp_path), bench.parse_arguments(["--results", str(tmp_path)]))
    assert stage1["decision"]["verdict"] == "in between" and "2 more seeds" in stage1["decision"]["next"]
    more = bench.parse_arguments(["--results", str(tmp_path), "--seeds", "0", "1", "2", "3", "4", "--lrs", "0.03"])
    assert bench.summarize(bench.load_results(tmp_path), more)["decision"]["verdict"] == "incomplete"
    for seed in (3, 4):
        for run in (_run(bench, "random", 0.03, seed, 0.6, 0.60), _run(bench, "pretrained", 0.03, seed, 0.6, 0.65)):
            bench.write_json(tmp_path / f"{run['task']}.json", run)
    summary = bench.summarize(bench.load_results(tmp_path), more)
    assert summary["chosen_lr"]["random"] == {"lr": 0.03, "chosen_on_seeds": [0, 1, 2], "complete": True}
    assert summary["decision"]["seeds_better"] == 4 and summary["decision"]["verdict"] == "helps"  # mean +0.026, 4 of 5


def test_resuming_with_another_budget_is_refused(bench, tmp_path):
    args = bench.parse_arguments(["--results", str(tmp_path)])
    bench.write_json(tmp_path / "3p-random-lr0.03-seed0.json", {"budget": bench.budget(args) | {"iterations": 600}})
    bench.write_json(tmp_path / "encoder-seed0.json", {"budget": bench.budget(args, bench.ENCODER_KEYS)})
    assert [s.split(":")[0] for s in bench.stale(bench.load_results(tmp_path), args)] == ["3p-random-lr0.03-seed0"]
    seven = bench.parse_arguments(["--results", str(tmp_path), "--patients", "7"])
    assert bench.stale(bench.load_results(tmp_path), seven) == []  # the 3-patient encoder serves 7 patients too
    assert bench.main(["--results", str(tmp_path), "--summarize-only"]) == 2
