"""Does the trainer's *Pretrain first* plan pay at the clinician's budget? (issue 32)

Stage 1: ACDC (SSL4MIS protocol), 3 labelled patients, seeds 0-2, two arms -- finetuning from a
random encoder (``random``) and from an encoder pretrained for 500 iterations with the run's seed
(``pretrained``; its CPU time is charged to the arm) -- at finetuning lr 0.01 and 0.03, 1,000
iterations of 8 labelled + 8 unlabelled slices at 128 px (the two-stream cross pseudo-label
finetuning of ``acdc_ssl.py``, whose ``train_and_score`` trains and scores every run here).

Each arm's lr is chosen on the *select* half of ``val.list`` (``ssl_summary.split_volumes``); the
arms are compared on the *report* half, paired by seed (``decide``):

- **helps**: pretrained >= random + 0.02 on the mean, and better with every seed (3 of 3);
- **does not help**: mean difference <= 0, or better with at most one seed of 3;
- **in between**: otherwise; the rule asks for two more seeds (``--seeds 0 1 2 3 4``) on the deciding arms.

With 7 labelled patients (``--patients 7``, the confirmation a "helps" asks for) the treated arm
passes if the mean difference is >= 0 (``confirm``). The two fixes the issue names are judged by
the same rule at the lr given by ``--lrs``: ``--pretrained-mix W`` turns the pretrained arm into
``pretrained-mixW`` (start from W x the pretrained + (1 - W) x the run's random encoder), and
``--decoder-pretraining N`` into ``pretrained-decoderN`` (Chaitanya-style: the dense loss with
same-image negatives on the U-Net decoder after N blocks, 2 = quarter resolution, whose weights
finetuning loads with the encoder; encoders ``encoder-decoderN-seedS``).

Every run (and every seed's encoder) is a child process with one torch thread whose result is one
JSON file under ``WORK/results``, written atomically; a run whose file exists is skipped, so the
same command resumes an interrupted benchmark (a stored run with another budget is refused; an
encoder whose bundle is missing, e.g. results copied from ``benchmarks/results/pretrain_budget``
into a fresh WORK/results, is pretrained again).
``--jobs 2`` trains two at once. ``--summary`` writes the table and the decision as JSON.

    nice -n 10 python benchmarks/pretrain_budget.py --work runs/pretrain_budget \\
        --summary benchmarks/results/pretrain_budget.json          # stage 1
    python benchmarks/pretrain_budget.py --summarize-only --results benchmarks/results/pretrain_budget \\
        --summary benchmarks/results/pretrain_budget.json          # the table from the committed runs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ssl_summary import split_volumes  # noqa: E402

RANDOM, PRETRAINED = "random", "pretrained"
MARGIN = 0.02  # "helps": the pretrained arm's mean report-half Dice at least this far above the random arm's
EXTRA_SEEDS = 2  # "in between": this many more seeds on the deciding arms
BUDGET_KEYS = ("patients", "iterations", "pretrain_iterations", "size", "batch_size", "unlabeled_batch_size", "precision")
ENCODER_KEYS = ("pretrain_iterations", "size", "precision")  # what an encoder depends on (shared by 3 and 7 patients)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.environ.get("IDEAL_DATA", "../shared/data"), "acdc"))
    parser.add_argument("--work", default="runs/pretrain_budget", help="bundles, encoders, logs; results in WORK/results")
    parser.add_argument("--results", help="the per-run result folder (default WORK/results)")
    parser.add_argument("--summary", help="write the table and the decision to this JSON file")
    parser.add_argument("--summarize-only", action="store_true", help="train nothing: summarise the result folder")
    parser.add_argument("--markdown", action="store_true", help="print the table (per arm, lr and seed) as Markdown")
    parser.add_argument("--patients", type=int, default=3, help="labelled patients (3: stage 1; 7: the confirmation)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.03, 0.01], help="finetuning learning rates, in run order")
    parser.add_argument("--arms", nargs="+", choices=(RANDOM, PRETRAINED), default=[RANDOM, PRETRAINED])
    parser.add_argument("--pretrained-mix", type=float, default=1.0,
                        help="< 1: the pretrained arm starts from this share of the encoder (the fix; arm pretrained-mixW)")
    parser.add_argument("--decoder-pretraining", type=int, default=0, metavar="N",
                        help="> 0: the pretrained arm pretrains the U-Net decoder's first N blocks too (arm pretrained-decoderN)")
    parser.add_argument("--iterations", type=int, default=1000, help="finetuning iterations")
    parser.add_argument("--pretrain-iterations", type=int, default=500, help="the trainer plan's pretraining length")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--unlabeled-batch-size", type=int, default=8)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once (one torch thread each)")
    parser.add_argument("--task", help=argparse.SUPPRESS)  # a child process: this one run or encoder
    args = parser.parse_args(argv)
    if args.results is None:
        args.results = str(Path(args.work) / "results")
    return args


def arm_name(arm: str, mix: float = 1.0, decoder_blocks: int = 0) -> str:
    if arm != PRETRAINED:
        return arm
    return arm + (f"-decoder{decoder_blocks}" if decoder_blocks else "") + (f"-mix{mix:g}" if mix < 1 else "")


def run_name(patients: int, arm: str, lr: float, seed: int) -> str:
    return f"{patients}p-{arm}-lr{lr:g}-seed{seed}"


def encoder_name(seed: int, decoder_blocks: int = 0) -> str:
    return f"encoder-decoder{decoder_blocks}-seed{seed}" if decoder_blocks else f"encoder-seed{seed}"


def seed_of(task: str) -> int:
    return int(task.rsplit("-seed", 1)[1])


def budget(args: argparse.Namespace, keys: tuple[str, ...] = BUDGET_KEYS) -> dict:
    return {k: getattr(args, k) for k in keys}


def plan(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """[(task, the tasks it needs)] in run order: per seed, per lr, the random then the pretrained arm,
    the seed's encoder just before its first pretrained run, so each seed's pairs finish together."""
    tasks: list[tuple[str, list[str]]] = []
    for seed in args.seeds:
        for lr in args.lrs:
            for arm in args.arms:
                encoder = encoder_name(seed, args.decoder_pretraining)
                if arm == PRETRAINED and (encoder, []) not in tasks:
                    tasks.append((encoder, []))
                name = run_name(args.patients, arm_name(arm, args.pretrained_mix, args.decoder_pretraining), lr, seed)
                tasks.append((name, [encoder] if arm == PRETRAINED else []))
    return tasks


def write_json(path: Path, value: dict) -> None:
    from IDEALTrain.io.atomic import atomic_path

    with atomic_path(path) as temp:
        temp.write_text(json.dumps(value, indent=2))


class LossRecorder:
    """Keeps the last ``window`` iterations' metrics of a training loop (its progress reports)."""

    def __init__(self, window: int = 50) -> None:
        self.window, self.lines = window, []

    def __enter__(self) -> LossRecorder:
        from IDEALTrain.training import progress

        self.original = progress.Progress.update
        recorder = self

        def update(reporter, iteration: int, **metrics: float) -> None:
            recorder.lines = (recorder.lines + [metrics])[-recorder.window:]
            recorder.original(reporter, iteration, **metrics)

        progress.Progress.update = update
        return self

    def __exit__(self, *exc) -> None:
        from IDEALTrain.training import progress

        progress.Progress.update = self.original

    def mean(self, key: str) -> float | None:
        values = [line[key] for line in self.lines if key in line]
        return statistics.fmean(values) if values else None


def train_encoder(args: argparse.Namespace, seed: int) -> dict:
    """Pretrain one seed's encoder (the library defaults, as ``idealtrain pretrain`` and the trainer plan; with
    ``--decoder-pretraining N`` the dense loss moves to the decoder's N-th block, with same-image negatives)."""
    from acdc_ssl import preprocessing_plan

    from IDEALTrain.io.datasets import load_cases
    from IDEALTrain.model.bundle import save_bundle
    from IDEALTrain.model.networks import NetworkConfig
    from IDEALTrain.training.pretraining import PretrainConfig, pretrain

    cpu, wall = time.process_time(), time.perf_counter()
    everything = load_cases(f"ssl4mis:{args.data}:train_slices.list")
    config = PretrainConfig(iterations=args.pretrain_iterations, seed=seed, precision=args.precision,
                            decoder_blocks=args.decoder_pretraining, same_image_negatives=args.decoder_pretraining > 0,
                            network=NetworkConfig(), preprocessing=preprocessing_plan(args))
    with LossRecorder() as losses:
        bundle = pretrain(everything, config, device="cpu")
    path = Path(args.work) / "encoders" / encoder_name(seed, args.decoder_pretraining).removeprefix("encoder-")
    save_bundle(bundle, path, overwrite=True)
    return {"task": encoder_name(seed, args.decoder_pretraining), "seed": seed, "bundle": str(path), "slices": len(everything),
            "iterations": args.pretrain_iterations, "cpu_seconds": time.process_time() - cpu,
            "wall_seconds": time.perf_counter() - wall, "final_loss": losses.mean("loss"),
            "recipe": bundle.training["recipe"]}


def train_run(args: argparse.Namespace, arm: str, lr: float, seed: int) -> dict:
    """One finetuning run, trained and scored by ``acdc_ssl.train_and_score`` (bundle under WORK/runs)."""
    from acdc_ssl import parse_arguments as ssl_arguments
    from acdc_ssl import train_and_score

    from IDEALTrain.io.datasets import load_cases
    from IDEALTrain.model.bundle import load_bundle

    name = run_name(args.patients, arm_name(arm, args.pretrained_mix, args.decoder_pretraining), lr, seed)
    ssl = ssl_arguments(["--data", args.data, "--work", str(Path(args.work) / "runs" / name), "--iterations", str(args.iterations),
                         "--size", str(args.size), "--batch-size", str(args.batch_size), "--unlabeled-batch-size",
                         str(args.unlabeled_batch_size), "--lr", str(lr), "--pretrained-mix", str(args.pretrained_mix),
                         "--precision", args.precision, "--device", "cpu"])
    pretrained, encoder = None, None
    if arm == PRETRAINED:
        encoder = json.loads((Path(args.results) / f"{encoder_name(seed, args.decoder_pretraining)}.json").read_text())
        pretrained = load_bundle(encoder["bundle"])
    val_cases = load_cases(f"ssl4mis:{args.data}:val.list", require_labels=True)
    cpu = time.process_time()
    with LossRecorder() as losses:
        run = train_and_score(ssl, args.patients, "ideal" if arm == PRETRAINED else "finetune-no-pretraining", seed, pretrained, val_cases)
    cpu = time.process_time() - cpu
    return {"task": name, "arm": arm_name(arm, args.pretrained_mix, args.decoder_pretraining), "lr": lr, "seed": seed, "budget": budget(args),
            "pretrained_mix": args.pretrained_mix if arm == PRETRAINED else None,
            "cpu_seconds": cpu, "encoder_cpu_seconds": encoder["cpu_seconds"] if encoder else 0.0,
            "final_supervised_loss": losses.mean("loss_supervised"), "final_loss": losses.mean("loss"), **run}


def run_task(args: argparse.Namespace) -> int:
    """The child: one run or encoder, its result written atomically to WORK/results/TASK.json."""
    import torch

    torch.set_num_threads(1)
    task = args.task
    if task.startswith("encoder-"):
        result = train_encoder(args, seed_of(task))
    else:
        for seed in args.seeds:
            for lr in args.lrs:
                for arm in args.arms:
                    if run_name(args.patients, arm_name(arm, args.pretrained_mix, args.decoder_pretraining), lr, seed) == task:
                        result = train_run(args, arm, lr, seed)
                        break
    result["budget"] = budget(args, ENCODER_KEYS if task.startswith("encoder-") else BUDGET_KEYS)
    write_json(Path(args.results) / f"{task}.json", result)
    return 0


def child_command(args: argparse.Namespace, task: str) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--task", task, "--data", args.data, "--work", args.work,
               "--results", args.results, "--patients", str(args.patients), "--seeds", *map(str, args.seeds),
               "--lrs", *map(str, args.lrs), "--arms", *args.arms, "--pretrained-mix", str(args.pretrained_mix),
               "--decoder-pretraining", str(args.decoder_pretraining), "--iterations", str(args.iterations), "--pretrain-iterations", str(args.pretrain_iterations),
               "--size", str(args.size), "--batch-size", str(args.batch_size),
               "--unlabeled-batch-size", str(args.unlabeled_batch_size), "--precision", args.precision]
    return command


def load_results(folder: str | Path) -> dict[str, dict]:
    """Every finished run and encoder in ``folder``, by task name."""
    folder = Path(folder)
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def stale(results: dict[str, dict], args: argparse.Namespace) -> list[str]:
    """Stored runs of this plan made with another budget: resuming would mix budgets."""
    wanted = json.loads(json.dumps(budget(args)))
    names = {task for task, _ in plan(args)}
    return [f"{name}: {stored}" for name in sorted(names & set(results))
            if not (stored := results[name].get("budget")) or any(stored[k] != wanted.get(k) for k in stored)]


def schedule(args: argparse.Namespace) -> list[str]:
    """Train every task of the plan not yet in the result folder, up to ``--jobs`` at once; returns the failed ones."""
    logs = Path(args.work) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    environment = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = {task for task, result in load_results(args.results).items()  # an encoder whose bundle is gone is pretrained again
            if not task.startswith("encoder-") or Path(result.get("bundle", "")).is_dir()}
    waiting = [(task, needs) for task, needs in plan(args) if task not in done]
    running: dict[str, subprocess.Popen] = {}
    failed: list[str] = []
    print(f"{len(done & {t for t, _ in plan(args)})} tasks finished before, {len(waiting)} to go", flush=True)
    while waiting or running:
        for task, needs in list(waiting):
            if len(running) >= args.jobs:
                break
            if any(n in failed for n in needs):
                waiting.remove((task, needs))
                failed.append(task)
            elif all(n in done for n in needs):
                waiting.remove((task, needs))
                with open(logs / f"{task}.log", "w") as log:
                    running[task] = subprocess.Popen(child_command(args, task), stdout=log, stderr=subprocess.STDOUT, env=environment)
                print(f"{time.strftime('%H:%M:%S')} started {task}", flush=True)
        time.sleep(2.0)
        for task, process in list(running.items()):
            if process.poll() is None:
                continue
            del running[task]
            if process.returncode == 0 and (Path(args.results) / f"{task}.json").is_file():
                done.add(task)
                print(f"{time.strftime('%H:%M:%S')} finished {task}", flush=True)
                if args.summary:
                    write_json(Path(args.summary), summarize(load_results(args.results), args))
            else:
                failed.append(task)
                print(f"{task} failed (exit {process.returncode}); see {logs / (task + '.log')}", flush=True)
        if not running and waiting and all(any(n not in done for n in needs) for _, needs in waiting):
            failed += [task for task, _ in waiting]  # nothing can start any more
            waiting.clear()
    return failed


# -- the table and the rule (pure functions of the stored runs) --

def half_scores(run: dict, volumes: list[str]) -> dict | None:
    """Mean and per-class Dice and HD95 of a run over ``volumes`` (``metrics.mean_scores``)."""
    from IDEALTrain.evaluation.metrics import mean_scores

    scores = [run["per_volume"][v] for v in volumes if v in run["per_volume"]]
    if not scores:
        return None
    summary = mean_scores(scores)
    return {"dice": summary["mean"]["dice"], "hd95": summary["mean"]["hd95"], "volumes": summary["volumes"],
            "classes": {name: {"dice": c["dice"], "hd95": c["hd95"]} for name, c in summary["classes"].items()}}


def choose_lr(select_dice: dict[float, dict[int, float]]) -> tuple[float | None, list[int]]:
    """The lr with the best mean select-half Dice over the seeds every lr has been run with (ties: the
    smaller lr), and those seeds; (None, []) until some seed has every lr."""
    if not select_dice:
        return None, []
    seeds = sorted(set.intersection(*(set(by_seed) for by_seed in select_dice.values())))
    if not seeds:
        return None, []
    means = {lr: statistics.fmean(select_dice[lr][s] for s in seeds) for lr in select_dice}
    return max(sorted(means), key=lambda lr: (means[lr], -lr)), seeds


def decide(baseline: dict[int, float], treated: dict[int, float], seeds: list[int]) -> dict:
    """Issue 32's rule, paired by seed, on the report half: "helps" (mean difference >= MARGIN and better
    with every seed), "does not help" (mean difference <= 0, or better with at most a minority of the
    seeds: one of 3), "in between" (otherwise: EXTRA_SEEDS more seeds), or "incomplete" until every
    seed of both arms is in. For more than 3 seeds (after "in between") "helps" needs all but
    (n - 3) // 2 seeds, so 4 of 5; the issue states the 3-seed rule only."""
    differences = {s: treated[s] - baseline[s] for s in seeds if s in treated and s in baseline}
    result = {"per_seed_differences": {f"seed{s}": d for s, d in differences.items()},
              "mean_difference": statistics.fmean(differences.values()) if differences else None,
              "seeds_better": sum(d > 0 for d in differences.values()), "seeds": len(differences)}
    n = len(seeds)
    if n < 3 or set(differences) != set(seeds):
        return result | {"verdict": "incomplete"}
    wins, mean = result["seeds_better"], round(result["mean_difference"], 9)  # 0.52 - 0.50 is 0.02, not 0.0199...
    if mean >= MARGIN and wins >= n - (n - 3) // 2:
        verdict = "helps"
    elif mean <= 0 or wins <= (n - 1) // 2:
        verdict = "does not help"
    else:
        verdict = "in between"
    return result | {"verdict": verdict}


def confirm(baseline: dict[int, float], treated: dict[int, float], seeds: list[int]) -> dict:
    """The 7-patient confirmation of a "helps": passes if the mean difference over every seed is >= 0."""
    differences = {s: treated[s] - baseline[s] for s in seeds if s in treated and s in baseline}
    mean = statistics.fmean(differences.values()) if differences else None
    complete = set(differences) == set(seeds) and len(seeds) >= 3
    return {"per_seed_differences": {f"seed{s}": d for s, d in differences.items()}, "mean_difference": mean,
            "verdict": ("passes" if round(mean, 9) >= 0 else "fails") if complete else "incomplete"}


def summarize(results: dict[str, dict], args: argparse.Namespace) -> dict:
    """Per arm and lr: each seed's select/report figures, loss and CPU time; each arm's lr chosen on the
    select half; the paired decision on the report half."""
    runs = {k: r for k, r in results.items() if r.get("task", k) == k and "per_volume" in r and r.get("budget", {}).get("patients") == args.patients}
    split = split_volumes(v for r in runs.values() for v in r["per_volume"])
    arms = [RANDOM, arm_name(PRETRAINED, args.pretrained_mix, args.decoder_pretraining)]
    table: dict = {}
    for run in runs.values():
        if run["arm"] not in arms:
            continue
        entry = table.setdefault(run["arm"], {}).setdefault(f"{run['lr']:g}", {})
        entry[f"seed{run['seed']}"] = {
            "select": half_scores(run, split["select"]), "report": half_scores(run, split["report"]),
            "final_supervised_loss": run["final_supervised_loss"], "cpu_seconds": run["cpu_seconds"],
            "encoder_cpu_seconds": run["encoder_cpu_seconds"], "charged_cpu_seconds": run["cpu_seconds"] + run["encoder_cpu_seconds"],
        }
    chosen, report = {}, {}
    for arm in arms:
        select = {float(lr): {int(s.removeprefix("seed")): e["select"]["dice"] for s, e in by_seed.items()}
                  for lr, by_seed in table.get(arm, {}).items()}
        lr, on_seeds = choose_lr(select)
        final = (lr is not None and all(float(x) in select for x in args.lrs) and set(select[lr]) >= set(args.seeds)
                 and len(on_seeds) >= min(3, len(args.seeds)))  # chosen on 3 seeds at least, and run with every seed
        chosen[arm] = {"lr": lr, "chosen_on_seeds": on_seeds, "complete": final}
        by_seed = table.get(arm, {}).get(f"{lr:g}", {}) if lr is not None else {}
        report[arm] = {int(s.removeprefix("seed")): e["report"]["dice"] for s, e in by_seed.items()}
    rule = confirm if args.patients >= 7 else decide
    decision = rule(report[RANDOM], report[arms[1]], list(args.seeds))
    if decision["verdict"] not in ("incomplete",) and not all(c["complete"] for c in chosen.values()):
        decision["verdict"] = "incomplete"  # the lr choice is not final yet
    if decision["verdict"] == "in between":
        decision["next"] = f"{EXTRA_SEEDS} more seeds on the deciding arms at their chosen lr"
    return {"protocol": "issue 32: SSL4MIS ACDC, lr chosen per arm on the select half of val.list, judged on the report half, "
                        "paired by seed", "budget": budget(args), "seeds": list(args.seeds), "lrs": list(args.lrs),
            "split": {h: sorted({v.split('_frame')[0] for v in split[h]}) for h in ("select", "report")},
            "table": table, "chosen_lr": chosen, "decision": decision,
            "encoders": {k: {"cpu_seconds": r["cpu_seconds"], "final_loss": r.get("final_loss")}
                         for k, r in results.items() if k.startswith("encoder-")}}


def markdown(summary: dict) -> str:
    """The summary as a Markdown table: one row per arm, lr and seed (report-half Dice and HD95 per class,
    select-half Dice, final supervised loss, CPU minutes charged), then the decision with its per-seed differences."""
    def number(value, digits: int = 3) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    rows = ["| arm | lr | seed | select Dice | report Dice | RV | Myo | LV | report HD95 | final sup. loss | CPU min (charged) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, by_lr in sorted(summary["table"].items(), key=lambda item: item[0] != RANDOM):
        for lr, by_seed in sorted(by_lr.items()):
            for seed, cell in sorted(by_seed.items()):
                report = cell["report"]
                classes = [report["classes"][c]["dice"] for c in report["classes"]]
                rows.append(f"| {arm} | {lr} | {seed.removeprefix('seed')} | {number(cell['select']['dice'])} | "
                            f"{number(report['dice'])} | " + " | ".join(number(c) for c in classes)
                            + f" | {number(report['hd95'], 1)} | {number(cell['final_supervised_loss'])} | "
                            f"{cell['cpu_seconds'] / 60:.1f} ({cell['charged_cpu_seconds'] / 60:.1f}) |")
    decision = summary["decision"]
    chosen = ", ".join(f"{arm} lr {c['lr']} (on seeds {c['chosen_on_seeds']}{'' if c['complete'] else ', not final'})"
                       for arm, c in summary["chosen_lr"].items())
    differences = ", ".join(f"{s} {d:+.3f}" for s, d in decision["per_seed_differences"].items()) or "none yet"
    return "\n".join(rows + ["", f"Chosen on the select half: {chosen}.",
                             f"Report half, treated - random at the chosen lrs, per seed: {differences}; "
                             f"mean {number(decision['mean_difference'])}; verdict: **{decision['verdict']}**."])


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.task:
        return run_task(args)
    if not args.summarize_only and not (Path(args.data) / "train_slices.list").is_file():
        print(f"ACDC (SSL4MIS layout) not found at {args.data}: set IDEAL_DATA or pass --data", file=sys.stderr)
        return 2
    if args.jobs < 1 or not 0 < args.pretrained_mix <= 1 or args.decoder_pretraining < 0:
        print("--jobs must be at least 1, --pretrained-mix in (0, 1] and --decoder-pretraining 0 or more", file=sys.stderr)
        return 2
    if differing := stale(load_results(args.results), args):
        print(f"{args.results} holds runs of this plan with another budget ({'; '.join(differing)}): "
              "use another --work/--results or the same options", file=sys.stderr)
        return 2
    failed = [] if args.summarize_only else schedule(args)
    summary = summarize(load_results(args.results), args)
    if args.summary:
        write_json(Path(args.summary), summary)
    print(markdown(summary) if args.markdown else json.dumps({"chosen_lr": summary["chosen_lr"], "decision": summary["decision"]}, indent=2))
    if failed:
        print(f"failed or not started: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
