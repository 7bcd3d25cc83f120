"""Helpers and flags shared by several ``idealtrain`` commands."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N"
MODEL_HELP = "model bundle folder or .zip, or an installed model's id (e.g. idealsegment-acdc, or ID@VERSION; see idealtrain bundle list); default: the default model"


def write_json(data: dict, path: Path) -> None:
    """Write a JSON result file atomically, so a crash never leaves half a file."""
    from ..io.atomic import atomic_path

    with atomic_path(path) as temp:
        temp.write_text(json.dumps(data, indent=2))


def postprocessing_from_args(args: argparse.Namespace, start=None):
    """--largest-component on/off, else the starting model's plan (off when starting from scratch or an encoder)."""
    from ..model.postprocessing import Postprocessing

    if args.largest_component is not None:
        return Postprocessing(largest_heart_component=args.largest_component == "on")
    return start.postprocessing if start is not None and start.kind == "segmentation" else Postprocessing()


def add_card_text_arguments(p: argparse.ArgumentParser, default: str | None = "") -> None:
    """--description and --licence: the card text of a bundle being written."""
    p.add_argument("--description", default=default, help="what the model is for and how it was made (card text)")
    p.add_argument(
        "--licence", default="unspecified" if default is not None else None,
        help="licence of the weights, e.g. CC-BY-NC-SA-4.0 when trained on ACDC",
    )


def add_postprocessing_argument(p: argparse.ArgumentParser) -> None:
    """--largest-component: the postprocessing a written bundle keeps."""
    p.add_argument(
        "--largest-component", choices=("on", "off"),
        help="postprocessing kept in the bundle (and used for validation): keep only the largest connected "
        "component of the heart (default off, or the --init-from model's)",
    )
