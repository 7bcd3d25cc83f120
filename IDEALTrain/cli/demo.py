"""``idealtrain demo``: the shipped model on the shipped real scan; ``--train-comparison``: IDEAL vs supervised-only on phantoms."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import DEVICE_HELP


def cmd_demo(args: argparse.Namespace) -> None:
    """Segment the real sample and compare with the expert, or (--train-comparison) run the phantom training comparison."""
    if args.train_comparison:
        from ..demo import run_train_comparison

        out = Path(args.out or "runs/train-comparison")
        run_train_comparison(
            out, cases=args.cases, labeled=args.labeled, iterations=args.iterations,
            pretrain_iterations=args.pretrain_iterations, seed=args.seed, device=args.device,
        )
        return
    from ..demo import run_sample_demo

    run_sample_demo(Path(args.out or "runs/demo"), model=args.model, device=args.device, overwrite=args.overwrite)


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Register the demo command."""
    p = commands.add_parser(
        "demo", help="segment the shipped real cine MRI (Sunnybrook) with the shipped model: EF and Dice against the "
        "expert, .seg.nrrd files, overlays; --train-comparison: IDEAL vs supervised-only on phantoms",
    )
    p.add_argument("--out", help="output folder (default runs/demo, or runs/train-comparison)")
    p.add_argument("--model", type=Path, help="model bundle for the sample (default: the shipped model)")
    p.add_argument(
        "--train-comparison", action="store_true",
        help="instead: train IDEAL and supervised-only on phantoms at a tiny budget (about 10 min on a CPU); "
        "shows the training pipeline, not the method's benefit (the difference is within run-to-run noise)",
    )
    p.add_argument("--cases", type=int, default=12, help="--train-comparison: training phantoms (default 12)")
    p.add_argument("--labeled", type=int, default=2, help="--train-comparison: how many keep their labels (default 2)")
    p.add_argument("--iterations", type=int, default=300, help="--train-comparison: finetuning iterations of each method (default 300)")
    p.add_argument("--pretrain-iterations", type=int, default=200, help="--train-comparison: default 200")
    p.add_argument("--seed", type=int, default=0, help="--train-comparison: default 0")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo's results in --out")
    p.set_defaults(func=cmd_demo)
