"""``idealtrain train-refiner``: train the click-conditioned correction network of a segmentation model.

The network learns from the model's own probabilities on labelled SSL4MIS training slices (never a
``val.list`` volume) with simulated clicks, and is written as a ``refinement`` bundle; saved as the model
folder's ``refinement/`` it becomes the default engine of ``idealtrain refine`` for that model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import IdealError
from .common import DEVICE_HELP

PRINT_EVERY = 50  # iterations between progress lines
PREPARE_PRINT_EVERY = 100  # cases between progress lines while the model's probabilities are computed


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _check_arguments(args: argparse.Namespace) -> Path:
    """Budget and output, checked before any model or data is read."""
    from ..io.atomic import check_outputs
    from ..training.refinement_training import check_training_budget

    check_training_budget(args.iterations, args.minutes, args.batch, args.lr)
    return check_outputs([args.out], args.overwrite, hint="choose another --out or pass --overwrite",
                         inputs=[args.model, args.start, args.data], kind="bundle")[0]


def _load(path: str, kind: str, flag: str):
    from ..model.bundle import load_bundle

    bundle = load_bundle(path)
    if bundle.kind != kind:
        raise IdealError(f"{path} is a {bundle.kind} bundle; {flag} takes a {kind} bundle")
    return bundle


def cmd_train_refiner(args: argparse.Namespace) -> None:
    """Prepare the model's probabilities, train, and write the refinement bundle."""
    from ..inference.predictor import Predictor
    from ..io.ssl4mis import list_cases
    from ..model.bundle import save_bundle
    from ..model.refinement_network import RefinementConfig
    from ..training.refinement_training import (
        prepare_refinement_data,
        refinement_bundle,
        refuse_validation_cases,
        train_refinement,
        training_summary,
    )

    output = _check_arguments(args)
    segmentation = _load(args.model, "segmentation", "--model")
    start = _load(args.start, "refinement", "--start") if args.start else None
    if start is not None and [label.value for label in start.labels] != [label.value for label in segmentation.labels]:
        raise IdealError(f"--start {args.start} was made for other labels than {segmentation.model_id}")
    config = start.network if start is not None else RefinementConfig(num_classes=segmentation.network.num_classes)
    if not args.single_slice:  # the shipped recipe; a single-slice --start is widened (it starts as it was)
        config = RefinementConfig(**{**config.to_json(), "adjacent_guidance": True})
    cases = list_cases(args.data, args.list)
    refuse_validation_cases(cases)
    predictor = Predictor(segmentation, args.device)
    _note(f"computing {segmentation.model_id} {segmentation.version} probabilities on {len(cases)} case(s)")

    def prepared(n: int, name: str) -> None:
        if n % PREPARE_PRINT_EVERY == 0 or n == len(cases):
            _note(f"prepared {n}/{len(cases)} ({name})")

    data = prepare_refinement_data(predictor, cases, progress=prepared)
    del predictor
    recent: list[float] = []

    def trained(iteration: int, loss: float) -> None:
        recent.append(loss)
        if iteration % PRINT_EVERY == 0 or iteration == args.iterations:
            _note(f"iteration {iteration}: loss {sum(recent) / len(recent):.4f}")
            recent.clear()

    budget = f"{args.iterations} iterations" if args.iterations is not None else f"{args.minutes} minutes"
    _note(f"training on {len(data['image'])} slices for {budget}")
    weights, log = train_refinement(
        data, config, iterations=args.iterations, minutes=args.minutes, batch=args.batch, lr=args.lr,
        seed=args.seed, start_weights=start.weights if start is not None else None, progress=trained,
        device=args.device,
    )
    training = training_summary(log) | {
        "data": str(args.data),
        "list": args.list,
        "minutes": args.minutes,
        "start": {"id": start.model_id, "version": start.version} if start is not None else None,
    }
    bundle = refinement_bundle(weights, segmentation, training, config)
    save_bundle(bundle, output, half_precision=True, overwrite=args.overwrite)
    print(f"wrote refinement bundle {args.out} ({log['iterations']} iterations, {log['seconds']:.0f} s)", flush=True)


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Register ``train-refiner``."""
    p = commands.add_parser(
        "train-refiner",
        help="train the click-conditioned correction network (guided refinement engine) of a segmentation model",
    )
    p.add_argument("--model", required=True, help="the segmentation model bundle (folder or .zip) whose drafts it corrects")
    p.add_argument("--data", required=True, help="SSL4MIS folder with labelled training slices (its val.list volumes are refused)")
    p.add_argument("--list", default="train_slices.list", help="case list in --data (default train_slices.list)")
    p.add_argument(
        "--out", required=True,
        help="output refinement bundle; save it as <model folder>/refinement for idealtrain refine to use it by default",
    )
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--iterations", type=int, help="training iterations (reproducible for a given --seed)")
    budget.add_argument("--minutes", type=float, help="training time budget in minutes (instead of --iterations)")
    p.add_argument("--batch", type=int, default=16, help="crops per iteration (default 16)")
    p.add_argument("--lr", type=float, default=2e-3, help="initial learning rate, cosine decay (default 2e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", metavar="REFINEMENT_BUNDLE", help="continue from this refinement bundle's weights")
    p.add_argument(
        "--single-slice",
        action="store_true",
        help="without adjacent-slice guidance (by default clicks also correct the slices next to them, as shipped)",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out bundle")
    p.set_defaults(func=cmd_train_refiner)
