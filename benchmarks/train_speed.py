"""Training speed: IDEAL finetuning iterations per second and peak memory, against a plain
single-decoder supervised loop of the same encoder and decoder 1 at the same number of slices
per iteration, each in its own process (so peak memory is its own).

    python benchmarks/train_speed.py --out benchmarks/results/train_speed.json [--device cuda]
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


def _cases(count: int):
    from IDEALTrain.io.datasets import Case
    from IDEALTrain.io.phantom import make_phantom

    return [Case(f"p{i}", *make_phantom(i, size=(224, 224, 10))) for i in range(count)]


def _config(args, supervised_only: bool, decoders=("unet", "fpn")):
    from IDEALTrain.model.networks import NetworkConfig
    from IDEALTrain.model.preprocessing import Preprocessing
    from IDEALTrain.training.finetune import TrainConfig

    return TrainConfig(
        iterations=args.iterations, batch_size=args.batch_size, unlabeled_batch_size=args.batch_size,
        supervised_only=supervised_only, checkpoint_every=10**9, network=NetworkConfig(decoders=decoders),
        preprocessing=Preprocessing(inplane="size", size=(args.size, args.size)),
    )


def finetune_worker(args) -> dict:
    """Iteration times of ``train_segmentation`` in IDEAL finetuning mode."""
    from IDEALTrain.training.finetune import train_segmentation

    cases = _cases(6)
    stamps: list[float] = []
    train_segmentation(cases[:2], _config(args, False), unlabeled=cases[2:], device=args.device,
                       stop_after=lambda iteration: stamps.append(time.perf_counter()) and False)
    return _summary(stamps, 2 * args.batch_size)


def plain_worker(args) -> dict:
    """A textbook loop: one decoder, fp32, default memory format, SGD, Dice + CE, same slices per step."""
    import torch

    from IDEALTrain.training.augment import augment_batch
    from IDEALTrain.training.losses import dice_ce_loss
    from IDEALTrain.model.networks import SegmentationNetwork
    from IDEALTrain.inference.predictor import resolve_device
    from IDEALTrain.training.finetune import prepare_slices

    device = resolve_device(args.device)
    config = _config(args, True, decoders=("unet",))
    images, labels, _ = prepare_slices(_cases(6), [], config)
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


def _summary(stamps: list[float], slices: int) -> dict:
    import torch

    steps = [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1 :])]
    seconds = sorted(steps)[len(steps) // 2]
    result = {"seconds_per_iteration": seconds, "iterations_per_second": 1 / seconds, "slices_per_iteration": slices,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/train_speed.json")
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=6, help="labelled (and unlabelled) slices per finetuning step")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", choices=("finetune", "plain"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps((finetune_worker if args.worker == "finetune" else plain_worker)(args)))
        return
    results = {}
    for worker in ("plain", "finetune"):
        command = [sys.executable, __file__, "--worker", worker] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "out")]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[worker] = json.loads(output.strip().splitlines()[-1])
    report = {
        "setup": {"size": args.size, "batch_size": args.batch_size, "iterations": args.iterations, "device": args.device,
                  "python": platform.python_version()},
        "plain_single_decoder_supervised": results["plain"],
        "ideal_finetune": results["finetune"],
        "finetune_time_ratio": results["finetune"]["seconds_per_iteration"] / results["plain"]["seconds_per_iteration"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
