"""ACDC semi-supervised benchmark, SSL4MIS protocol: supervised-only vs finetuning without
pretraining vs full IDEAL (pretraining + two-stream finetuning), at the same iteration budget.

Labelled: the slices of the first 3 or 7 patients of ``train_slices.list`` (68 / 136 slices); the
other training slices are unlabelled; evaluated on the ``val.list`` volumes with 3D Dice, HD95 and
ASD per class (in voxels: SSL4MIS files carry no spacing), as the papers report them. The final
weights of every run are scored (no selection on val.list, which is also the report set here).
Results are written after every run, so an interrupted benchmark keeps what it finished.

    python benchmarks/acdc_ssl.py --data $IDEAL_DATA/acdc --iterations 30000 --size 256 \
        --batch-size 12 --unlabeled-batch-size 12 --pretrain-iterations 10000      # the full schedule (GPU)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

METHODS = ("supervised-only", "finetune-no-pretraining", "ideal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.environ.get("IDEAL_DATA", "../shared/data"), "acdc"))
    parser.add_argument("--out", default="benchmarks/results/acdc_ssl.json")
    parser.add_argument("--work", default="runs/acdc_ssl", help="folder for the bundles of every run")
    parser.add_argument("--labeled-patients", type=int, nargs="+", default=[3, 7])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--iterations", type=int, default=400, help="finetuning iterations of every run")
    parser.add_argument("--pretrain-iterations", type=int, default=300)
    parser.add_argument("--size", type=int, default=128, help="network in-plane size (SSL4MIS uses 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--unlabeled-batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--consistency-weight", type=float, default=0.1, help="cross pseudo-label weight after ramp-up")
    parser.add_argument("--ramp-up", type=float, default=1.0, help="share of the run over which that weight ramps up")
    parser.add_argument("--pretrained", help="reuse this pretrained-encoder bundle instead of pretraining again")
    parser.add_argument("--encoder-lr-scale", type=float, default=1.0, help="IDEAL runs: the pretrained encoder's share of the learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    import torch

    from IDEALTrain.bundle import load_bundle, save_bundle
    from IDEALTrain.datasets import load_cases
    from IDEALTrain.metrics import mean_scores, score
    from IDEALTrain.networks import NetworkConfig
    from IDEALTrain.predictor import Predictor
    from IDEALTrain.preprocessing import Preprocessing
    from IDEALTrain.pretraining import PretrainConfig, pretrain
    from IDEALTrain.selection import LabelSelection, select_training_cases
    from IDEALTrain.training import TrainConfig, train_segmentation

    data = Path(args.data)
    if not (data / "train_slices.list").is_file():
        raise SystemExit(f"ACDC (SSL4MIS layout) not found at {data}: set IDEAL_DATA or pass --data")
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    network, plan = NetworkConfig(), Preprocessing(inplane="size", size=(args.size, args.size))
    report = {
        "protocol": "SSL4MIS ACDC: first N patients of train_slices.list labelled, the rest unlabelled; val.list volumes",
        "budget": {k: getattr(args, k) for k in ("iterations", "pretrain_iterations", "size", "batch_size", "unlabeled_batch_size", "lr", "seed", "consistency_weight", "ramp_up", "pretrained", "encoder_lr_scale")},
        "device": args.device,
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "units": "voxel",
        "runs": {},
    }

    def write() -> None:
        out.write_text(json.dumps(report, indent=2))

    val_cases = load_cases(f"ssl4mis:{data}:val.list", require_labels=True)
    pretrained = load_bundle(args.pretrained) if args.pretrained else None
    if pretrained is not None:  # what the reused encoder was pretrained with (pretrain_iterations above is unused)
        recipe = pretrained.training.get("recipe", {})
        report["pretraining"] = {"reused": args.pretrained, "slices": pretrained.training.get("slices"),
                                 "iterations": recipe.get("iterations"), "size": (recipe.get("preprocessing") or {}).get("size"),
                                 **{k: recipe.get(k) for k in ("dense_level", "global_weight", "samples_per_image", "temperature", "queue_size")}}
    if "ideal" in args.methods and pretrained is None:
        start = time.perf_counter()
        everything = load_cases(f"ssl4mis:{data}:train_slices.list")
        config = PretrainConfig(iterations=args.pretrain_iterations, seed=args.seed, network=network, preprocessing=plan)
        pretrained = pretrain(everything, config, device=args.device)
        save_bundle(pretrained, work / "pretrained", overwrite=True)
        report["pretraining"] = {"slices": len(everything), "iterations": args.pretrain_iterations, "seconds": time.perf_counter() - start}
        write()

    for patients in args.labeled_patients:
        labeled, unlabeled = select_training_cases(f"ssl4mis:{data}", f"ssl4mis:{data}", LabelSelection(patients=patients), require_unlabeled=True)
        for method in args.methods:
            start = time.perf_counter()
            config = TrainConfig(
                iterations=args.iterations, batch_size=args.batch_size, unlabeled_batch_size=args.unlabeled_batch_size,
                learning_rate=args.lr, seed=args.seed, supervised_only=method == "supervised-only",
                consistency_weight=args.consistency_weight, ramp_up=args.ramp_up,
                encoder_lr_scale=args.encoder_lr_scale if method == "ideal" else 1.0,
                checkpoint_every=max(args.iterations, 1), network=network, preprocessing=plan,
            )
            bundle = train_segmentation(labeled, config, unlabeled=unlabeled, pretrained=pretrained if method == "ideal" else None, device=args.device)
            trained_seconds = time.perf_counter() - start
            save_bundle(bundle, work / f"{method}-{patients}p", overwrite=True)
            predictor = Predictor(bundle, device=args.device)
            per_volume = {case.name: score(predictor.predict(case.image).labels, case.label) for case in val_cases}
            summary = mean_scores(list(per_volume.values()))
            report["runs"][f"{patients}_patients/{method}"] = {
                "labeled_slices": len(labeled), "unlabeled_slices": len(unlabeled), "train_seconds": trained_seconds,
                "mean": summary["mean"], "classes": summary["classes"], "undefined": summary["undefined"], "per_volume": per_volume,
            }
            write()
            print(f"{patients} patients, {method}: mean Dice {summary['mean']['dice']:.4f} ({trained_seconds:.0f} s)", flush=True)
    report["claim_ideal_beats_supervised"] = {
        str(p): report["runs"][f"{p}_patients/ideal"]["mean"]["dice"] > report["runs"][f"{p}_patients/supervised-only"]["mean"]["dice"]
        for p in args.labeled_patients
        if f"{p}_patients/ideal" in report["runs"] and f"{p}_patients/supervised-only" in report["runs"]
    }
    write()
    print(json.dumps(report["claim_ideal_beats_supervised"]))


if __name__ == "__main__":
    main()
