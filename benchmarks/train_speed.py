"""Training speed and the bf16 check: IDEAL finetuning iterations per second and peak memory in
fp32 and in bf16 autocast + channels-last, each against a plain single-decoder fp32 supervised
loop of the same encoder and decoder 1 at the same number of slices per iteration, all measured
in this run, each in its own process (so peak memory is its own); then the held-out Dice of IDEAL
finetuning at a fixed budget in both precisions (same seeds, same data), so a speed-up that costs
accuracy shows.

    python benchmarks/train_speed.py --out benchmarks/results/train_speed.json [--device cuda]

Timing rounds alternate the workers (plain, fp32, bf16, plain, ...) and keep each worker's fastest
round, so load from other processes on a shared machine biases no worker in particular.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

WARMUP = 3


def _cases(count: int, size: int = 224, first: int = 0):
    from IDEALTrain.io.datasets import Case
    from IDEALTrain.io.phantom import make_phantom

    return [Case(f"p{i}", *make_phantom(i, size=(size, size, 10))) for i in range(first, first + count)]


def _config(args, supervised_only: bool, decoders=("unet", "fpn"), precision: str = "fp32", iterations: int | None = None):
    from IDEALTrain.model.networks import NetworkConfig
    from IDEALTrain.model.preprocessing import Preprocessing
    from IDEALTrain.training.finetune import TrainConfig

    return TrainConfig(
        iterations=iterations or args.iterations, batch_size=args.batch_size, unlabeled_batch_size=args.batch_size,
        supervised_only=supervised_only, checkpoint_every=10**9, network=NetworkConfig(decoders=decoders),
        preprocessing=Preprocessing(inplane="size", size=(args.size, args.size)), precision=precision,
    )


def finetune_worker(args) -> dict:
    """Iteration times of ``train_segmentation`` in IDEAL finetuning mode at ``args.precision``."""
    from IDEALTrain.training.finetune import train_segmentation

    cases = _cases(6)
    stamps: list[float] = []
    bundle = train_segmentation(cases[:2], _config(args, False, precision=args.precision), unlabeled=cases[2:],
                                device=args.device, stop_after=lambda iteration: stamps.append(time.perf_counter()) and False)
    return _summary(stamps, 2 * args.batch_size) | {"precision": bundle.training["precision"]}


def plain_worker(args) -> dict:
    """A textbook loop: one decoder, fp32, default memory format, SGD, Dice + CE, same slices per step."""
    import torch

    from IDEALTrain.inference.predictor import resolve_device
    from IDEALTrain.model.networks import SegmentationNetwork
    from IDEALTrain.training.augment import augment_batch
    from IDEALTrain.training.losses import dice_ce_loss
    from IDEALTrain.training.slices import prepare_slices

    device = resolve_device(args.device)
    config = _config(args, True, decoders=("unet",))
    images, labels, _ = prepare_slices(_cases(6), [], config.preprocessing, config.network)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    network = SegmentationNetwork(config.network).to(device).train()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    stamps = []
    for _ in range(args.iterations):
        index = torch.randint(len(images), (2 * args.batch_size,), generator=generator)
        x, y = augment_batch(images[index], labels[index].long(), config.augmentation, generator)
        loss = dice_ce_loss(network(x.to(device))[0], y.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    return _summary(stamps, 2 * args.batch_size)


def dice_worker(args) -> dict:
    """Held-out Dice of IDEAL finetuning on phantoms at a fixed budget, at ``args.precision`` and ``args.seed``."""
    from IDEALTrain.evaluation.metrics import mean_scores, score
    from IDEALTrain.inference.predictor import Predictor
    from IDEALTrain.training.finetune import train_segmentation

    labelled, unlabelled, test = _cases(3, args.size), _cases(5, args.size, 100), _cases(3, args.size, 1000)
    config = _config(args, False, precision=args.precision, iterations=args.dice_iterations)
    config.seed = args.seed
    start = time.perf_counter()
    bundle = train_segmentation(labelled, config, unlabeled=unlabelled, device=args.device)
    seconds = time.perf_counter() - start
    predictor = Predictor(bundle, device=args.device)
    scores = mean_scores([score(predictor.predict(case.image).labels, case.label) for case in test])
    return {"precision": bundle.training["precision"], "seed": args.seed, "dice": scores["mean"]["dice"],
            "classes": {name: s["dice"] for name, s in scores["classes"].items()}, "train_seconds": seconds}


def _summary(stamps: list[float], slices: int) -> dict:
    import torch

    steps = [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1 :])]
    seconds = sorted(steps)[len(steps) // 2]
    result = {"seconds_per_iteration": seconds, "iterations_per_second": 1 / seconds, "slices_per_iteration": slices,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


_WORKERS = {"finetune": finetune_worker, "plain": plain_worker, "dice": dice_worker}


def _spawn(args, worker: str, **overrides) -> dict:
    """Run one worker in a fresh process (its own peak memory, its own thread setting) and read its JSON line."""
    options = vars(args) | overrides
    command = [sys.executable, __file__, "--worker", worker]
    command += [f"--{k.replace('_', '-')}={v}" for k, v in options.items() if k not in ("worker", "out")]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _fastest(rounds: list[dict]) -> dict:
    return min(rounds, key=lambda r: r["seconds_per_iteration"]) | {"rounds_seconds": [r["seconds_per_iteration"] for r in rounds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/train_speed.json")
    parser.add_argument("--iterations", type=int, default=15, help="timed iterations per round (the first 3 are warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating timing rounds; each worker's fastest counts")
    parser.add_argument("--batch-size", type=int, default=6, help="labelled (and unlabelled) slices per finetuning step")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per worker (the machine's cores by default here)")
    parser.add_argument("--dice-iterations", type=int, default=300, help="fixed budget of the Dice check (0: skip it)")
    parser.add_argument("--dice-size", type=int, default=128, help="in-plane size of the Dice check")
    parser.add_argument("--dice-seeds", type=int, default=2)
    parser.add_argument("--worker", choices=tuple(_WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(_WORKERS[args.worker](args)))
        return
    timed = {"plain": [], "fp32": [], "bf16": []}
    for _ in range(args.rounds):
        timed["plain"].append(_spawn(args, "plain"))
        timed["fp32"].append(_spawn(args, "finetune", precision="fp32"))
        timed["bf16"].append(_spawn(args, "finetune", precision="bf16"))
    plain, fp32, bf16 = (_fastest(timed[name]) for name in ("plain", "fp32", "bf16"))
    report = {
        "setup": {"size": args.size, "batch_size": args.batch_size, "iterations": args.iterations, "rounds": args.rounds,
                  "device": args.device, "threads": args.threads, "python": platform.python_version()},
        "plain_single_decoder_supervised_fp32": plain,
        "ideal_finetune_fp32": fp32,
        "ideal_finetune_bf16": bf16,
        "speedup_over_plain_fp32": {"finetune_fp32": plain["seconds_per_iteration"] / fp32["seconds_per_iteration"],
                                    "finetune_bf16": plain["seconds_per_iteration"] / bf16["seconds_per_iteration"]},
        "bf16_speedup_over_fp32_finetune": fp32["seconds_per_iteration"] / bf16["seconds_per_iteration"],
    }
    if args.dice_iterations:
        dice_args = argparse.Namespace(**(vars(args) | {"size": args.dice_size}))
        runs = {p: [_spawn(dice_args, "dice", precision=p, seed=s) for s in range(args.dice_seeds)] for p in ("fp32", "bf16")}
        mean = {p: sum(r["dice"] for r in rs) / len(rs) for p, rs in runs.items()}
        report["dice_check"] = {
            "protocol": f"IDEAL finetuning on phantoms (3 labelled, 5 unlabelled, 3 held-out test) at {args.dice_size} px, "
                        f"{args.dice_iterations} iterations, batch {args.batch_size}+{args.batch_size}, same seeds in both precisions",
            "runs": runs, "mean_dice": mean, "bf16_minus_fp32": mean["bf16"] - mean["fp32"],
            "per_seed_bf16_minus_fp32": [b["dice"] - f["dice"] for f, b in zip(runs["fp32"], runs["bf16"])],
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
