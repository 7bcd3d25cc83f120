"""Volume bias of segmentation models: predicted / reference volume per structure and phase.

Explains what a retraining learnt at a new site: on Sunnybrook (LV blood pool, ED and ES apart, per
patient) and on ACDC val.list (each structure), the ratio of the model's volume to the reference's.
A model that learnt a site's drawing convention shows it as a ratio moving on both datasets.

    IDEAL_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/volume_bias.py \
        --models shipped=IDEALSegment/Resources/Models/idealsegment-acdc-1.1.0 retrained=RUN/model \
        --out benchmarks/results/site_adaptation_volume_bias.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STRUCTURES = {1: "RV", 2: "LV_Myocardium", 3: "LV"}


def model_bias(path: Path, data: Path, patients: list[str]) -> dict:
    """Volume ratios (and LV Dice on Sunnybrook) of one bundle."""
    from IDEALTrain.evaluation.metrics import dice
    from IDEALTrain.inference.predictor import Predictor
    from IDEALTrain.io.datasets import load_cases
    from IDEALTrain.io.sunnybrook import LV_BLOOD_POOL, read_sunnybrook_patient
    from IDEALTrain.model.bundle import load_bundle

    predictor = Predictor(load_bundle(path), device="cpu")
    sunnybrook = {}
    for patient in patients:
        for phase in read_sunnybrook_patient(data / "sunnybrook", patient):
            found, truth = predictor.predict(phase.image).labels.array == LV_BLOOD_POOL, phase.label.array == LV_BLOOD_POOL
            sunnybrook[f"{patient}_{phase.phase}"] = {"lv_ratio": float(found.sum() / truth.sum()), "lv_dice": dice(found, truth)}
    ratios = {name: [] for name in STRUCTURES.values()}
    for case in load_cases(f"ssl4mis:{data / 'acdc'}", default_list="val.list"):
        found, truth = predictor.predict(case.image).labels.array, case.label.array
        for value, name in STRUCTURES.items():
            ratios[name].append(float((found == value).sum() / max(1, (truth == value).sum())))

    def mean(phase: str) -> float:
        return float(np.mean([v["lv_ratio"] for k, v in sunnybrook.items() if k.endswith(phase)]))

    return {"model": str(path), "sunnybrook": sunnybrook, "sunnybrook_lv_ratio": {"ED": mean("_ED"), "ES": mean("_ES")},
            "acdc_volume_ratio": {name: float(np.mean(v)) for name, v in ratios.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("IDEAL_DATA", "../shared/data")))
    parser.add_argument("--models", nargs="+", required=True, metavar="NAME=BUNDLE")
    parser.add_argument("--patients", nargs="+", default=["SCD0000301", "SCD0000401", "SCD0000501"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = {"benchmark": "volume_bias", "command": " ".join(sys.argv), "patients": args.patients, "models": {}}
    for item in args.models:
        name, path = item.split("=", 1)
        result["models"][name] = model_bias(Path(path), args.data, args.patients)
        row = result["models"][name]
        print(name, json.dumps({"sunnybrook_lv_ratio": row["sunnybrook_lv_ratio"], "acdc": row["acdc_volume_ratio"]}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
