"""Summary and claim of the ACDC semi-supervised benchmark (``acdc_ssl.py``), from the runs' per-volume scores.

``val.list`` is split by patient into a *select* half, where settings may be chosen, and a *report*
half, where the claim is judged (see ``split_volumes``); the summary gives the mean Dice of every
method and label count on ``select``, ``report`` and ``all`` (the whole of ``val.list``, as the
benchmark reported before the split), per seed and over seeds.

Re-summarise a result file without touching it (old files too: every run keeps ``per_volume``):

    python benchmarks/ssl_summary.py benchmarks/results/acdc_ssl_gpu_h100.json [--json]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

METHODS = ("supervised-only", "finetune-no-pretraining", "ideal")
HALVES = ("select", "report", "all")
THRESHOLD, THRESHOLD_PATIENTS = 0.85, 7  # full IDEAL's mean Dice on the report half with 7 labelled patients
DIFFERENCES = (("ideal", "finetune-no-pretraining"), ("finetune-no-pretraining", "supervised-only"),
               ("ideal", "supervised-only"))


def run_key(patients: int, method: str, seed: int) -> str:
    return f"{patients}_patients/{method}/seed{seed}"


def patient_of(volume: str) -> str:
    """``patient028_frame01`` -> ``patient028``: both frames of a patient belong together."""
    return volume.split("_frame")[0]


def split_volumes(volumes) -> dict[str, list[str]]:
    """Split validation volumes by patient into ``select`` and ``report`` halves (and ``all``).

    The patient ids are sorted and dealt alternately, the first to ``select``, the second to
    ``report``, and so on; both frames of a patient land on the same side. Deterministic and
    independent of the order of ``val.list``. On the SSL4MIS ACDC ``val.list`` (10 patients):
    select = patients 002, 028, 039, 078, 085; report = 019, 030, 045, 082, 087. Settings are
    chosen on ``select``; headline numbers and the claim come from ``report``.
    """
    volumes = sorted(set(volumes))
    select = set(sorted({patient_of(v) for v in volumes})[0::2])
    return {"select": [v for v in volumes if patient_of(v) in select],
            "report": [v for v in volumes if patient_of(v) not in select], "all": volumes}


def mean_dice(per_volume: dict, volumes: list[str]) -> float | None:
    """Mean over classes of each class's mean Dice over ``volumes`` (undefined values skipped): the
    convention of ``IDEALTrain.evaluation.metrics.mean_scores``, so ``all`` equals a run's ``mean``."""
    volumes = [v for v in volumes if v in per_volume]
    if not volumes:
        return None
    per_class = []
    for name in per_volume[volumes[0]]["classes"]:
        values = [d for v in volumes if (d := per_volume[v]["classes"][name]["dice"]) is not None]
        if values:
            per_class.append(statistics.fmean(values))
    return statistics.fmean(per_class) if per_class else None


def run_dice(run: dict, split: dict[str, list[str]]) -> dict[str, float | None]:
    """A run's mean Dice on each half; a run without ``per_volume`` has only ``all`` (its mean)."""
    if not run.get("per_volume"):
        return {"select": None, "report": None, "all": run["mean"]["dice"]}
    return {half: mean_dice(run["per_volume"], split[half]) for half in HALVES}


def summarize(runs: dict, patients_list: list[int], methods: list[str], seeds: list[int]) -> tuple[dict, dict]:
    """Mean Dice over seeds per (patients, method) on each half, and the claim of the first CPU
    benchmarks (``claim_ideal_beats_supervised``: IDEAL ahead of supervised-only on the mean and with
    every seed, on all of ``val.list``), judged only once every seed of both methods is in.

    Each entry keeps ``mean_dice``/``per_seed`` (all of val.list, as before the split) and adds
    ``seed_ids`` and ``select``/``report``/``all``, each ``{"mean_dice", "per_seed"}`` in seed order.
    """
    split = split_volumes(v for run in runs.values() for v in run.get("per_volume") or {})
    summary, claim = {}, {}
    for patients in patients_list:
        for method in methods:
            found = [(s, runs[k]) for s in seeds if (k := run_key(patients, method, s)) in runs]
            if not found:
                continue
            scores = [run_dice(run, split) for _, run in found]
            entry = {"mean_dice": statistics.fmean(d["all"] for d in scores), "per_seed": [d["all"] for d in scores],
                     "seeds": len(found), "seed_ids": [s for s, _ in found]}
            for half in HALVES:
                values = [d[half] for d in scores]
                mean = statistics.fmean(values) if None not in values else None
                entry[half] = {"mean_dice": mean, "per_seed": values}
            summary[f"{patients}_patients/{method}"] = entry
        ideal, supervised = (summary.get(f"{patients}_patients/{m}") for m in ("ideal", "supervised-only"))
        if ideal and supervised and ideal["seeds"] == supervised["seeds"] == len(seeds):
            claim[str(patients)] = {
                "on_the_mean": ideal["mean_dice"] > supervised["mean_dice"],
                "with_every_seed": all(i > s for i, s in zip(ideal["per_seed"], supervised["per_seed"])),
                "margin": ideal["mean_dice"] - supervised["mean_dice"],
            }
    return summary, claim


def by_seed(entry: dict | None, half: str) -> dict[int, float]:
    if not entry:
        return {}
    return {s: d for s, d in zip(entry["seed_ids"], entry[half]["per_seed"]) if d is not None}


def judge_claim(summary: dict, patients_list: list[int], seeds: list[int], half: str = "report") -> dict:
    """Issue 16's claim on ``half`` (the report half): per label count, full IDEAL ahead of finetuning
    without pretraining ahead of supervised-only on the mean over seeds (``ordering_on_the_mean``),
    and IDEAL ahead of finetuning without pretraining with at least 2 of 3 seeds (two thirds, rounded
    up), paired by seed; and full IDEAL's mean with 7 labelled patients at least 0.85. Per-seed
    differences are listed for every pair of methods both run with a seed. A verdict is None until
    every seed of every method it needs is in."""
    claim: dict = {"judged_on": half, "seeds": list(seeds), "label_counts": {}}
    needed = math.ceil(2 * len(seeds) / 3)
    for patients in patients_list:
        entries = {m: summary.get(f"{patients}_patients/{m}") for m in METHODS}
        values = {m: by_seed(e, half) for m, e in entries.items()}
        complete = all(set(values[m]) == set(seeds) for m in METHODS)
        means = {m: statistics.fmean(v.values()) if set(v) == set(seeds) else None for m, v in values.items()}
        differences = {f"{a} - {b}": {f"seed{s}": values[a][s] - values[b][s]
                                      for s in seeds if s in values[a] and s in values[b]} for a, b in DIFFERENCES}
        wins = sum(d > 0 for d in differences["ideal - finetune-no-pretraining"].values())
        ordering = means["ideal"] > means["finetune-no-pretraining"] > means["supervised-only"] if complete else None
        claim["label_counts"][str(patients)] = {
            "mean_dice": means, "per_seed_differences": differences,
            "ordering_on_the_mean": ordering,
            "ideal_beats_no_pretraining_seeds": wins if complete else None, "seeds_needed": needed,
            "holds": ordering and wins >= needed if complete else None,
        }
    ideal = by_seed(summary.get(f"{THRESHOLD_PATIENTS}_patients/ideal"), half)
    mean = statistics.fmean(ideal.values()) if ideal and set(ideal) == set(seeds) else None
    claim[f"ideal_{THRESHOLD_PATIENTS}p_{half}_mean"] = mean
    claim[f"ideal_{THRESHOLD_PATIENTS}p_{half}_at_least_{THRESHOLD}"] = None if mean is None else mean >= THRESHOLD
    verdicts = [c["holds"] for c in claim["label_counts"].values()]
    verdicts.append(claim[f"ideal_{THRESHOLD_PATIENTS}p_{half}_at_least_{THRESHOLD}"])
    claim["holds"] = None if None in verdicts or THRESHOLD_PATIENTS not in patients_list else all(verdicts)
    return claim


def summarize_report(runs: dict, patients_list: list[int], methods: list[str], seeds: list[int]) -> dict:
    """Everything a result file keeps beside its runs: the split, the summary, issue 16's claim
    (judged on the report half) and the earlier claim key."""
    split = split_volumes(v for run in runs.values() for v in run.get("per_volume") or {})
    summary, old_claim = summarize(runs, patients_list, methods, seeds)
    return {"val_split": {half: sorted({patient_of(v) for v in split[half]}) for half in ("select", "report")},
            "summary": summary, "claim": judge_claim(summary, patients_list, seeds),
            "claim_ideal_beats_supervised": old_claim}


def with_sources(runs: dict, root: Path) -> dict:
    """The runs, a copied run (no ``per_volume``; ``source`` file and ``source_run`` key) given the
    per-volume scores of its source run where that file is found under ``root`` (the repository)."""
    resolved = {}
    for key, run in runs.items():
        source = root / run["source"] if not run.get("per_volume") and run.get("source") else None
        if source is not None and source.is_file():
            run = run | {"per_volume": json.loads(source.read_text())["runs"][run["source_run"]]["per_volume"]}
        resolved[key] = run
    return resolved


def resummarize(report: dict, root: Path = Path(__file__).resolve().parents[1]) -> dict:
    """``summarize_report`` of a stored result file, with the label counts, methods and seeds it holds
    (copied runs read their per-volume scores from their source file)."""
    runs = with_sources(report["runs"], root)
    patients = sorted({int(k.split("_patients/")[0]) for k in runs})
    methods = [m for m in METHODS if any(k.split("/")[1] == m for k in runs)]
    seeds = sorted(set(report.get("budget", {}).get("seeds") or []) | {int(k.rsplit("seed", 1)[1]) for k in runs})
    return summarize_report(runs, patients, methods, seeds)


def table(result: dict) -> str:
    """Mean Dice per label count and method on each half, with the per-seed report values."""
    def number(x):
        return "  –  " if x is None else f"{x:.3f}"

    lines = [f"select: {' '.join(result['val_split']['select'])}", f"report: {' '.join(result['val_split']['report'])}",
             "label count / method: select / report / all (report per seed)"]
    for key, entry in result["summary"].items():
        seeds = ", ".join(f"seed{s} {number(d)}" for s, d in zip(entry["seed_ids"], entry["report"]["per_seed"]))
        lines.append(f"{key}: {' / '.join(number(entry[h]['mean_dice']) for h in HALVES)} ({seeds})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="result files of acdc_ssl.py (read only)")
    parser.add_argument("--json", action="store_true", help="print the whole summary and claim as JSON")
    args = parser.parse_args(argv)
    for path in args.results:
        result = resummarize(json.loads(Path(path).read_text()))
        text = json.dumps(result, indent=2) if args.json else f"{table(result)}\nclaim: {json.dumps(result['claim'])}"
        print(f"{path}\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
