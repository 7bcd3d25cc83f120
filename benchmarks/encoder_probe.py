"""Linear probe of pretrained encoders on ACDC: how much segmentation a frozen encoder's features
hold, against a randomly initialised encoder of the same architecture.

A linear per-pixel classifier (a 1x1 convolution, Adam, full batch) is trained on the frozen
features of the labelled slices of the SSL4MIS protocol (the first N patients of
``train_slices.list``) and scored on every slice of the ``val.list`` volumes: pixel Dice per class
at half the network size. Features are taken per encoder level and as a hypercolumn of every level
(each upsampled to half size, standardised on the training slices), after every encoder's
batch-norm statistics are re-estimated on the training slices. This is minutes on a CPU, against
tens of minutes for a finetuning run, and tells apart pretraining that learns nothing from
finetuning that cannot use what was learnt.

    python benchmarks/encoder_probe.py --encoders runs/acdc_ssl/pretrained --out benchmarks/results/encoder_probe_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.environ.get("IDEAL_DATA", "../shared/data"), "acdc"))
    parser.add_argument("--encoders", nargs="*", default=[], help="pretrained-encoder bundles (a random encoder is always probed too)")
    parser.add_argument("--labeled-patients", type=int, default=3)
    parser.add_argument("--size", type=int, default=128, help="network in-plane size")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps of the linear classifier")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random encoder and of the classifier")
    parser.add_argument("--sets", nargs="*", help="probe only these feature sets, e.g. level3 level4 hypercolumn (default: all)")
    parser.add_argument("--out", default="benchmarks/results/encoder_probe.json")
    return parser.parse_args(argv)


def level_sets(depth: int) -> dict[str, list[int]]:
    """The feature sets probed: each level alone, and all of them as a hypercolumn."""
    return {f"level{level}": [level] for level in range(depth)} | {"hypercolumn": list(range(depth))}


def features(encoder, images, levels: list[int], size: int):
    """Frozen features (N, C, size, size) of the chosen levels, each resized bilinearly to ``size``."""
    import torch
    import torch.nn.functional as F

    chunks = []
    with torch.no_grad():
        for start in range(0, len(images), 32):
            maps = encoder(images[start : start + 32])
            chunks.append(torch.cat([F.interpolate(maps[level], size=(size, size), mode="bilinear", align_corners=False) for level in levels], 1))
    return torch.cat(chunks)


def recalibrate_batch_norm(encoder, images) -> None:
    """Batch-norm statistics of ``encoder`` re-estimated on ``images``: a random encoder has none, and
    a pretrained one has those of augmented views, so every encoder is probed on the same footing."""
    import torch

    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches below
    encoder.eval()
    for norm in norms:
        norm.train()
    with torch.no_grad():
        for chunk in images.split(32):
            encoder(chunk)
    encoder.eval()


def probe(encoder, train: tuple, val: tuple, levels: list[int], steps: int, seed: int) -> dict:
    """Train a linear classifier on the frozen per-pixel features of ``train``; pixel Dice per class on ``val``."""
    import torch
    import torch.nn.functional as F

    from IDEALTrain.evaluation.metrics import CLASS_NAMES

    size = train[0].shape[-1] // 2

    def pixels(images) -> torch.Tensor:  # (pixels, channels): a matrix, so no step copies feature maps
        maps = features(encoder, images, levels, size)
        return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])

    x, y = pixels(train[0]), train[1][:, ::2, ::2].reshape(-1)
    mean, std = x.mean(0), x.std(0) + 1e-5
    x = (x - mean) / std
    torch.manual_seed(seed)
    classifier = torch.nn.Linear(x.shape[1], len(CLASS_NAMES) + 1)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(classifier(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():  # in chunks: the features of every val slice at once take gigabytes
        predicted = torch.cat([classifier((pixels(chunk) - mean) / std).argmax(1) for chunk in val[0].split(32)])
    truth = val[1][:, ::2, ::2].reshape(-1)
    dice = {name: float(2 * ((predicted == c) & (truth == c)).sum() / ((predicted == c).sum() + (truth == c).sum()))
            for c, name in CLASS_NAMES.items()}
    return {"train_loss": loss.item(), "dice": dice, "mean_dice": sum(dice.values()) / len(dice)}


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)

    import torch

    from IDEALTrain.io.datasets import load_cases
    from IDEALTrain.model.bundle import load_bundle
    from IDEALTrain.model.networks import NetworkConfig, SegmentationNetwork
    from IDEALTrain.model.preprocessing import Preprocessing
    from IDEALTrain.training.encoder_start import load_pretrained_encoder
    from IDEALTrain.training.selection import LabelSelection, select_training_cases
    from IDEALTrain.training.slices import network_slices

    data = Path(args.data)
    if not (data / "train_slices.list").is_file():
        raise SystemExit(f"ACDC (SSL4MIS layout) not found at {data}: set IDEAL_DATA or pass --data")
    config = NetworkConfig()
    if unknown := set(args.sets or ()) - set(level_sets(config.depth)):
        raise SystemExit(f"--sets: no feature set {', '.join(sorted(unknown))}; there are {', '.join(level_sets(config.depth))}")
    plan = Preprocessing(inplane="size", size=(args.size, args.size))
    labeled, _ = select_training_cases(f"ssl4mis:{data}", f"ssl4mis:{data}", LabelSelection(patients=args.labeled_patients), require_unlabeled=False)

    def slices(cases) -> tuple:
        images, labels = network_slices(cases, plan, config.size_multiple, with_labels=True)
        return torch.cat(images), torch.cat(labels).long()

    train, val = slices(labeled), slices(load_cases(f"ssl4mis:{data}:val.list", require_labels=True))
    report = {
        "protocol": f"linear probe: 1x1 conv on frozen encoder features of the first {args.labeled_patients} patients' slices; "
                    "pixel Dice on every val.list slice at half the network size",
        "budget": {"size": args.size, "steps": args.steps, "seed": args.seed, "train_slices": len(train[0]), "val_slices": len(val[0])},
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "encoders": {},
    }
    for name in ["random", *args.encoders]:
        torch.manual_seed(args.seed)
        network = SegmentationNetwork(config)
        if name != "random":
            pretrained = load_bundle(name)
            norms = load_pretrained_encoder(network, pretrained)
            recipe = pretrained.training.get("recipe", {})
            recorded = ("iterations", "dense_level", "global_weight", "samples_per_image", "negative_min_distance",
                        "same_image_negatives", "frozen_levels", "optimizer", "learning_rate", "dropout", "key_eval",
                        "extra_dense_levels", "positive_radius", "queue_size", "weight_decay")
            report["encoders"][name] = {"recipe": {k: recipe.get(k) for k in recorded}, "encoder_level_norms": norms}
        encoder = network.encoder
        recalibrate_batch_norm(encoder, train[0])
        results = {label: probe(encoder, train, val, levels, args.steps, args.seed) for label, levels in level_sets(config.depth).items()
                   if not args.sets or label in args.sets}
        report["encoders"].setdefault(name, {})["probes"] = results
        print(name, {label: round(r["mean_dice"], 3) for label, r in results.items()}, flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
