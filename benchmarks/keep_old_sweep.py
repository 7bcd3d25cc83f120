"""How much of the old model to keep (``--keep-old``): one retrained bundle, its weights mixed with the old ones.

Takes a bundle retrained without ``--keep-old`` (e.g. a ``site_adaptation.py --extra "--keep-old 0"``
run's ``run/model``; or with it, given as ``--trained-keep-old F``) and scores old x F + trained x (1 - F) for each F on the held-out Sunnybrook
patients and ACDC val.list, with the site-adaptation benchmark's own metrics. The mix is exactly
what ``--keep-old F`` does at the end of training, so one training run serves every F.

    IDEAL_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/keep_old_sweep.py --trained RUN/model \
        --test SCD0000301 SCD0000401 SCD0000501 --out benchmarks/results/site_adaptation_keep_old.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    from site_adaptation import DEFAULT_MODEL, acdc_mean_dice, sunnybrook_metrics

    from IDEALTrain.inference.predictor import Predictor
    from IDEALTrain.io.sunnybrook import read_sunnybrook_patient
    from IDEALTrain.model.bundle import load_bundle

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("IDEAL_DATA", "../shared/data")))
    parser.add_argument("--trained", type=Path, required=True, help="bundle retrained from the shipped model without --keep-old")
    parser.add_argument("--test", nargs="+", required=True, help="held-out Sunnybrook patients")
    parser.add_argument("--keep-old", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 1.0])
    parser.add_argument("--trained-keep-old", type=float, default=0.0,
                        help="the --keep-old the bundle was trained with: its trained weights are recovered first "
                        "(old + (W - old) / (1 - F)), e.g. 0.5 for a default-plan run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    old, trained = load_bundle(DEFAULT_MODEL), load_bundle(args.trained)
    if not 0 <= args.trained_keep_old < 1:
        parser.error("--trained-keep-old must be 0 to below 1")
    if args.trained_keep_old:  # undo the mix the run made: W = F old + (1 - F) T
        scale = 1 / (1 - args.trained_keep_old)
        trained = dataclasses.replace(trained, weights={
            k: (old.weights[k].float() + scale * (v.float() - old.weights[k].float())) if v.is_floating_point() else v
            for k, v in trained.weights.items()})
    phases = {p: read_sunnybrook_patient(args.data / "sunnybrook", p) for p in args.test}
    rows = []
    for keep in args.keep_old:
        weights = {k: v.lerp(old.weights[k].to(v.dtype), keep) if v.is_floating_point() else v for k, v in trained.weights.items()}
        predictor = Predictor(dataclasses.replace(trained, weights=weights), device="cpu")
        rows.append({"keep_old": keep, **sunnybrook_metrics(predictor, phases), "acdc": acdc_mean_dice(predictor, args.data / "acdc")})
        print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "keep_old_sweep", "command": " ".join(sys.argv), "trained": str(args.trained),
              "trained_recipe": trained.training.get("recipe", {}).get("keep_old"), "test": args.test, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
