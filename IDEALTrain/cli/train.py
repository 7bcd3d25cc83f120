"""``idealtrain train|pretrain|finetune``: the training commands and their shared flags."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import IdealError
from ..model.card import REFINEMENT_FOLDER, companion_files
from .common import DEVICE_HELP, add_card_text_arguments, add_postprocessing_argument, postprocessing_from_args

DEFAULT_ID, DEFAULT_VERSION = "idealsegment-model", "0.1.0"


def _check_output(args: argparse.Namespace) -> Path:
    """Everything a run will write, checked before any data is read or any iteration run."""
    from ..io.atomic import check_outputs
    from ..training.checkpoint import check_checkpoint_dir

    if args.iterations < 1:
        raise IdealError(f"--iterations must be at least 1, got {args.iterations}")
    inputs = [getattr(args, name, None) for name in ("init_from", "pretrained", "provenance")]
    inputs += data_paths([getattr(args, name, None) for name in ("data", "labeled", "unlabeled", "val")])
    check_outputs([args.out], args.overwrite, hint="choose another --out or pass --overwrite", inputs=inputs, kind="bundle")
    if args.checkpoint_dir:
        check_checkpoint_dir(args.checkpoint_dir, args.resume)
    elif args.resume:
        raise IdealError("--resume needs --checkpoint-dir")
    return Path(args.out)


def data_paths(specs: list) -> list[str]:
    """The folders a data SPEC (``folder:DIR``, ``ssl4mis:DIR[:LIST]``, ``sunnybrook:DIR``, or a list of them) names:
    inputs an output must never replace."""
    paths = []
    for spec in specs:
        for one in spec if isinstance(spec, list) else [spec]:
            if one:
                rest = str(one).partition(":")[2] or str(one)
                paths += [rest, rest.rsplit(":", 1)[0]]
    return paths


def network_and_plan(args: argparse.Namespace, pretrained=None):
    """Architecture and preprocessing from the flags, defaulting to the starting bundle's: a
    pretrained encoder's width and depth, or a whole initial model's architecture (which is fixed)."""
    from ..model.networks import NetworkConfig
    from ..model.preprocessing import Preprocessing

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


def _save_trained(
    bundle, args: argparse.Namespace, output: Path, data: dict, companions_from: Path | None = None, files_from: str | None = None
) -> None:
    from ..model.bundle import save_bundle

    if bundle is None:  # not rank 0 of a multi-process run
        return
    bundle.model_id, bundle.version = args.id, args.version
    bundle.licence, bundle.description = args.licence, args.description
    bundle.training.update(data)
    save_bundle(bundle, output, half_precision=getattr(args, "half", False), overwrite=args.overwrite,
                companions_from=companions_from, files_from=files_from)
    print(json.dumps({"event": "done", "bundle": str(output)}) if args.progress_json else f"wrote model bundle {output}")


def _train_config(args: argparse.Namespace, pretrained=None, **method):
    from ..training.finetune import TrainConfig

    network, plan = network_and_plan(args, pretrained)
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
        postprocessing=postprocessing_from_args(args, pretrained),
        augmentation=augmentation_from_args(args, pretrained),
        precision=args.precision,
        **method,
    )


def augmentation_from_args(args: argparse.Namespace, start=None):
    """--rotation / --scale-range over the starting model's recorded augmentation (a whole model's), else the defaults."""
    import dataclasses

    from ..training.augment import Augmentation

    recorded = ((start.training or {}).get("recipe") or {}).get("augmentation") if start is not None and start.kind == "segmentation" else None
    names = {f.name for f in dataclasses.fields(Augmentation)}
    base = Augmentation(**{k: tuple(v) if isinstance(v, list) else v for k, v in (recorded or {}).items() if k in names})
    changes = {"rotation_degrees": args.rotation, "scale_range": tuple(args.scale_range) if args.scale_range else None}
    return dataclasses.replace(base, **{k: v for k, v in changes.items() if v is not None})


def carry_over_card(args: argparse.Namespace, initial) -> None:
    """A run from --init-from keeps the model's licence, description and float16 storage unless flags say otherwise."""
    from ..model.bundle import read_card

    if initial is None:
        return
    if args.licence == "unspecified":
        args.licence = initial.licence
    if not args.description:
        args.description = initial.description
    if not args.half and read_card(args.init_from).get("weights", {}).get("dtype") == "float16":
        args.half = True


def carried_refinement(init_from: str | None, output: Path) -> Path | None:
    """The --init-from model folder when its refinement network is to come along (a folder output): a retrained
    model keeps click-to-fix's network (trained on the old model's drafts, it still corrects the new one's better
    than levelset). Verified before training starts, so a broken or unsafe one fails now, not after the run."""
    from ..model.card import REFINEMENT_FOLDER, verify_companion

    if not init_from or not Path(init_from).is_dir() or Path(output).suffix.lower() == ".zip":
        return None
    try:
        found = verify_companion(init_from)
    except IdealError as error:
        raise IdealError(f"{error} (or remove {Path(init_from) / REFINEMENT_FOLDER} to retrain without it)") from None
    return Path(init_from) if found is not None else None


def retrained_identity(args: argparse.Namespace, initial) -> None:
    """A model retrained from --init-from is a new version of it, with its own description: unless --id / --version /
    --description are given, the old id, the next patch version, and a description saying what it was retrained from."""
    if initial is None:
        return
    if args.id == DEFAULT_ID:
        args.id = initial.model_id
    if args.version == DEFAULT_VERSION:
        from ..model.registry import next_patch_version

        args.version = next_patch_version(str(initial.version))
    if args.description == initial.description:  # carried over, not given: say what this model is
        what = f"--preset {args.preset} " if getattr(args, "preset", None) else ""
        args.description = (
            f"Retrained from {initial.model_id} {initial.version} on {args.labeled} ({what}idealtrain finetune --init-from); "
            f"the model it started from: {initial.description}"
        )


def _corrections_folder(spec: str) -> Path | None:
    """The folder of a ``folder:DIR`` spec that is a corrections data set (export-corrections, Mark reviewed), else None."""
    from ..io.corrections import is_corrections_dataset
    from ..io.datasets import parse_spec

    kind, path, _ = parse_spec(spec)
    return path if kind == "folder" and is_corrections_dataset(path) else None


def _provenance(path: str | None) -> dict:
    """The --provenance JSON (e.g. the corrections a retraining learnt from), recorded in the card."""
    if not path:
        return {}
    try:
        return {"corrections": json.loads(Path(path).read_text(encoding="utf-8"))}
    except (OSError, ValueError) as error:
        raise IdealError(f"cannot read --provenance {path}: {error}") from None


def _run_options(args: argparse.Namespace) -> dict:
    from ..io.datasets import load_cases

    val_cases = load_cases(args.val, default_list="val.list", require_labels=True) if args.val else None
    return dict(val_cases=val_cases, device=args.device, checkpoint_dir=args.checkpoint_dir, resume=args.resume, progress_json=args.progress_json)


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
        distill_weight=args.distill,
        frozen_levels=args.frozen_levels,
        crop_size=args.crop,
        frozen_norm=args.frozen_norm,
        keep_old=args.keep_old,
        pretrained_rescale=args.pretrained_rescale,
        stream_perturbation=args.stream_perturbation,
        perturbation_strength=args.perturbation_strength,
    )


def cmd_train(args: argparse.Namespace) -> None:
    """Supervised training on labelled slices."""
    from ..io.datasets import load_cases
    from ..training.finetune import train_segmentation

    output = _check_output(args)
    config = _train_config(args, supervised_only=True)
    train_cases = load_cases(args.data, default_list="train_slices.list", require_labels=True)
    bundle = train_segmentation(train_cases, config, **_run_options(args))
    _save_trained(bundle, args, output, {"data": args.data, "validation_data": args.val})


def cmd_finetune(args: argparse.Namespace) -> None:
    """IDEAL two-stream finetuning (or the supervised-only baseline)."""
    from ..model.bundle import load_bundle
    from ..model.registry import resolve_model
    from ..training.finetune import train_segmentation
    from ..training.selection import select_training_cases, selection_from_args

    if args.init_from:  # a bundle path or an installed model's id, as --model takes
        args.init_from = str(resolve_model(args.init_from, flag="--init-from"))
    output = _check_output(args)
    if args.pretrained and args.init_from:
        raise IdealError("--pretrained and --init-from both say where the network starts: choose one")
    pretrained = load_bundle(args.pretrained) if args.pretrained else None
    if pretrained is not None and pretrained.kind != "pretrained-encoder":
        raise IdealError(f"{args.pretrained} is a {pretrained.kind} bundle; --pretrained takes the output of idealtrain pretrain (for a whole model use --init-from)")
    initial = load_bundle(args.init_from) if args.init_from else None
    if initial is not None and initial.kind != "segmentation":
        raise IdealError(f"{args.init_from} is a {initial.kind} bundle; --init-from takes a segmentation model (for an encoder use --pretrained)")
    companions_from = carried_refinement(args.init_from, output)
    if getattr(args, "preset", None) == "continue" and initial is None:
        raise IdealError("--preset continue continues a model: give it with --init-from BUNDLE (e.g. the shipped idealsegment-acdc bundle)")
    config = _train_config(args, pretrained or initial, **_finetune_options(args))
    carry_over_card(args, initial)
    retrained_identity(args, initial)
    selection = selection_from_args(args)
    corrections = _corrections_folder(args.labeled)
    if corrections is not None and args.unlabeled is None and not args.supervised_only and (corrections / "unlabeled" / "images").is_dir():
        args.unlabeled = f"folder:{corrections / 'unlabeled'}"  # the scans behind the reviewed cases (export-corrections)
    labeled, unlabeled = select_training_cases(
        args.labeled, args.unlabeled, selection, require_unlabeled=not args.supervised_only,
        keep_labeled=args.unlabeled_includes_labeled,
    )
    if corrections is not None:  # a corrections data set: learn only what was reviewed (structures and slices)
        from ..io.corrections import apply_reviewed

        labeled = apply_reviewed(labeled, corrections)
    bundle = train_segmentation(labeled, config, unlabeled=unlabeled, pretrained=pretrained, initial=initial, **_run_options(args))
    data = {"labeled_data": args.labeled, "unlabeled_data": args.unlabeled, "selection": selection.describe(), "validation_data": args.val}
    if initial is not None:
        data["retrained_from"] = {"id": initial.model_id, "version": initial.version, "bundle": str(args.init_from),
                                  "preset": getattr(args, "preset", None)}
    data.update(_provenance(args.provenance))
    if corrections is not None and "corrections" not in data:
        from ..io.corrections import LABELED, corrections_provenance, read_manifest

        data["corrections"] = corrections_provenance([e for e in read_manifest(corrections) if e["kind"] == LABELED])
    if companions_from is not None:
        data["refinement_network"] = f"carried over from {initial.model_id} {initial.version}"
    carried = sorted(companion_files(args.init_from)) + ([REFINEMENT_FOLDER] if companions_from is not None else [])
    if carried:
        data["carried_files"] = carried
    _save_trained(bundle, args, output, data, companions_from, files_from=args.init_from)


def cmd_pretrain(args: argparse.Namespace) -> None:
    """IDEAL dense contrastive pretraining of the encoder."""
    from ..io.datasets import load_cases
    from ..training.pretraining import PretrainConfig, pretrain

    output = _check_output(args)
    network, plan = network_and_plan(args)
    config = PretrainConfig(
        iterations=args.iterations, batch_size=args.batch_size, learning_rate=args.lr, temperature=args.temperature,
        samples_per_image=args.samples_per_image, negative_min_distance=args.negative_min_distance,
        same_image_negatives=args.same_image_negatives, key_momentum=args.key_momentum, queue_size=args.queue_size,
        dense_level=args.dense_level, global_weight=args.global_weight, frozen_levels=args.frozen_levels, seed=args.seed,
        checkpoint_every=args.checkpoint_every, network=network, preprocessing=plan, optimizer=args.optimizer,
        weight_decay=args.weight_decay, dropout=not args.no_dropout, key_eval=args.key_eval,
        extra_dense_levels=tuple(args.extra_dense_levels), positive_radius=args.positive_radius, precision=args.precision,
        decoder_blocks=args.decoder_blocks,
    )
    cases = [case for spec in args.data for case in load_cases(spec, default_list="train_slices.list")]
    bundle = pretrain(cases, config, device=args.device, checkpoint_dir=args.checkpoint_dir, resume=args.resume, progress_json=args.progress_json)
    _save_trained(bundle, args, output, {"data": args.data})


# -- flags -----------------------------------------------------------------------------------
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
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 autocast + channels-last, fp32, or auto: bf16 on CUDA and on CPUs with AVX-512 BF16/AMX (default)")
    p.add_argument("--lr", type=float, default=lr, help=f"initial learning rate, poly decay (default {lr})")
    p.add_argument("--inplane", choices=("size", "spacing"), help="resize slices to --size (default), or resample to --spacing mm")
    p.add_argument("--size", type=int, default=256, help="network in-plane size for --inplane size")
    p.add_argument("--spacing", type=float, default=1.4, help="in-plane mm for --inplane spacing")
    p.add_argument("--base-channels", type=int, help="encoder width (default 16, or the pretrained bundle's)")
    p.add_argument("--depth", type=int, help="encoder levels (default 5, or the pretrained bundle's)")
    p.add_argument("--half", action="store_true", help="store float16 weights in the bundle")
    p.add_argument("--id", default=DEFAULT_ID, help="model id written to the card (with --init-from: that model's id)")
    p.add_argument("--version", default=DEFAULT_VERSION, help="model version written to the card (with --init-from: its next patch version)")
    add_card_text_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out bundle")


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
    p.add_argument("--rotation", type=float, help="augmentation: largest in-plane rotation in degrees (default 20, or the --init-from model's)")
    p.add_argument(
        "--scale-range", type=float, nargs=2, metavar=("MIN", "MAX"),
        help="augmentation: zoom range, wider for fields of view unlike the training data (default 0.85 1.15, or the --init-from model's)",
    )
    add_postprocessing_argument(p)


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Register train, pretrain and finetune."""
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
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam",
                   help="adam (default), adamw (decoupled weight decay bounds the norms) or sgd (momentum 0.9; give a larger --lr)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--no-dropout", action="store_true", help="no dropout in either encoder while pretraining")
    p.add_argument("--key-eval", action="store_true", help="run the key encoder in eval mode (running batch-norm statistics)")
    p.add_argument("--extra-dense-levels", type=int, nargs="*", default=[], metavar="LEVEL",
                   help="more encoder levels for the dense loss, each with its own head (the loss is the mean over levels)")
    p.add_argument("--positive-radius", type=float, default=0.0,
                   help="same-image cells closer than this many feature cells are positives too (PixPro-style; 0: only the partner)")
    p.add_argument("--decoder-blocks", type=int, default=0, metavar="N",
                   help="decoder pretraining (Chaitanya et al.): the dense loss on the U-Net decoder after N blocks (2: quarter "
                        "resolution), whose weights finetuning loads with the encoder; give --same-image-negatives as they did (default 0: off)")
    p.set_defaults(func=cmd_pretrain)

    p = commands.add_parser("finetune", help="IDEAL two-stream consistency finetuning (or --supervised-only, the baseline)")
    p.add_argument("--labeled", required=True, help="labelled data SPEC (ssl4mis default list train_slices.list)")
    p.add_argument("--unlabeled", help="unlabelled data SPEC; cases also in the labelled set are left out")
    p.add_argument("--pretrained", help="pretrained-encoder bundle from idealtrain pretrain (default: random initialisation)")
    p.add_argument(
        "--init-from", metavar="BUNDLE",
        help="start from this segmentation model's encoder and decoders (a bundle folder or .zip, or an installed model's id such as "
        "idealsegment-acdc; a second training cycle, or retraining on new cases); "
        "its architecture and preprocessing are kept",
    )
    p.add_argument(
        "--preset", choices=("continue",),
        help="continue: the Slicer module's retraining plan (needs --init-from; --iterations 200 and the flags of "
        "IDEALTrain.training.presets.CONTINUE); flags given explicitly override it",
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
        "--distill", type=float, default=0.0, metavar="W",
        help="with --init-from: weight of distillation from that model wherever labels leave the class open "
        "(unreviewed structures and slices, unlabelled scans), against forgetting (default 0: off)",
    )
    p.add_argument("--frozen-levels", type=int, default=0, metavar="N", help="the finest N encoder levels do not learn (default 0)")
    p.add_argument("--crop", type=int, default=0, metavar="PX", help="train on random PX x PX crops of the slices (faster; default 0: whole slices)")
    p.add_argument("--frozen-norm", action="store_true", help="batch-norm statistics stay the starting model's (against forgetting)")
    p.add_argument(
        "--keep-old", type=float, default=0.0, metavar="F",
        help="with --init-from: the final weights are F x the starting model's + (1 - F) x the trained ones "
        "(weight-space ensembling, against forgetting; default 0: off)",
    )
    p.add_argument("--provenance", metavar="JSON", help="JSON file recorded in the card as training.corrections (what the model learnt from)")
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
    p.add_argument("--pretrained-rescale", action="store_true",
                   help="rescale each --pretrained conv filter to the norm of the run's own random filter (no random mix)")
    p.add_argument("--stream-perturbation", choices=("none", "dropout", "noise"), default="none",
                   help="perturb the encoder features anew before each decoder: channel dropout or multiplicative noise (default none)")
    p.add_argument("--perturbation-strength", type=float, default=0.5,
                   help="dropout probability, or the half-width of the uniform noise (default 0.5)")
    from ..training.selection import add_selection_arguments

    add_selection_arguments(p)
    _add_segmentation_arguments(p)
    p.set_defaults(func=cmd_finetune)
