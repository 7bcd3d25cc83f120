"""``idealtrain segment|score|evaluate``: inference and metrics."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import IdealError
from ..io.atomic import check_outputs
from ..io.output_guard import OutputSet
from .common import DEVICE_HELP, write_json


def cmd_segment(args: argparse.Namespace) -> None:
    """Segment one volume (or every frame of a cine) with a bundle; all outputs are committed together."""
    from ..inference.predictor import Predictor
    from ..io.volume_files import check_output_type, frame_path, read_frames, read_image, write_image

    output = Path(args.output) if args.output else Path(Path(args.input).name.split(".")[0] + ".seg.nrrd")
    if args.all_frames:
        frames = list(enumerate(read_frames(args.input, args.series)))
        targets = [(frame_path(output, n), image) for n, image in frames]
    else:
        targets = [(output, read_image(args.input, args.frame, args.series))]
    outputs = [path for path, _ in targets]
    if args.uncertainty:
        outputs += [frame_path(Path(args.uncertainty), n) if args.all_frames else Path(args.uncertainty) for n in range(len(targets))]
    for path in outputs:
        check_output_type(path)
    messages = []
    hint = "choose another --output or pass --overwrite"
    with OutputSet(outputs, args.overwrite, hint, inputs=[args.input, args.model]) as run:
        predictor = Predictor(args.model, device=args.device)
        for index, (path, image) in enumerate(targets):
            prediction = predictor.predict(image, _slice_progress(args, index, len(targets)))
            write_image(prediction.labels, run.staged(path), predictor.bundle.labels)
            source = f"{args.input} frame {index}" if args.all_frames else args.input
            message = f"segmented {source} -> {path} on {prediction.device} in {prediction.seconds:.2f} s"
            uncertainty_path = None
            if args.uncertainty and prediction.uncertainty is not None:
                uncertainty_path = frame_path(Path(args.uncertainty), index) if args.all_frames else Path(args.uncertainty)
                write_image(prediction.uncertainty, run.staged(uncertainty_path))
                message += f"; uncertainty -> {uncertainty_path}"
            if args.progress_json:
                message = json.dumps({
                    "event": "segmented", "index": index, "total": len(targets), "labels": str(path), "device": prediction.device,
                    "seconds": prediction.seconds, "uncertainty": str(uncertainty_path) if uncertainty_path else None,
                })
            messages.append(message)
    for message in messages:  # once every file is in place
        print(message, flush=True)


def _slice_progress(args: argparse.Namespace, index: int, total: int):
    """A predictor progress callback printing JSON progress lines (``--progress-json``), else None."""
    if not args.progress_json:
        return None

    def report(done: int, slices: int) -> None:
        fraction = (index + done / max(slices, 1)) / total
        print(json.dumps({"event": "progress", "fraction": round(fraction, 4), "item": index, "total": total}), flush=True)

    return report


def cmd_score(args: argparse.Namespace) -> None:
    """Print per-class Dice, HD95 and ASD of a label file against a reference."""
    import numpy as np

    from ..evaluation.metrics import CLASS_NAMES, score
    from ..io.volume_files import read_label

    pred, ref = read_label(args.pred), read_label(args.ref)
    known = {0, *CLASS_NAMES}
    for path, image in ((args.pred, pred), (args.ref, ref)):
        unknown = sorted(set(np.unique(image.array).tolist()) - known)
        if unknown:
            raise IdealError(f"{path}: holds values {unknown[:5]} outside the label map {sorted(known)}: is it an intensity image?")
    print(json.dumps(score(pred, ref), indent=2))


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Segment a labelled dataset with a bundle and write the scores as JSON."""
    from ..evaluation.metrics import mean_scores, score
    from ..inference.predictor import Predictor
    from ..io.datasets import load_cases
    from ..io.volume_files import write_image

    check_outputs([args.out], args.overwrite, hint="choose another --out or pass --overwrite")
    predictor = Predictor(args.model, device=args.device)
    names = {label.value: label.segment_id for label in predictor.bundle.labels}
    cases = load_cases(args.data, default_list="val.list", require_labels=True)
    per_case = {}
    labels_dir = Path(args.save_labels) if args.save_labels else None
    for number, case in enumerate(cases):
        labels = predictor.predict(case.image).labels
        per_case[case.name] = score(labels, case.label, names)
        if labels_dir is not None:
            write_image(labels, labels_dir / f"{case.name}.nrrd")
        print(f"{case.name}: mean Dice {per_case[case.name]['mean']['dice']:.4f}", file=sys.stderr)
        if args.progress_json:
            print(json.dumps({"event": "progress", "fraction": round((number + 1) / len(cases), 4), "item": number, "total": len(cases)}), flush=True)
    results = {"model": args.model, "data": args.data, "cases": per_case, "mean": mean_scores(list(per_case.values()))}
    write_json(results, Path(args.out))
    print(json.dumps({"event": "done", "results": str(args.out)}) if args.progress_json else json.dumps(results["mean"], indent=2))


def add_segment_parsers(commands: argparse._SubParsersAction) -> None:
    """Register segment and evaluate."""
    p = commands.add_parser("segment", help="segment a volume file or DICOM folder")
    p.add_argument("--model", required=True, help="model bundle (folder or .zip)")
    p.add_argument("--input", required=True, help="volume file (.nii.gz, .nrrd, .mha) or DICOM folder")
    p.add_argument("--output", help="label output (.nii.gz, .nrrd or .seg.nrrd; default INPUT.seg.nrrd here)")
    p.add_argument("--uncertainty", help="also write the decoder-disagreement map (0-1) here")
    p.add_argument("--series", help="DICOM SeriesInstanceUID when the folder holds several series")
    frame = p.add_mutually_exclusive_group()
    frame.add_argument("--frame", type=int, help="frame of a cine/4D input (0-based)")
    frame.add_argument("--all-frames", action="store_true", help="segment every frame (outputs get _frameNN)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--progress-json", action="store_true", help="JSON lines on stdout (progress, one per segmented volume)")
    p.set_defaults(func=cmd_segment)

    p = commands.add_parser("evaluate", help="segment a labelled dataset and score it (Dice, HD95, ASD)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="folder:DIR, ssl4mis:DIR[:LIST] (default val.list) or sunnybrook:DIR")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--progress-json", action="store_true", help="JSON lines on stdout (progress per case, then done)")
    p.add_argument("--save-labels", help="also write each case's predicted labels to this folder as <case>.nrrd")
    p.set_defaults(func=cmd_evaluate)


def add_score_parser(commands: argparse._SubParsersAction) -> None:
    """Register score."""
    p = commands.add_parser("score", help="per-class Dice, HD95 and ASD of a label file against a reference")
    p.add_argument("--pred", required=True)
    p.add_argument("--ref", required=True)
    p.set_defaults(func=cmd_score)
