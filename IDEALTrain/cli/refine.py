"""``idealtrain refine``: click to fix a draft label map (the command line contract outside scripts rely on)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..io.output_guard import OutputSet
from .common import DEVICE_HELP, MODEL_HELP


def cmd_refine(args: argparse.Namespace) -> None:
    """Refine ``--draft`` with ``--clicks`` and write the labels on exactly the input's grid."""
    from ..inference.clicks import in_lps, read_clicks
    from ..inference.refine import Refiner, check_refinement_inputs
    from ..io.volume_files import check_output_type, read_image, read_label, write_image
    from ..model.registry import resolve_model

    check_output_type(args.output)
    args.model = str(resolve_model(args.model))  # a path, an installed model's id, or the default model
    inputs = [args.input, args.draft, args.clicks, args.model, args.refinement]
    with OutputSet([args.output], args.overwrite, "choose another --output or pass --overwrite", inputs=inputs) as run:
        image = read_image(args.input, args.frame, all_frames=False)  # refine has no --all-frames to suggest
        draft = read_label(args.draft)
        clicks = in_lps(read_clicks(args.clicks), image)
        refiner = _refiner(Refiner, args)
        check_refinement_inputs(image, draft, clicks, refiner.labels)  # refuse bad input before the network runs
        result = refiner.refine(image, draft, clicks)
        write_image(result.labels, run.staged(args.output), refiner.predictor.bundle.labels)
    message = {
        "event": "refined",
        "labels": str(args.output),
        "clicks": len(clicks),
        "engine": refiner.engine,
        "changed_voxels": result.changed_voxels,
        "seconds": round(result.seconds, 3),
    }
    print(
        json.dumps(message)
        if args.progress_json
        else f"refined {args.draft} with {len(clicks)} click(s) ({refiner.engine} engine) -> {args.output}: "
        f"{result.changed_voxels} voxel(s) changed in {result.seconds:.2f} s",
        flush=True,
    )


_last: dict = {}


def _refiner(refiner_class: type, args: argparse.Namespace):
    """The refiner of the previous call when the model's and refinement network's verified contents, device and
    engine match: in the warm worker (``IDEALTrain.worker``) the next click on the same image then reuses the
    network's prior, and a bundle replaced or damaged in place is reloaded or refused, never used from memory."""
    from ..model.card import bundle_fingerprint

    model = Path(args.model).absolute()
    refinement = bundle_fingerprint(args.refinement) if args.refinement else None
    fingerprint = bundle_fingerprint(model, companion=args.engine in ("auto", "guided") and not args.refinement)
    key = (str(model), fingerprint, args.device, args.engine, args.radius_mm, args.refinement, refinement)
    if _last.get("key") != key:
        _last.clear()
        refiner = refiner_class(
            args.model, device=args.device, engine=args.engine, radius_mm=args.radius_mm, refinement=args.refinement
        )
        _last.update(key=key, refiner=refiner)
    return _last["refiner"]


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Register ``refine``."""
    from ..inference.refine import DEFAULT_ENGINE, DEFAULT_RADIUS_MM, ENGINE_CHOICES

    p = commands.add_parser("refine", help="refine a draft segmentation with positive / negative clicks")
    p.add_argument("--model", help="the model that made or fits the draft: " + MODEL_HELP)
    p.add_argument("--input", required=True, help="the image (volume file or DICOM folder)")
    p.add_argument("--frame", type=int, help="frame of a cine/4D input (0-based)")
    p.add_argument("--draft", required=True, help="current label map on the image's grid")
    p.add_argument(
        "--clicks",
        required=True,
        help='JSON {"clicks": [{"point": [x, y, z], "label": 1|2|3, "positive": true|false}, ...]}; points in LPS mm, '
        'or with "space": "ras" (RAS mm) or "ijk" (voxel indices i, j, k from 0) in the document or a click',
    )
    p.add_argument("--output", required=True, help="refined labels (.nii.gz, .nrrd or .seg.nrrd)")
    p.add_argument(
        "--engine",
        default=DEFAULT_ENGINE,
        choices=ENGINE_CHOICES,
        help="refinement engine; auto: the model's click-conditioned network (guided) when its folder has "
        "refinement/, else levelset",
    )
    p.add_argument("--refinement", help="guided: a refinement bundle (default: the model folder's refinement/)")
    p.add_argument("--radius-mm", type=float, default=DEFAULT_RADIUS_MM, help="in-plane reach of a click (mm)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--progress-json", action="store_true", help="one JSON line on stdout when done")
    p.set_defaults(func=cmd_refine)
