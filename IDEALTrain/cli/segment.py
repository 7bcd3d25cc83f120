"""``idealtrain segment|score|evaluate``: inference and metrics."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import IdealError
from ..io.atomic import check_outputs
from ..io.output_guard import OutputSet
from .common import DEVICE_HELP, MODEL_HELP, write_json


def cmd_segment(args: argparse.Namespace) -> None:
    """Segment one volume, every frame of a cine or an ED/ES pair with a bundle; print the measurements of a cine or
    pair. All outputs (labels, uncertainty, table, report) are committed together."""
    from ..inference.predictor import Predictor
    from ..io.volume_files import check_output_type, read_frames, read_image, tagged_path, write_image
    from ..model.registry import resolve_model

    model = resolve_model(args.model)  # a mistyped model id is refused before any image is read
    inputs = args.input
    pair = len(inputs) == 2
    if len(inputs) > 2 or (pair and (args.frame is not None or args.all_frames)):
        raise IdealError("--input takes one volume, cine or DICOM folder, or two volumes (an ED/ES pair, ED first); "
                         "--frame and --all-frames are for one cine")
    dicom_seg = _wants_dicom_seg(args)
    default_suffix = ".dcm" if dicom_seg else ".seg.nrrd"
    output = Path(args.output) if args.output else Path(Path(inputs[0]).name.split(".")[0] + default_suffix)
    frame_numbers: list[int | None]
    if pair:
        images = [read_image(path, None, args.series) for path in inputs]
        tags = ["ED", "ES"]
        frame_numbers = [None, None]
    elif args.all_frames:
        images = read_frames(inputs[0], args.series)
        tags = [f"frame{n:02d}" for n in range(len(images))]
        frame_numbers = list(range(len(images)))
    else:
        images = [read_image(inputs[0], args.frame, args.series)]
        tags = [None]
        frame_numbers = [args.frame]

    def named(path: Path, index: int) -> Path:
        return path if tags[index] is None else tagged_path(path, tags[index])

    targets = [(named(output, n), image) for n, image in enumerate(images)]
    measured = pair or len(targets) > 1
    if (args.table or args.report) and not measured:
        raise IdealError("--table and --report need a cine (--all-frames) or an ED/ES pair (--input ED ES)")
    outputs = [path for path, _ in targets]
    if args.uncertainty:
        outputs += [named(Path(args.uncertainty), n) for n in range(len(targets))]
    for path in outputs:
        if not (dicom_seg and path in [p for p, _ in targets]):
            check_output_type(path)
    for path, suffixes in ((args.table, (".csv", ".json")), (args.report, (".png", ".pdf"))):
        if path and Path(path).suffix.lower() not in suffixes:
            raise IdealError(f"{path}: write it as {' or '.join(suffixes)}")
    outputs += [Path(p) for p in (args.table, args.report) if p]
    sources = _dicom_seg_sources(args, inputs, frame_numbers) if dicom_seg else []
    messages = []
    hint = "choose another --output or pass --overwrite"
    with OutputSet(outputs, args.overwrite, hint, inputs=[*inputs, str(model)]) as run:
        predictor = Predictor(model, device=args.device)
        bundle = predictor.bundle
        labels, uncertainties = [], []
        for index, (path, image) in enumerate(targets):
            prediction = predictor.predict(image, _slice_progress(args, index, len(targets)))
            if dicom_seg:
                from ..io.dicom_seg import write_dicom_seg

                write_dicom_seg(prediction.labels, sources[index], run.staged(path), bundle.labels,
                                algorithm=(bundle.model_id, bundle.version))
            else:
                write_image(prediction.labels, run.staged(path), bundle.labels)
            labels.append(prediction.labels)
            uncertainties.append(prediction.uncertainty)
            source = inputs[index] if pair else f"{inputs[0]} frame {index}" if args.all_frames else inputs[0]
            message = f"segmented {source} -> {path} on {prediction.device} in {prediction.seconds:.2f} s"
            uncertainty_path = None
            if args.uncertainty and prediction.uncertainty is not None:
                uncertainty_path = named(Path(args.uncertainty), index)
                write_image(prediction.uncertainty, run.staged(uncertainty_path))
                message += f"; uncertainty -> {uncertainty_path}"
            if args.progress_json:
                message = json.dumps({
                    "event": "segmented", "index": index, "total": len(targets), "labels": str(path), "device": prediction.device,
                    "seconds": prediction.seconds, "uncertainty": str(uncertainty_path) if uncertainty_path else None,
                })
            messages.append(message)
        if measured:
            messages += _measurements(args, images, labels, uncertainties, pair, " ".join(inputs), run.staged)
    for message in messages:  # once every file is in place
        print(message, file=sys.stderr if message.startswith("idealtrain: ") else sys.stdout, flush=True)


def cmd_measure(args: argparse.Namespace) -> None:
    """Measure label maps (a cine's frames or an ED/ES pair), print the table and write it (and a report)."""
    from ..io.volume_files import read_cine_file, read_frames, read_label

    if args.image is None and args.report:
        raise IdealError("--report draws the labels over their image: give it with --image")
    labels = read_cine_file(args.labels[0]) if len(args.labels) == 1 else None
    if labels is None:
        if len(args.labels) == 1:
            raise IdealError(f"{args.labels[0]}: is one volume; measuring needs a cine's label frames (several files or a "
                             "4D/.seq.nrrd file) or an ED/ES pair (two files, ED first)")
        labels = [read_label(path) for path in args.labels]
    else:
        labels = [label.with_array(label.array.astype("uint8")) for label in labels]
    images = None
    if args.image:
        images = read_frames(args.image[0], args.series) if len(args.image) == 1 else [read_frames(p)[0] for p in args.image]
        if len(images) != len(labels):
            raise IdealError(f"--image has {len(images)} frame(s) but --labels {len(labels)}: give the labels of every frame")
        for n, (image, label) in enumerate(zip(images, labels)):
            if not image.same_grid(label, tolerance=1e-3):
                raise IdealError(f"label frame {n} is not on its image's voxel grid (size {label.size} vs {image.size}, or "
                                 "spacing/origin/direction differ): give the labels made on this image")
    outputs = [Path(p) for p in (args.out, args.report) if p]
    for path, suffixes in ((args.out, (".csv", ".json")), (args.report, (".png", ".pdf"))):
        if path and Path(path).suffix.lower() not in suffixes:
            raise IdealError(f"{path}: write it as {' or '.join(suffixes)}")
    from ..evaluation.function import measure_function
    from ..evaluation.table import format_table, write_table

    ed, es = args.ed, args.es
    for name, value in (("--ed", ed), ("--es", es)):
        if value is not None and not 0 <= value < len(labels):
            raise IdealError(f"{name} {value} is out of range: there are {len(labels)} label frames (0-{len(labels) - 1})")
    title = " ".join(args.labels) if len(args.labels) <= 2 else f"{args.labels[0]} ... ({len(args.labels)} frames)"
    hint = "choose another --out/--report or pass --overwrite"
    with OutputSet(outputs, args.overwrite, hint, inputs=[*args.labels, *(args.image or [])]) as run:
        report = measure_function(labels, None, ed=ed, es=es)
        if args.out:
            write_table(report, run.staged(args.out), source=title)
        if args.report:
            from ..evaluation.case_report import write_case_report

            ed_frame, es_frame = _phases(report, False)
            write_case_report(images, labels, report, run.staged(args.report), ed=ed_frame, es=es_frame, title=title)
    print(format_table(report, title=f"measurements of {title}:"), flush=True)
    for path in outputs:
        print(f"wrote {path}")


def _wants_dicom_seg(args: argparse.Namespace) -> bool:
    """DICOM SEG output: --format dicom-seg, or an --output ending in .dcm."""
    return args.format == "dicom-seg" or bool(args.output and str(args.output).lower().endswith(".dcm"))


def _dicom_seg_sources(args: argparse.Namespace, inputs: list[str], frames: list[int | None]) -> list[list[Path]]:
    """The source DICOM files of every output volume (stack order): a DICOM SEG references them."""
    from ..io.dicom_series import frame_files

    if not all(Path(path).is_dir() for path in inputs):
        raise IdealError("DICOM SEG output references the source DICOM images: give a DICOM folder as --input, "
                         "or write .seg.nrrd / NIfTI for a volume file")
    from ..io.dicom_seg import _highdicom, check_seg_sources

    _highdicom()  # installed? (before any segmenting)
    if len(inputs) == 2:
        sources = [frame_files(path, args.series, None) for path in inputs]
    else:
        sources = [frame_files(inputs[0], args.series, frame) for frame in frames]
    for files in sources:
        check_seg_sources(files)  # refused before the network runs
    return sources


def _measurements(args, images, labels, uncertainties, pair: bool, title: str, staged) -> list[str]:
    """The measurement table (with QC flags) of a cine or pair as lines to print; --table / --report written to
    ``staged(path)``. A measurement that cannot be made is one note line, unless a table or report was asked for."""
    from ..evaluation.function import measure_function
    from ..evaluation.table import format_table, write_table

    usable = uncertainties if all(u is not None for u in uncertainties) else None
    try:
        report = measure_function(labels, usable, ed=0 if pair else None, es=1 if pair else None)
    except IdealError as error:
        if args.table or args.report:
            raise
        return [f"idealtrain: no measurements: {error}"]  # the segmentations are written all the same
    if args.table:
        write_table(report, staged(args.table), source=title)
    if args.report:
        from ..evaluation.case_report import write_case_report

        ed, es = _phases(report, pair)
        write_case_report(images, labels, report, staged(args.report), ed=ed, es=es, title=title)
    if args.progress_json:
        return [json.dumps({"event": "measured", **report.to_json()})]
    return [format_table(report, title=f"measurements of {title}:")]


def _phases(report, pair: bool) -> tuple[int, int]:
    """(ED, ES) frame indices the measurement chose."""
    if pair:
        return 0, 1
    values = report.measurements
    ed, es = values.get("ed_frame", getattr(report, "ed", 0)), values.get("es_frame", getattr(report, "es", 0))
    return int(ed), int(es)


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

    from ..evaluation.metrics import CLASS_NAMES, score, score_table
    from ..io.volume_files import read_label

    pred, ref = read_label(args.pred), read_label(args.ref)
    known = {0, *CLASS_NAMES}
    for path, image in ((args.pred, pred), (args.ref, ref)):
        unknown = sorted(set(np.unique(image.array).tolist()) - known)
        if unknown:
            raise IdealError(f"{path}: holds values {unknown[:5]} outside the label map {sorted(known)}: is it an intensity image?")
    result = score(pred, ref)
    print(score_table(result), file=sys.stderr)
    print(json.dumps(result, indent=2))


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Segment a labelled dataset with a bundle and write the scores as JSON."""
    from ..evaluation.metrics import mean_scores, score, score_table
    from ..inference.predictor import Predictor
    from ..io.datasets import load_cases
    from ..io.volume_files import write_image

    check_outputs([args.out], args.overwrite, hint="choose another --out or pass --overwrite")
    from ..model.registry import resolve_model

    predictor = Predictor(resolve_model(args.model), device=args.device)
    names = {label.value: label.segment_id for label in predictor.bundle.labels}
    cases = load_cases(args.data, default_list="val.list", require_labels=True)
    per_case = {}
    labels_dir = Path(args.save_labels) if args.save_labels else None
    for number, case in enumerate(cases):
        labels = predictor.predict(case.image).labels
        per_case[case.name] = score(labels, case.label, names)
        if labels_dir is not None:
            write_image(labels, labels_dir / f"{case.name}.nrrd")
        mean_dice = per_case[case.name]["mean"]["dice"]
        print(f"{case.name}: mean Dice {'n/a' if mean_dice is None else f'{mean_dice:.4f}'}", file=sys.stderr)
        if args.progress_json:
            print(json.dumps({"event": "progress", "fraction": round((number + 1) / len(cases), 4), "item": number, "total": len(cases)}), flush=True)
    results = {"model": args.model, "data": args.data, "cases": per_case, "mean": mean_scores(list(per_case.values()))}
    write_json(results, Path(args.out))
    print(score_table(results["mean"]), file=sys.stderr)
    print(json.dumps({"event": "done", "results": str(args.out)}) if args.progress_json else json.dumps(results["mean"], indent=2))


def add_segment_parsers(commands: argparse._SubParsersAction) -> None:
    """Register segment and evaluate."""
    p = commands.add_parser("segment", help="segment a volume, cine or ED/ES pair; prints volumes, EF, mass and QC flags of a cine or pair")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument(
        "--input", required=True, nargs="+", metavar="PATH",
        help="volume file (.nii.gz, .nrrd, .mha), Slicer cine (.seq.nrrd) or DICOM folder; two of them: an ED/ES pair (ED first)",
    )
    p.add_argument(
        "--output", help="label output (.nii.gz, .nrrd, .seg.nrrd, or .dcm for DICOM SEG; default INPUT.seg.nrrd here); "
        "a pair's outputs get _ED/_ES, a cine's _frameNN",
    )
    p.add_argument("--format", choices=("auto", "dicom-seg"), default="auto",
                   help="dicom-seg: write DICOM Segmentation objects referencing the DICOM input (default: from --output's suffix)")
    p.add_argument("--table", help="also write the measurement table (.csv or .json) of a cine or pair")
    p.add_argument("--report", help="also draw a one-page report (.png or .pdf): overlays at base/mid/apex for ED and ES, "
                   "the volume curve, the table and the QC flags")
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
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, help="folder:DIR, ssl4mis:DIR[:LIST] (default val.list) or sunnybrook:DIR")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--progress-json", action="store_true", help="JSON lines on stdout (progress per case, then done)")
    p.add_argument("--save-labels", help="also write each case's predicted labels to this folder as <case>.nrrd")
    p.set_defaults(func=cmd_evaluate)


def add_measure_parser(commands: argparse._SubParsersAction) -> None:
    """Register measure."""
    p = commands.add_parser(
        "measure", help="volumes, EF, mass and QC flags from label maps (e.g. corrected ones) of a cine or an ED/ES pair",
        description="Measure label maps as segment does: LV/RV volumes, ejection fraction, myocardial mass and the QC "
        "flags. --labels: a cine's per-frame label files in frame order (e.g. out_frame*.seg.nrrd), a 4D label file, "
        "or two files: an ED/ES pair (ED first).",
    )
    p.add_argument("--labels", required=True, nargs="+", metavar="PATH", help="label maps (see above)")
    p.add_argument("--image", nargs="+", metavar="PATH",
                   help="their image (cine file, DICOM folder, or the ED and ES volumes): checks the grids, needed for --report")
    p.add_argument("--series", help="DICOM SeriesInstanceUID when the --image folder holds several series")
    p.add_argument("--ed", type=int, help="end-diastolic frame, 0-based in --labels order (default: chosen from the volumes)")
    p.add_argument("--es", type=int, help="end-systolic frame, 0-based in --labels order (default: chosen from the volumes)")
    p.add_argument("--out", help="write the table (.csv or .json)")
    p.add_argument("--report", help="draw a one-page report (.png or .pdf)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out / --report files")
    p.set_defaults(func=cmd_measure)


def add_score_parser(commands: argparse._SubParsersAction) -> None:
    """Register score."""
    p = commands.add_parser(
        "score", help="per-class Dice, HD95 and ASD of a label file against a reference",
        description="Per-class and mean Dice, HD95, ASD, ASSD and HD (mm from the spacing) of --pred against --ref, as JSON "
        "on stdout. Both are label maps on one grid (values 1 RV, 2 myocardium, 3 LV blood pool).",
    )
    p.add_argument("--pred", required=True, help="the label map to score (.nii.gz, .nrrd or .seg.nrrd)")
    p.add_argument("--ref", required=True, help="the reference label map on the same grid (e.g. an expert's)")
    p.set_defaults(func=cmd_score)
