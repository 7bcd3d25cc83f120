"""``idealtrain bundle info|edit``: inspect and re-save model bundles."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..io.atomic import check_outputs
from .common import add_card_text_arguments, add_postprocessing_argument, postprocessing_from_args


def cmd_bundle_edit(args: argparse.Namespace) -> None:
    """Re-save a bundle with new card text, id, version, postprocessing or float16 weights; training record kept."""
    from ..model.bundle import load_bundle, save_bundle
    from ..model.postprocessing import Postprocessing

    check_outputs([args.out], args.overwrite, hint="choose another --out or pass --overwrite", kind="bundle")
    bundle = load_bundle(args.bundle)
    for option, attribute in (("id", "model_id"), ("version", "version"), ("description", "description"), ("licence", "licence")):
        if getattr(args, option) is not None:
            setattr(bundle, attribute, getattr(args, option))
    if args.validation_json:
        bundle.validation = {**bundle.validation, "external": json.loads(Path(args.validation_json).read_text())}
    if args.largest_component is not None:
        bundle.postprocessing = postprocessing_from_args(args)
        measured_with = Postprocessing.from_json(bundle.validation.get("postprocessing", {}))
        if bundle.validation.get("mean") and measured_with != bundle.postprocessing:
            print(f"note: the card's validation figures were measured with {measured_with}; re-measure them with idealtrain evaluate", file=sys.stderr)
    companions_from = _carried_companion(args.bundle, args.out)
    save_bundle(bundle, args.out, half_precision=args.half, overwrite=args.overwrite, companions_from=companions_from)
    print(f"wrote model bundle {args.out}")


def _carried_companion(source: str, out: str) -> str | None:
    """The edited model's folder when its (verified) click-to-fix network comes along into a folder ``out``; a
    .zip cannot hold it, which is said on stderr rather than dropped silently."""
    from ..model.card import REFINEMENT_FOLDER, verify_companion

    if not Path(source).is_dir() or verify_companion(source) is None:
        return None
    if Path(out).suffix.lower() == ".zip":
        print(f"note: {out} is a .zip, which cannot hold {REFINEMENT_FOLDER}/: click to fix will use levelset", file=sys.stderr)
        return None
    return source


def cmd_bundle_info(args: argparse.Namespace) -> None:
    """Verify a bundle and its click-to-fix network (``refinement/``), then print its card."""
    from ..model.bundle import load_bundle, read_card
    from ..model.card import verify_companion

    load_bundle(args.bundle)  # verifies checksum, label map and architecture first
    verify_companion(args.bundle)  # a broken or unsafe refinement/ is named now, not at the first click
    print(json.dumps(read_card(args.bundle), indent=2))


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Register ``bundle info`` and ``bundle edit``."""
    p = commands.add_parser("bundle", help="model bundle tools")
    bundle_commands = p.add_subparsers(dest="bundle_command", required=True, metavar="ACTION")
    info = bundle_commands.add_parser("info", help="verify a bundle and print its card")
    info.add_argument("bundle")
    info.set_defaults(func=cmd_bundle_info)
    edit = bundle_commands.add_parser("edit", help="copy a bundle with a new id, version, card text, postprocessing or float16 weights")
    edit.add_argument("bundle")
    edit.add_argument("--out", required=True, help="the new bundle (folder or .zip)")
    edit.add_argument("--id")
    edit.add_argument("--version")
    add_card_text_arguments(edit, default=None)
    edit.add_argument("--validation-json", help="JSON file of external test results to add to the card under validation.external")
    edit.add_argument("--half", action="store_true", help="store float16 weights")
    add_postprocessing_argument(edit)
    edit.add_argument("--overwrite", action="store_true", help="replace an existing --out bundle")
    edit.set_defaults(func=cmd_bundle_edit)
