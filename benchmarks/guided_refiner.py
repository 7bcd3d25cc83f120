"""Click-conditioned correction network (issue 19), experiment workflow: a thin wrapper over the package.

The network, its training and its engine now ship in IDEALTrain (``idealtrain train-refiner`` does both
steps below in one run; :mod:`IDEALTrain.training.refinement_training`). This wrapper keeps the
experiment's two steps, so the shipped model's probabilities are computed once and cached:

    IDEAL_DATA=../shared/data python benchmarks/guided_refiner.py prepare --cache runs/guided_refiner
    IDEAL_DATA=../shared/data python benchmarks/guided_refiner.py train --cache runs/guided_refiner --minutes 35

``train`` writes the refinement bundle ``<cache>/refinement`` (``--resume`` takes a refinement bundle or the
experiment's old ``.safetensors`` weights); benchmark it with
``benchmarks/interactive.py --engine guided --refinement <cache>/refinement``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = ROOT / "IDEALSegment" / "Resources" / "Models" / "idealsegment-acdc-1.1.0"


def prepare(data: Path, cache: Path, model: Path) -> None:
    """The model's probabilities on every ACDC training slice (never a val.list volume), cached as train.npz."""
    from IDEALTrain.inference.predictor import Predictor
    from IDEALTrain.io.ssl4mis import list_cases
    from IDEALTrain.training.refinement_training import prepare_refinement_data

    cases = list_cases(data / "acdc", "train_slices.list")
    def report(n: int, name: str) -> None:
        if n % 200 == 0:
            print(n, name, flush=True)

    arrays = prepare_refinement_data(Predictor(model, "cpu"), cases, progress=report)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(cache / "train.npz", **arrays)


def train(args: argparse.Namespace) -> None:
    """Train from the cache and write ``<cache>/refinement`` and ``<cache>/train_log.json``."""
    from IDEALTrain.model.bundle import load_bundle, save_bundle
    from IDEALTrain.model.refinement_network import RefinementConfig
    from IDEALTrain.training.refinement_training import refinement_bundle, train_refinement, training_summary

    loaded = np.load(args.cache / "train.npz")
    data = {key: loaded[key] for key in loaded.files}
    segmentation = load_bundle(args.model)
    config, start = RefinementConfig(num_classes=segmentation.network.num_classes), None
    if args.resume is not None and args.resume.suffix == ".safetensors":  # the experiment's weights
        from safetensors.torch import load_file

        start = load_file(str(args.resume))
    elif args.resume is not None:
        resumed = load_bundle(args.resume)
        config, start = resumed.network, resumed.weights
    if args.adjacent:  # 2.5D: adjacent-slice guidance (a 2D start is widened with zero weights)
        config = RefinementConfig(**{**config.to_json(), "adjacent_guidance": True})

    def progress(step: int, loss: float) -> None:
        if step % 50 == 0:
            print(f"step {step} loss {loss:.4f}", flush=True)

    weights, log = train_refinement(
        data, config, iterations=args.iterations, minutes=None if args.iterations else args.minutes,
        batch=args.batch, lr=args.lr, seed=args.seed, start_weights=start, progress=progress, device="cpu",
    )
    summary = training_summary(log) | {"data": str(args.cache / "train.npz"), "resume": str(args.resume or "")}
    save_bundle(refinement_bundle(weights, segmentation, summary, config), args.cache / "refinement",
                half_precision=True, overwrite=True)
    (args.cache / "train_log.json").write_text(json.dumps(log))
    print(summary, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("prepare", "train"))
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("IDEAL_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the segmentation model")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "guided_refiner", help="cached probabilities and output")
    parser.add_argument("--minutes", type=float, default=35.0)
    parser.add_argument("--iterations", type=int, default=None, help="instead of --minutes: a reproducible budget")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adjacent", action="store_true", help="train: with adjacent-slice guidance (2.5D)")
    parser.add_argument("--resume", type=Path, default=None, help="train: start from a refinement bundle or .safetensors")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.command == "prepare":
        prepare(args.data, args.cache, args.model)
    else:
        train(args)


if __name__ == "__main__":
    main()
