"""``idealtrain phantom``: synthetic data."""
from __future__ import annotations

import argparse


def cmd_phantom(args: argparse.Namespace) -> None:
    """Write synthetic short-axis volumes with labels."""
    from ..io.phantom import write_phantom_dataset

    paths = write_phantom_dataset(args.out, args.cases, args.seed, pairs=args.pairs, overwrite=args.overwrite)
    print(f"wrote {len(paths)} phantom volume(s) with labels to {args.out}/images and {args.out}/labels")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Register the phantom command."""
    p = commands.add_parser("phantom", help="generate synthetic short-axis cardiac volumes with labels")
    p.add_argument("--out", required=True, help="output folder (gets images/ and labels/)")
    p.add_argument("--cases", type=int, default=10, help="number of phantoms (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", action="store_true", help="write an end-diastole/end-systole pair per case")
    p.add_argument("--overwrite", action="store_true", help="replace phantom files of the same names already in --out")
    p.set_defaults(func=cmd_phantom)
