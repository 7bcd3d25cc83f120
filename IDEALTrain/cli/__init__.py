"""The ``idealtrain`` command line. Command names and flags are a contract that scripts rely on."""
from __future__ import annotations

import argparse
import signal
import sys

from ..errors import IdealError, TrainingStopped
from . import bundle, data, demo, refine, refiner, segment, train

TRAINING_COMMANDS = ("train", "pretrain", "finetune")


def build_parser() -> argparse.ArgumentParser:
    """The whole parser: one sub-command per task, each registered by its module."""
    parser = argparse.ArgumentParser(prog="idealtrain", description="IDEAL cardiac MRI segmentation: data, training, inference, metrics.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data.add_parsers(commands)
    segment.add_segment_parsers(commands)
    train.add_parsers(commands)
    segment.add_score_parser(commands)
    segment.add_measure_parser(commands)
    refine.add_parsers(commands)
    refiner.add_parsers(commands)
    bundle.add_parsers(commands)
    demo.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; user errors print one line and exit 2, a stopped training run exits 3, and
    SIGTERM stops any other command as Ctrl-C does: its unfinished outputs are removed (exit 128 + signal)."""
    from ..io.output_guard import exit_status, sigterm_as_interrupt

    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_interrupt():
            args.func(args)
            if args.command in TRAINING_COMMANDS:
                from ..training.distributed import finish_distributed

                finish_distributed()
    except IdealError as error:
        print(f"idealtrain: error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        print(f"idealtrain: {stopped}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as interruption:
        status = exit_status(interruption)
        print(f"idealtrain: interrupted ({signal.Signals(status - 128).name}); unfinished outputs were removed", file=sys.stderr)
        return status
    return 0
