"""The ``idealtrain`` command line. Command names and flags are a contract that scripts rely on."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import IdealError, TrainingStopped

DEVICE_HELP = "auto (CUDA when available, else CPU), cpu, cuda or cuda:N"


def _write_json(data: dict, path: Path) -> None:
    from .io.atomic import atomic_path

    with atomic_path(path) as temp:
        temp.write_text(json.dumps(data, indent=2))


def _frame_output(path: Path, frame: int) -> Path:
    """``out.seg.nrrd`` -> ``out_frame03.seg.nrrd``."""
    name = path.name
    stem = name.split(".")[0]
    return path.with_name(f"{stem}_frame{frame:02d}{name[len(stem):]}")


# -- commands --------------------------------------------------------------------------------
def cmd_phantom(args: argparse.Namespace) -> None:
    from .io.phantom import write_phantom_dataset

    paths = write_phantom_dataset(args.out, args.cases, args.seed, pairs=args.pairs)
    print(f"wrote {len(paths)} phantom volume(s) with labels to {args.out}/images and {args.out}/labels")


def cmd_segment(args: argparse.Namespace) -> None:
    from .inference.predictor import Predictor
    from .io.volume_files import read_frames, read_image, write_image

    output = Path(args.output) if args.output else Path(Path(args.input).name.split(".")[0] + ".seg.nrrd")
    if args.all_frames:
        frames = list(enumerate(read_frames(args.input, args.series)))
        targets = [(_frame_output(output, n), image) for n, image in frames]
    else:
        targets = [(output, read_image(args.input, args.frame, args.series))]
    outputs = [path for path, _ in targets]
    if args.uncertainty:
        outputs += [_frame_output(Path(args.uncertainty), n) if args.all_frames else Path(args.uncertainty) for n in range(len(targets))]
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not args.overwrite:
        raise IdealError(f"output already exists: {', '.join(existing)}; choose another --output or pass --overwrite")
    predictor = Predictor(args.model, device=args.device)
    for index, (path, image) in enumerate(targets):
        prediction = predictor.predict(image)
        write_image(prediction.labels, path, predictor.bundle.labels)
        source = f"{args.input} frame {index}" if args.all_frames else args.input
        message = f"segmented {source} -> {path} on {prediction.device} in {prediction.seconds:.2f} s"
        if args.uncertainty and prediction.uncertainty is not None:
            uncertainty_path = _frame_output(Path(args.uncertainty), index) if args.all_frames else Path(args.uncertainty)
            write_image(prediction.uncertainty, uncertainty_path)
            message += f"; uncertainty -> {uncertainty_path}"
        print(message)


def cmd_score(args: argparse.Namespace) -> None:
    from .evaluation.metrics import score
    from .io.volume_files import read_image

    pred, ref = read_image(args.pred), read_image(args.ref)
    print(json.dumps(score(pred, ref), indent=2))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .io.datasets import load_cases
    from .evaluation.metrics import mean_scores, score
    from .inference.predictor import Predictor

    predictor = Predictor(args.model, device=args.device)
    names = {label.value: label.segment_id for label in predictor.bundle.labels}
    cases = load_cases(args.data, default_list="val.list", require_labels=True)
    per_case = {}
    for case in cases:
        per_case[case.name] = score(predictor.predict(case.image).labels, case.label, names)
        print(f"{case.name}: mean Dice {per_case[case.name]['mean']['dice']:.4f}", file=sys.stderr)
    results = {"model": args.model, "data": args.data, "cases": per_case, "mean": mean_scores(list(per_case.values()))}
    _write_json(results, Path(args.out))
    print(json.dumps(results["mean"], indent=2))


def _check_output(args: argparse.Namespace) -> Path:
    output = Path(args.out)
    if output.exists() and not args.overwrite:
        raise IdealError(f"{output} already exists; choose another --out or pass --overwrite")
    return output


def _network_and_plan(args: argparse.Namespace, pretrained=None):
    """Architecture and preprocessing from the flags, defaulting to the starting bundle's: a
    pretrained encoder's width and depth, or a whole initial model's architecture (which is fixed)."""
    from .model.networks import NetworkConfig
    from .model.preprocessing import Preprocessing

    decoders = tuple(args.decoders.split(",")) if getattr(args, "decoders", None) else None
    if pretrained is not None and pretrained.kind == "segmentation":
        network = pretrained.network
        asked = {"base_channels": args.base_channels, "depth": args.depth, "decoders": decoders}
        for name, value in asked.items():
            if value is not None and value != getattr(network, name):
                raise IdealError(
                    f"model {pretrained.model_id} {pretrained.version} has another architecture ({name} {getattr(network, name)}, "
                    f"not {value}); a run that starts from a model keeps its architecture: leave out --{name.replace('_', '-')}"
                )
    else:
        base = pretrained.network if pretrained is not None else NetworkConfig()
        network = NetworkConfig(
            base_channels=args.base_channels or base.base_channels,
            depth=args.depth or base.depth,
            decoders=decoders or NetworkConfig().decoders,
        )
    if args.inplane is None and pretrained is not None:
        return network, pretrained.preprocessing
    plan = Preprocessing(inplane=args.inplane or "size", size=(args.size, args.size), spacing=(args.spacing, args.spacing))
    return network, plan


def _save_trained(bundle, args: argparse.Namespace, output: Path, data: dict) -> None:
    from .model.bundle import save_bundle

    if bundle is None:  # not rank 0 of a multi-process run
        return
    bundle.model_id, bundle.version = args.id, args.version
    bundle.licence, bundle.description = args.licence, args.description
    bundle.training.update(data)
    save_bundle(bundle, output, half_precision=getattr(args, "half", False), overwrite=args.overwrite)
    print(json.dumps({"event": "done", "bundle": str(output)}) if args.progress_json else f"wrote model bundle {output}")


def _postprocessing(args: argparse.Namespace, start=None):
    """--largest-component on/off, else the starting model's plan (off when starting from scratch or an encoder)."""
    from .model.postprocessing import Postprocessing

    if args.largest_component is not None:
        return Postprocessing(largest_heart_component=args.largest_component == "on")
    return start.postprocessing if start is not None and start.kind == "segmentation" else Postprocessing()


def _train_config(args: argparse.Namespace, pretrained=None, **method):
    from .training.augment import Augmentation
    from .training.finetune import TrainConfig

    network, plan = _network_and_plan(args, pretrained)
    return TrainConfig(
        iterations=args.iterations,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        validate_every=args.validate_every,
        keep=args.keep,
        network=network,
        preprocessing=plan,
        postprocessing=_postprocessing(args, pretrained),
        augmentation=Augmentation(rotation_degrees=args.rotation, scale_range=tuple(args.scale_range)),
        **method,
    )


def _run_options(args: argparse.Namespace) -> dict:
    from .io.datasets import load_cases

    val_cases = load_cases(args.val, default_list="val.list", require_labels=True) if args.val else None
    return dict(val_cases=val_cases, device=args.device, checkpoint_dir=args.checkpoint_dir, resume=args.resume, progress_json=args.progress_json)


def cmd_train(args: argparse.Namespace) -> None:
    from .io.datasets import load_cases
    from .training.finetune import train_segmentation

    output = _check_output(args)
    config = _train_config(args, supervised_only=True)
    train_cases = load_cases(args.data, default_list="train_slices.list", require_labels=True)
    bundle = train_segmentation(train_cases, config, **_run_options(args))
    _save_trained(bundle, args, output, {"data": args.data, "validation_data": args.val})


def cmd_finetune(args: argparse.Namespace) -> None:
    from .model.bundle import load_bundle
    from .training.selection import select_training_cases, selection_from_args
    from .training.finetune import train_segmentation

    output = _check_output(args)
    if args.pretrained and args.init_from:
        raise IdealError("--pretrained and --init-from both say where the network starts: choose one")
    pretrained = load_bundle(args.pretrained) if args.pretrained else None
    if pretrained is not None and pretrained.kind != "pretrained-encoder":
        raise IdealError(f"{args.pretrained} is a {pretrained.kind} bundle; --pretrained takes the output of idealtrain pretrain (for a whole model use --init-from)")
    initial = load_bundle(args.init_from) if args.init_from else None
    if initial is not None and initial.kind != "segmentation":
        raise IdealError(f"{args.init_from} is a {initial.kind} bundle; --init-from takes a segmentation model (for an encoder use --pretrained)")
    config = _train_config(args, pretrained or initial, **_finetune_options(args))
    selection = selection_from_args(args)
    labeled, unlabeled = select_training_cases(
        args.labeled, args.unlabeled, selection, require_unlabeled=not args.supervised_only,
        keep_labeled=args.unlabeled_includes_labeled,
    )
    bundle = train_segmentation(labeled, config, unlabeled=unlabeled, pretrained=pretrained, initial=initial, **_run_options(args))
    data = {"labeled_data": args.labeled, "unlabeled_data": args.unlabeled, "selection": selection.describe(), "validation_data": args.val}
    _save_trained(bundle, args, output, data)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from .io.datasets import load_cases
    from .training.pretraining import PretrainConfig, pretrain

    output = _check_output(args)
    network, plan = _network_and_plan(args)
    config = PretrainConfig(
        iterations=args.iterations, batch_size=args.batch_size, learning_rate=args.lr, temperature=args.temperature,
        samples_per_image=args.samples_per_image, negative_min_distance=args.negative_min_distance,
        same_image_negatives=args.same_image_negatives, key_momentum=args.key_momentum, queue_size=args.queue_size,
        dense_level=args.dense_level, global_weight=args.global_weight, frozen_levels=args.frozen_levels, seed=args.seed,
        checkpoint_every=args.checkpoint_every, network=network, preprocessing=plan,
    )
    cases = [case for spec in args.data for case in load_cases(spec, default_list="train_slices.list")]
    bundle = pretrain(cases, config, device=args.device, checkpoint_dir=args.checkpoint_dir, resume=args.resume, progress_json=args.progress_json)
    _save_trained(bundle, args, output, {"data": args.data})


def _finetune_options(args: argparse.Namespace) -> dict:
    return dict(
        supervised_only=args.supervised_only,
        unlabeled_batch_size=args.unlabeled_batch_size,
        consistency_weight=args.consistency_weight,
        ramp_up=args.ramp_up,
        confidence_threshold=args.confidence_threshold,
        ema_teacher=args.ema_teacher,
        ema_decay=args.ema_decay,
        encoder_lr_scale=args.encoder_lr_scale,
        encoder_warmup=args.encoder_warmup,
        pretrained_mix=args.pretrained_mix,
    )


def cmd_bundle_edit(args: argparse.Namespace) -> None:
    """Re-save a bundle with new card text, id, version, postprocessing or float16 weights; training record kept."""
    from .model.bundle import load_bundle, save_bundle
    from .model.postprocessing import Postprocessing

    bundle = load_bundle(args.bundle)
    for option, attribute in (("id", "model_id"), ("version", "version"), ("description", "description"), ("licence", "licence")):
        if getattr(args, option) is not None:
            setattr(bundle, attribute, getattr(args, option))
    if args.validation_json:
        bundle.validation = {**bundle.validation, "external": json.loads(Path(args.validation_json).read_text())}
    if args.largest_component is not None:
        bundle.postprocessing = _postprocessing(args)
        measured_with = Postprocessing.from_json(bundle.validation.get("postprocessing", {}))
        if bundle.validation.get("mean") and measured_with != bundle.postprocessing:
            print(f"note: the card's validation figures were measured with {measured_with}; re-measure them with idealtrain evaluate", file=sys.stderr)
    save_bundle(bundle, args.out, half_precision=args.half, overwrite=args.overwrite)
    print(f"wrote model bundle {args.out}")


def cmd_bundle_info(args: argparse.Namespace) -> None:
    from .model.bundle import load_bundle, read_card

    load_bundle(args.bundle)  # verifies checksum, label map and architecture first
    print(json.dumps(read_card(args.bundle), indent=2))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(
        Path(args.out), cases=args.cases, labeled=args.labeled, iterations=args.iterations,
        pretrain_iterations=args.pretrain_iterations, seed=args.seed, device=args.device,
    )


# -- parser ----------------------------------------------------------------------------------
def _add_run_arguments(p: argparse.ArgumentParser, *, batch_size: int, lr: float) -> None:
    """Flags every training command shares: budget, output, checkpoints, progress, model shape."""
    p.add_argument("--iterations", type=int, required=True)
    p.add_argument("--out", required=True, help="output bundle (folder, or .zip)")
    p.add_argument("--checkpoint-dir", help="where to keep the resumable training state")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint-dir")
    p.add_argument("--progress-json", action="store_true", help="JSON lines on stdout instead of a progress bar")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"slices per iteration (default {batch_size})")
    p.add_argument("--lr", type=float, default=lr, help=f"initial learning rate, poly decay (default {lr})")
    p.add_argument("--inplane", choices=("size", "spacing"), help="resize slices to --size (default), or resample to --spacing mm")
    p.add_argument("--size", type=int, default=256, help="network in-plane size for --inplane size")
    p.add_argument("--spacing", type=float, default=1.4, help="in-plane mm for --inplane spacing")
    p.add_argument("--base-channels", type=int, help="encoder width (default 16, or the pretrained bundle's)")
    p.add_argument("--depth", type=int, help="encoder levels (default 5, or the pretrained bundle's)")
    p.add_argument("--half", action="store_true", help="store float16 weights in the bundle")
    p.add_argument("--id", default="idealsegment-model", help="model id written to the card")
    p.add_argument("--version", default="0.1.0", help="model version written to the card")
    _add_card_text_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out bundle")


def _add_card_text_arguments(p: argparse.ArgumentParser, default: str | None = "") -> None:
    p.add_argument("--description", default=default, help="what the model is for and how it was made (card text)")
    p.add_argument(
        "--licence", default="unspecified" if default is not None else None,
        help="licence of the weights, e.g. CC-BY-NC-SA-4.0 when trained on ACDC",
    )


def _add_segmentation_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the commands that train a segmentation network (train, finetune)."""
    _add_run_arguments(p, batch_size=12, lr=0.01)
    p.add_argument("--val", help="validation volumes SPEC (ssl4mis default val.list); the best-scoring weights are kept")
    p.add_argument("--validate-every", type=int, default=200)
    p.add_argument(
        "--keep", choices=("best", "last"), default="best",
        help="with --val: keep the best-scoring weights (default), or the last ones and only report validation",
    )
    p.add_argument("--decoders", help="comma-separated decoder kinds (default unet,fpn)")
    p.add_argument("--rotation", type=float, default=20.0, help="augmentation: largest in-plane rotation in degrees (default 20)")
    p.add_argument(
        "--scale-range", type=float, nargs=2, default=(0.85, 1.15), metavar=("MIN", "MAX"),
        help="augmentation: zoom range, wider for fields of view unlike the training data (default 0.85 1.15)",
    )
    _add_postprocessing_argument(p)


def _add_postprocessing_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--largest-component", choices=("on", "off"),
        help="postprocessing kept in the bundle (and used for validation): keep only the largest connected "
        "component of the heart (default off, or the --init-from model's)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idealtrain", description="IDEAL cardiac MRI segmentation: data, training, inference, metrics.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("phantom", help="generate synthetic short-axis cardiac volumes with labels")
    p.add_argument("--out", required=True, help="output folder (gets images/ and labels/)")
    p.add_argument("--cases", type=int, default=10, help="number of phantoms (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", action="store_true", help="write an end-diastole/end-systole pair per case")
    p.set_defaults(func=cmd_phantom)

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
    p.set_defaults(func=cmd_segment)

    p = commands.add_parser("evaluate", help="segment a labelled dataset and score it (Dice, HD95, ASD)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="folder:DIR, ssl4mis:DIR[:LIST] (default val.list) or sunnybrook:DIR")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = commands.add_parser("train", help="supervised training (Dice + cross-entropy) on labelled slices")
    p.add_argument("--data", required=True, help="labelled data: folder:DIR, ssl4mis:DIR[:LIST] (default train_slices.list), sunnybrook:DIR")
    _add_segmentation_arguments(p)
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("pretrain", help="IDEAL dense contrastive pretraining of the encoder on unlabelled slices")
    p.add_argument("--data", required=True, action="append", help="unlabelled data SPEC (repeat for several sources; labels are ignored)")
    _add_run_arguments(p, batch_size=16, lr=1e-3)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--samples-per-image", type=int, default=64, help="pixels sampled per image for the dense loss")
    p.add_argument("--negative-min-distance", type=float, default=0.0,
                   help="same-image cells closer than this many feature cells are not negatives (0: every other cell is)")
    p.add_argument("--same-image-negatives", action="store_true",
                   help="negatives only from the query's own image, as Chaitanya et al.'s local loss (default: the whole batch)")
    p.add_argument("--queue-size", type=int, default=0, help="keys kept from earlier batches as extra negatives (0: none)")
    p.add_argument("--key-momentum", type=float, default=0.99, help="momentum of the key encoder's moving average")
    p.add_argument("--dense-level", type=int, default=-1, help="encoder level projected for the dense loss (-1: deepest)")
    p.add_argument("--global-weight", type=float, default=0.0, help="weight of the image-level InfoNCE term (0: off)")
    p.add_argument("--frozen-levels", type=int, default=0, metavar="N",
                   help="the finest N encoder levels keep their random start; only the deeper ones learn the contrastive task (default 0)")
    p.set_defaults(func=cmd_pretrain)

    p = commands.add_parser("finetune", help="IDEAL two-stream consistency finetuning (or --supervised-only, the baseline)")
    p.add_argument("--labeled", required=True, help="labelled data SPEC (ssl4mis default list train_slices.list)")
    p.add_argument("--unlabeled", help="unlabelled data SPEC; cases also in the labelled set are left out")
    p.add_argument("--pretrained", help="pretrained-encoder bundle from idealtrain pretrain (default: random initialisation)")
    p.add_argument(
        "--init-from", metavar="BUNDLE",
        help="start from this segmentation model's encoder and decoders (a second training cycle, or retraining on new cases); "
        "its architecture and preprocessing are kept",
    )
    p.add_argument("--supervised-only", action="store_true", help="the baseline: same network and code path, no unlabelled term")
    p.add_argument(
        "--unlabeled-includes-labeled", action="store_true",
        help="keep the labelled cases' images in the unlabelled set too (when every available scan is labelled)",
    )
    p.add_argument("--unlabeled-batch-size", type=int, default=12)
    p.add_argument("--consistency-weight", type=float, default=0.1, help="weight of the cross pseudo-label loss after ramp-up (default 0.1)")
    p.add_argument("--ramp-up", type=float, default=1.0, help="share of the iterations over which that weight ramps up, sigmoid (default 1.0)")
    p.add_argument("--confidence-threshold", type=float, default=0.0, help="ignore pseudo-label pixels less confident than this")
    p.add_argument("--ema-teacher", action="store_true", help="take pseudo-labels from an exponential moving average of the network")
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument(
        "--encoder-lr-scale", type=float, default=1.0,
        help="the shared encoder learns at this share of --lr (below 1 keeps more of a pretrained start; default 1)",
    )
    p.add_argument(
        "--encoder-warmup", type=int, default=0, metavar="N",
        help="keep the shared encoder frozen for the first N iterations, so the new decoders first learn to read a pretrained start (default 0)",
    )
    p.add_argument(
        "--pretrained-mix", type=float, default=1.0, metavar="W",
        help="start the encoder from W x the --pretrained encoder + (1 - W) x its own random weights "
        "(shrink and perturb; default 1: the pretrained encoder as it is)",
    )
    from .training.selection import add_selection_arguments

    add_selection_arguments(p)
    _add_segmentation_arguments(p)
    p.set_defaults(func=cmd_finetune)

    p = commands.add_parser("score", help="per-class Dice, HD95 and ASD of a label file against a reference")
    p.add_argument("--pred", required=True)
    p.add_argument("--ref", required=True)
    p.set_defaults(func=cmd_score)

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
    _add_card_text_arguments(edit, default=None)
    edit.add_argument("--validation-json", help="JSON file of external test results to add to the card under validation.external")
    edit.add_argument("--half", action="store_true", help="store float16 weights")
    _add_postprocessing_argument(edit)
    edit.add_argument("--overwrite", action="store_true", help="replace an existing --out bundle")
    edit.set_defaults(func=cmd_bundle_edit)

    p = commands.add_parser("demo", help="IDEAL vs supervised-only on phantoms with few labels: Dice table, bundle, overlays")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--cases", type=int, default=12, help="training phantoms (default 12)")
    p.add_argument("--labeled", type=int, default=2, help="how many of them keep their labels (default 2)")
    p.add_argument("--iterations", type=int, default=300, help="finetuning iterations of each method (default 300)")
    p.add_argument("--pretrain-iterations", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; user errors print one line and exit 2, a stopped training run exits 3."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
        if args.command in ("train", "pretrain", "finetune"):
            from .training.distributed import finish_distributed

            finish_distributed()
    except IdealError as error:
        print(f"idealtrain: error: {error}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        print(f"idealtrain: {stopped}", file=sys.stderr)
        return 3
    return 0
