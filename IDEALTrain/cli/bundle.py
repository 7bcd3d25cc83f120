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
    from ..model.bundle import load_bundle, read_card, save_bundle
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
    half = args.half or (not args.float32 and (read_card(args.bundle).get("weights") or {}).get("dtype") == "float16")
    save_bundle(bundle, args.out, half_precision=half, overwrite=args.overwrite, companions_from=companions_from)
    kept = "; kept its click-to-fix network" if companions_from else ""
    print(f"wrote model bundle {args.out} ({'float16' if half else 'float32'} weights{kept})")


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


def cmd_bundle_list(args: argparse.Namespace) -> None:
    """List the installed models (shipped and the user's), the default marked, broken bundles named."""
    from ..model.registry import ModelRegistry, default_entry

    registry = ModelRegistry(user_dir=Path(args.models_dir) if args.models_dir else None)
    entries = registry.entries()
    default = default_entry(entries)
    if args.json:
        print(json.dumps({
            "models": [{"id": e.model_id, "version": e.version, "source": e.source, "path": str(e.path),
                        "default": e == default, "description": e.card.get("description", "")} for e in entries],
            "problems": registry.problems,
        }, indent=2))
        return
    if not entries:
        print(f"no models installed (looked in {registry.shipped_dir} and {registry.user_dir})")
    for entry in entries:
        mark = "*" if entry == default else " "
        print(f"{mark} {entry.model_id:<24} {entry.version:<10} {entry.source:<8} {entry.path}")
        print(f"    {entry.training_summary}")
    if default is not None:
        print("* default: used when segment is given no --model; pass --model ID (or ID@VERSION) for another")
    for problem in registry.problems:
        print(f"problem: {problem}", file=sys.stderr)


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Register ``bundle list``, ``bundle info`` and ``bundle edit``."""
    p = commands.add_parser("bundle", help="model bundle tools")
    bundle_commands = p.add_subparsers(dest="bundle_command", required=True, metavar="ACTION")
    listing = bundle_commands.add_parser("list", help="the installed models (shipped and yours); * marks the default")
    listing.add_argument("--models-dir", help="your model folder (default: $IDEALSEGMENT_MODELS_DIR or the platform's user folder)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=cmd_bundle_list)
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
    precision = edit.add_mutually_exclusive_group()
    precision.add_argument("--half", action="store_true", help="store float16 weights (default: the source's precision)")
    precision.add_argument("--float32", action="store_true", help="store float32 weights (default: the source's precision)")
    add_postprocessing_argument(edit)
    edit.add_argument("--overwrite", action="store_true", help="replace an existing --out bundle")
    edit.set_defaults(func=cmd_bundle_edit)
