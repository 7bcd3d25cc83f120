"""ACDC semi-supervised benchmark, SSL4MIS protocol: supervised-only vs finetuning without
pretraining vs full IDEAL (pretraining + two-stream finetuning), at the same iteration budget.

Labelled: the slices of the first 3 or 7 patients of ``train_slices.list`` (68 / 136 slices); the
other training slices are unlabelled; evaluated on the ``val.list`` volumes with 3D Dice, HD95 and
ASD per class (in voxels: SSL4MIS files carry no spacing), as the papers report them. The final
weights of every run are scored (no checkpoint selection). ``val.list`` is split by patient into a
*select* half, where settings are chosen, and a *report* half, where the claim is judged
(``ssl_summary.split_volumes``); the summary gives both halves and all of it.
Every method shares one pretrained encoder per benchmark; each seed is a separate run, and the
claim is judged on the mean over seeds, with the per-seed differences. ``--parallel N`` trains N
runs at once, each in its own process (a GPU is far from full with one small U-Net). Results are
written after every run, so an interrupted benchmark keeps what it finished; ``--resume`` continues
it (finished runs are skipped, and with ``--checkpoint-every`` interrupted runs continue from their
last checkpoint). ``acdc_ssl_protocol.sh`` is issue 16's full protocol.

    python benchmarks/acdc_ssl.py --data $IDEAL_DATA/acdc --iterations 30000 --size 256 \
        --batch-size 12 --unlabeled-batch-size 12 --pretrain-iterations 10000 --seeds 0 1   # the full schedule (GPU)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ssl_summary import METHODS, run_key, summarize, summarize_report  # noqa: E402

__all__ = ["METHODS", "main", "run_key", "summarize"]


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.environ.get("IDEAL_DATA", "../shared/data"), "acdc"))
    parser.add_argument("--out", default="benchmarks/results/acdc_ssl.json")
    parser.add_argument("--work", default="runs/acdc_ssl", help="folder for the bundles and logs of every run")
    parser.add_argument("--labeled-patients", type=int, nargs="+", default=[3, 7])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--iterations", type=int, default=400, help="finetuning iterations of every run")
    parser.add_argument("--pretrain-iterations", type=int, default=300)
    parser.add_argument("--pretrain-batch-size", type=int, default=16)
    parser.add_argument("--pretrain-negative-min-distance", type=float, default=0.0,
                        help="same-image cells closer than this many feature cells are not negatives in the dense loss")
    parser.add_argument("--pretrain-same-image-negatives", action="store_true",
                        help="dense loss negatives only from the query's own image (Chaitanya et al.'s local loss)")
    parser.add_argument("--pretrain-optimizer", choices=("adam", "adamw", "sgd"), default="adam")
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--pretrain-weight-decay", type=float, default=1e-4)
    parser.add_argument("--pretrain-no-dropout", action="store_true", help="no dropout in either encoder while pretraining")
    parser.add_argument("--pretrain-key-eval", action="store_true", help="the key encoder runs in eval mode")
    parser.add_argument("--pretrain-extra-levels", type=int, nargs="*", default=[], help="more encoder levels for the dense loss")
    parser.add_argument("--pretrain-positive-radius", type=float, default=0.0, help="same-image cells this close are positives")
    parser.add_argument("--pretrain-queue", type=int, default=0, help="key queue size (negatives from other images)")
    parser.add_argument("--pretrain-global-weight", type=float, default=0.0, help="weight of the image-level InfoNCE term")
    parser.add_argument("--size", type=int, default=128, help="network in-plane size (SSL4MIS uses 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--unlabeled-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--consistency-weight", type=float, default=0.1, help="cross pseudo-label weight after ramp-up")
    parser.add_argument("--ramp-up", type=float, default=1.0, help="share of the run over which that weight ramps up")
    parser.add_argument("--pretrained", help="reuse this pretrained-encoder bundle instead of pretraining again")
    parser.add_argument("--encoder-lr-scale", type=float, default=1.0, help="IDEAL runs: the pretrained encoder's share of the learning rate")
    parser.add_argument("--encoder-warmup", type=int, default=0, help="IDEAL runs: iterations with the pretrained encoder frozen first")
    parser.add_argument("--pretrained-mix", type=float, default=1.0,
                        help="IDEAL runs: start from this share of the pretrained encoder, the rest the run's own random weights")
    parser.add_argument("--pretrained-rescale", action="store_true",
                        help="IDEAL runs: rescale each pretrained conv filter to the norm of the run's own random filter")
    parser.add_argument("--stream-perturbation", choices=("none", "dropout", "noise"), default="none",
                        help="two-stream runs (finetune-no-pretraining and ideal): encoder features perturbed anew before each decoder")
    parser.add_argument("--perturbation-strength", type=float, default=0.5)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (pretraining uses the first)")
    parser.add_argument("--parallel", type=int, default=1, help="runs trained at once, each in its own process")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resume", action="store_true",
                        help="continue --out: skip its finished runs (its budget must match), resume interrupted ones")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="> 0: every run checkpoints this often under WORK/states, so --resume continues it there")
    return parser.parse_args(argv)


BUDGET_KEYS = ("iterations", "pretrain_iterations", "pretrain_batch_size", "pretrain_negative_min_distance",
               "pretrain_same_image_negatives", "pretrain_optimizer", "pretrain_lr", "pretrain_weight_decay",
               "pretrain_no_dropout", "pretrain_key_eval", "pretrain_extra_levels", "pretrain_positive_radius",
               "pretrain_queue", "pretrain_global_weight", "size", "batch_size", "unlabeled_batch_size", "lr", "seeds",
               "consistency_weight", "ramp_up", "pretrained", "encoder_lr_scale", "encoder_warmup", "pretrained_mix",
               "parallel", "pretrained_rescale", "stream_perturbation", "perturbation_strength", "precision",
               "checkpoint_every")
RESUME_IGNORES = ("parallel", "seeds")  # budget keys that may change when --resume continues a file
RECORDED_PRETRAINING = ("batch_size", "dense_level", "global_weight", "samples_per_image", "negative_min_distance",
                        "same_image_negatives", "frozen_levels", "temperature", "queue_size", "optimizer", "learning_rate",
                        "dropout", "key_eval", "extra_dense_levels", "positive_radius")  # of a reused encoder's recipe


def run_name(key: str) -> str:
    """The file and folder name of a run (its bundle, log and result)."""
    return key.replace("/", "-")


def budget_differences(stored: dict, requested: dict) -> list[str]:
    """What ``--resume`` refuses: the budget keys whose stored and requested values differ (a key
    only one side has differs too), except those in ``RESUME_IGNORES``."""
    requested = json.loads(json.dumps(requested))  # tuples as the stored lists
    missing = "(not recorded)"
    return [f"{k}: {stored.get(k, missing)!r} there, {requested.get(k, missing)!r} now"
            for k in sorted(set(stored) | set(requested))
            if k not in RESUME_IGNORES and stored.get(k, missing) != requested.get(k, missing)]


def preprocessing_plan(args: argparse.Namespace):
    """The one plan of every run and of the pretraining: slices resized to --size."""
    from IDEALTrain.model.preprocessing import Preprocessing

    return Preprocessing(inplane="size", size=(args.size, args.size))


def train_and_score(args: argparse.Namespace, patients: int, method: str, seed: int, pretrained, val_cases: list) -> dict:
    """One run of the protocol: train, save the bundle under ``--work``, score on val.list."""
    from IDEALTrain.evaluation.metrics import mean_scores, score
    from IDEALTrain.inference.predictor import Predictor
    from IDEALTrain.model.bundle import save_bundle
    from IDEALTrain.model.networks import NetworkConfig
    from IDEALTrain.training.checkpoint import CHECKPOINT_NAME
    from IDEALTrain.training.finetune import TrainConfig, train_segmentation
    from IDEALTrain.training.selection import LabelSelection, select_training_cases

    data = Path(args.data)
    labeled, unlabeled = select_training_cases(f"ssl4mis:{data}", f"ssl4mis:{data}", LabelSelection(patients=patients), require_unlabeled=True)
    start = time.perf_counter()
    config = TrainConfig(
        iterations=args.iterations, batch_size=args.batch_size, unlabeled_batch_size=args.unlabeled_batch_size,
        learning_rate=args.lr, seed=seed, supervised_only=method == "supervised-only",
        consistency_weight=args.consistency_weight, ramp_up=args.ramp_up,
        encoder_lr_scale=args.encoder_lr_scale if method == "ideal" else 1.0,
        encoder_warmup=args.encoder_warmup if method == "ideal" else 0,
        pretrained_mix=args.pretrained_mix if method == "ideal" else 1.0,
        pretrained_rescale=args.pretrained_rescale and method == "ideal", precision=args.precision,
        stream_perturbation=args.stream_perturbation if method != "supervised-only" else "none",
        perturbation_strength=args.perturbation_strength,
        checkpoint_every=args.checkpoint_every or max(args.iterations, 1), network=NetworkConfig(),
        preprocessing=preprocessing_plan(args),
    )
    name = run_name(run_key(patients, method, seed))
    state = Path(args.work) / "states" / name if args.checkpoint_every > 0 else None
    resumed = state is not None and (state / CHECKPOINT_NAME).is_file()
    if resumed and not args.resume:  # a stale state of an earlier benchmark in this --work: start over
        shutil.rmtree(state)
        resumed = False
    bundle = train_segmentation(labeled, config, unlabeled=unlabeled, device=args.device, checkpoint_dir=state,
                                pretrained=pretrained if method == "ideal" else None, resume=resumed)
    trained_seconds = time.perf_counter() - start
    save_bundle(bundle, Path(args.work) / name, overwrite=True)
    predictor = Predictor(bundle, device=args.device)
    per_volume = {case.name: score(predictor.predict(case.image).labels, case.label) for case in val_cases}
    summary = mean_scores(list(per_volume.values()))
    return {
        "patients": patients, "method": method, "seed": seed,
        "labeled_slices": len(labeled), "unlabeled_slices": len(unlabeled), "train_seconds": trained_seconds,
        "resumed_from_checkpoint": resumed,
        "precision": bundle.training["precision"], "encoder_level_norms": bundle.training["encoder_level_norms"],
        "mean": summary["mean"], "classes": summary["classes"], "undefined": summary["undefined"], "per_volume": per_volume,
    }


def child_command(args: argparse.Namespace, patients: int, method: str, seed: int, pretrained_path: str | None, out: Path) -> list[str]:
    """This script, for one run, reusing the benchmark's encoder."""
    options = {
        "--data": args.data, "--out": out, "--work": args.work, "--labeled-patients": patients, "--methods": method,
        "--iterations": args.iterations, "--size": args.size, "--batch-size": args.batch_size,
        "--unlabeled-batch-size": args.unlabeled_batch_size, "--lr": args.lr, "--consistency-weight": args.consistency_weight,
        "--ramp-up": args.ramp_up, "--encoder-lr-scale": args.encoder_lr_scale,
        "--encoder-warmup": args.encoder_warmup, "--pretrained-mix": args.pretrained_mix, "--seeds": seed, "--device": args.device,
        "--stream-perturbation": args.stream_perturbation, "--perturbation-strength": args.perturbation_strength,
        "--precision": args.precision, "--checkpoint-every": args.checkpoint_every,
    }
    for flag, on in (("--pretrained-rescale", args.pretrained_rescale), ("--resume", args.resume)):
        if on:
            options[flag] = ""
    if pretrained_path and method == "ideal":
        options["--pretrained"] = pretrained_path
    return [sys.executable, str(Path(__file__).resolve())] + [str(x) for pair in options.items() for x in pair if x != ""]


def run_in_processes(args: argparse.Namespace, jobs: list[tuple[int, str, int]], pretrained_path: str | None, finished) -> list[str]:
    """Train ``jobs`` in up to ``--parallel`` child processes; ``finished(key, run)`` gets each
    result as it comes. Returns the keys of the runs that failed (their logs say why). Stopped by
    SIGTERM or Ctrl-C, it stops the runs in progress first (each checkpoints, with ``--checkpoint-every``)."""
    logs = Path(args.work) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    environment = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.parallel))}
    waiting, running, failed = list(jobs), {}, []
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        collect(args, waiting, running, failed, pretrained_path, finished, logs, environment)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for process, _ in running.values():  # interrupted: the children stop (and checkpoint) too
            process.terminate()
        for process, _ in running.values():
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
    return failed


def collect(args, waiting: list, running: dict, failed: list, pretrained_path, finished, logs: Path, environment) -> None:
    """``run_in_processes``'s loop: start children up to ``--parallel``, hand on each finished result."""
    while waiting or running:
        while waiting and len(running) < args.parallel:
            patients, method, seed = waiting.pop(0)
            key = run_key(patients, method, seed)
            name = run_name(key)
            (logs / f"{name}.json").unlink(missing_ok=True)  # a child's --out holds only its own run
            with open(logs / f"{name}.log", "a" if args.resume else "w") as log:
                process = subprocess.Popen(child_command(args, patients, method, seed, pretrained_path, logs / f"{name}.json"),
                                           stdout=log, stderr=subprocess.STDOUT, env=environment)
            running[key] = (process, logs / f"{name}.json")
        time.sleep(1.0)
        for key, (process, result) in list(running.items()):
            if process.poll() is None:
                continue
            del running[key]
            if process.returncode == 0 and result.is_file():
                finished(key, json.loads(result.read_text())["runs"][key])
            else:
                failed.append(key)
                print(f"{key} failed (exit {process.returncode}); see {logs / (run_name(key) + '.log')}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)

    import torch

    from IDEALTrain.io.datasets import load_cases
    from IDEALTrain.model.bundle import load_bundle, save_bundle
    from IDEALTrain.model.networks import NetworkConfig
    from IDEALTrain.training.pretraining import PretrainConfig, pretrain

    data = Path(args.data)
    if not (data / "train_slices.list").is_file():
        raise SystemExit(f"ACDC (SSL4MIS layout) not found at {data}: set IDEAL_DATA or pass --data")
    if args.parallel < 1:
        raise SystemExit(f"--parallel must be at least 1, got {args.parallel}")
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    budget = {k: getattr(args, k) for k in BUDGET_KEYS}
    stored = json.loads(out.read_text()) if args.resume and out.is_file() else None
    if stored is not None and (differences := budget_differences(stored.get("budget", {}), budget)):
        print(f"--resume: {out} was run with another budget ({'; '.join(differences)}); "
              "resume with its options, or write to another --out", file=sys.stderr)
        return 2
    report = {
        "protocol": "SSL4MIS ACDC: first N patients of train_slices.list labelled, the rest unlabelled; val.list volumes",
        "budget": budget,
        "device": args.device,
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "units": "voxel",
        "runs": {},
    }
    if stored is not None:  # the stored file goes on, with the seeds of both sessions; each session's machine is kept
        session = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": args.device, "machine": report["machine"],
                   "runs_before": len(stored["runs"])}
        report = stored
        seeds = sorted(set(report["budget"].get("seeds", [])) | set(args.seeds))
        report["budget"] |= {"seeds": seeds, "parallel": args.parallel}
        report.setdefault("resumed", []).append(session)

    def write() -> None:
        runs = report["runs"]
        patients = sorted(set(args.labeled_patients) | {r["patients"] for r in runs.values() if "patients" in r})
        methods = [m for m in METHODS if m in args.methods or any(r.get("method") == m for r in runs.values())]
        report.update(summarize_report(runs, patients, methods, report["budget"]["seeds"]))
        out.write_text(json.dumps(report, indent=2))

    def finished(key: str, run: dict) -> None:
        report["runs"][key] = run
        write()
        print(f"{key}: mean Dice {run['mean']['dice']:.4f} ({run['train_seconds']:.0f} s)", flush=True)

    pretrained_path = args.pretrained
    pretrained = load_bundle(args.pretrained) if args.pretrained else None
    if pretrained is not None:  # what the reused encoder was pretrained with (pretrain_iterations above is unused)
        recipe = pretrained.training.get("recipe", {})
        report["pretraining"] = {"reused": args.pretrained, "slices": pretrained.training.get("slices"),
                                 "iterations": recipe.get("iterations"), "size": (recipe.get("preprocessing") or {}).get("size"),
                                 **{k: recipe.get(k) for k in RECORDED_PRETRAINING},
                                 "encoder_level_norms": pretrained.training.get("encoder_level_norms")}
    jobs = [(p, m, s) for p in args.labeled_patients for s in args.seeds for m in args.methods
            if run_key(p, m, s) not in report["runs"]]
    if stored is not None:
        print(f"--resume: {len(stored['runs'])} runs in {out}, {len(jobs)} to go", flush=True)
    earlier = work / "pretrained"
    if stored is not None and pretrained is None and any(m == "ideal" for _, m, _ in jobs) and "pretraining" in stored:
        if not earlier.is_dir() and any(r.get("method") == "ideal" for r in stored["runs"].values()):
            print(f"--resume: the IDEAL runs in {out} started from {earlier}, which is missing; bring it back "
                  "(e.g. carry it to the machine) or write to another --out", file=sys.stderr)
            return 2
        if earlier.is_dir():
            pretrained, pretrained_path = load_bundle(earlier), str(earlier)
            if json.loads(json.dumps(pretrained.training["recipe"])) != stored["pretraining"].get("recipe"):
                print(f"--resume: {earlier} is not the encoder {out} records; write to another --out", file=sys.stderr)
                return 2
            print(f"--resume: the IDEAL runs start from the encoder pretrained before, {earlier}", flush=True)
    if any(m == "ideal" for _, m, _ in jobs) and pretrained is None:
        start = time.perf_counter()
        everything = load_cases(f"ssl4mis:{data}:train_slices.list")
        config = PretrainConfig(iterations=args.pretrain_iterations, batch_size=args.pretrain_batch_size, seed=args.seeds[0],
                                negative_min_distance=args.pretrain_negative_min_distance,
                                same_image_negatives=args.pretrain_same_image_negatives,
                                optimizer=args.pretrain_optimizer, learning_rate=args.pretrain_lr,
                                weight_decay=args.pretrain_weight_decay, dropout=not args.pretrain_no_dropout,
                                key_eval=args.pretrain_key_eval, extra_dense_levels=tuple(args.pretrain_extra_levels),
                                positive_radius=args.pretrain_positive_radius, queue_size=args.pretrain_queue,
                                global_weight=args.pretrain_global_weight, precision=args.precision,
                                network=NetworkConfig(), preprocessing=preprocessing_plan(args))
        pretrained = pretrain(everything, config, device=args.device)
        pretrained_path = str(work / "pretrained")
        save_bundle(pretrained, pretrained_path, overwrite=True)
        report["pretraining"] = {"slices": len(everything), "iterations": args.pretrain_iterations, "batch_size": args.pretrain_batch_size,
                                 "negative_min_distance": args.pretrain_negative_min_distance,
                                 "same_image_negatives": args.pretrain_same_image_negatives, "seconds": time.perf_counter() - start,
                                 "recipe": pretrained.training["recipe"], "encoder_level_norms": pretrained.training["encoder_level_norms"]}
        write()
        print(f"pretraining: {report['pretraining']['seconds']:.0f} s", flush=True)

    if args.parallel > 1 and len(jobs) > 1:
        failed = run_in_processes(args, jobs, pretrained_path, finished)
    else:
        val_cases = load_cases(f"ssl4mis:{data}:val.list", require_labels=True) if jobs else []
        failed = []
        for patients, method, seed in jobs:
            finished(run_key(patients, method, seed), train_and_score(args, patients, method, seed, pretrained, val_cases))
    write()
    print(json.dumps(report["claim"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
