"""Accuracy, speed and memory of the shipped default model on real data it never saw.

- ACDC ``val.list`` (the selection set; SSL4MIS volumes, distances in voxels as in the papers):
  per-class and mean 3D Dice, HD95, ASD, as shipped and with the network alone (no postprocessing).
- Sunnybrook (external test data: the 4 patients that are not the shipped sample, ED and ES; the
  sample patient, which `idealtrain demo` shows, is reported apart), through the path a user takes: the
  DICOM folder is read with IDEALTrain's DICOM reader and segmented by the predictor, in mm
  geometry. LV blood-pool Dice (ED and ES), LV myocardium Dice at ED on the slices with a usable
  epicardial contour, and LV EDV, ESV and EF against the expert contours.
- CPU time per volume (predictor) and the peak resident memory of ``idealtrain segment`` on one
  Sunnybrook DICOM frame, in a fresh process.

    IDEAL_DATA=../shared/data python benchmarks/default_model.py --out benchmarks/results/default_model.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "IDEALSegment" / "Resources" / "Models" / "idealsegment-acdc-1.1.0"
FLOORS = {"acdc_mean_dice": 0.88, "sunnybrook_lv_dice": 0.88, "sunnybrook_myo_dice": 0.70, "sunnybrook_ef_abs_error": 6.0}


def evaluate_acdc(predictor, data: Path) -> tuple[dict, list[float]]:
    from IDEALTrain.evaluation.metrics import mean_scores, score
    from IDEALTrain.io.datasets import load_cases

    scores, seconds = [], []
    for case in load_cases(f"ssl4mis:{data}", default_list="val.list", require_labels=True):
        prediction = predictor.predict(case.image)
        seconds.append(prediction.seconds)
        scores.append({"case": case.name, **score(prediction.labels, case.label)})
    return {"per_volume": scores, "summary": mean_scores(scores)}, seconds


def evaluate_sunnybrook(predictor, root: Path) -> tuple[dict, list[float]]:
    from IDEALTrain.evaluation.metrics import dice, label_volume_ml
    from IDEALTrain.io.sunnybrook import LV_BLOOD_POOL, LV_MYOCARDIUM, list_sunnybrook_patients, read_sunnybrook_patient
    from IDEALTrain.io.volume_files import read_frames

    patients, seconds = [], []
    for patient in list_sunnybrook_patients(root):
        frames = read_frames(root / "dicoms" / patient)  # the DICOM folder as a user loads it: one image per frame
        row: dict = {"patient": patient}
        for phase in read_sunnybrook_patient(root, patient):
            # The reference phase is the DICOM frame with the same voxels (the folder holds exactly the contoured frames).
            frame = next(f for f in frames if f.same_grid(phase.image) and np.array_equal(f.array, phase.image.array))
            prediction = predictor.predict(frame)
            seconds.append(prediction.seconds)
            pred, ref = prediction.labels.array, phase.label.array
            key = phase.phase.lower()
            row[f"{key}_lv_dice"] = dice(pred == LV_BLOOD_POOL, ref == LV_BLOOD_POOL)
            row[f"{key}_lv_ml"] = label_volume_ml(prediction.labels, LV_BLOOD_POOL)
            row[f"{key}_lv_ml_reference"] = label_volume_ml(phase.label, LV_BLOOD_POOL)
            if phase.phase == "ED":
                rows = np.array(phase.myocardium_slices)  # slices where the myocardium is annotated
                pred_rows = np.moveaxis(pred, phase.image.slice_axis, 0)[rows]
                ref_rows = np.moveaxis(ref, phase.image.slice_axis, 0)[rows]
                row["ed_myo_dice"] = dice(pred_rows == LV_MYOCARDIUM, ref_rows == LV_MYOCARDIUM) if rows.any() else None
                row["ed_myo_slices"] = int(rows.sum())
        for source in ("", "_reference"):
            edv, esv = row[f"ed_lv_ml{source}"], row[f"es_lv_ml{source}"]
            row[f"ef{source}"] = 100.0 * (edv - esv) / edv if edv > 0 else None
        row["edv_error_ml"] = row["ed_lv_ml"] - row["ed_lv_ml_reference"]
        row["esv_error_ml"] = row["es_lv_ml"] - row["es_lv_ml_reference"]
        row["edv_error_relative"] = row["edv_error_ml"] / row["ed_lv_ml_reference"]
        row["esv_error_relative"] = row["esv_error_ml"] / row["es_lv_ml_reference"]
        row["ef_error_points"] = None if row["ef"] is None else row["ef"] - row["ef_reference"]
        patients.append(row)

    # The shipped sample is no external test any more: the summary is over the other patients.
    from IDEALTrain.io.sample_data import load_sample

    sample_patient = load_sample().patient
    external = [p for p in patients if p["patient"] != sample_patient]

    def mean(key: str, transform=lambda v: v) -> float | None:
        values = [transform(p[key]) for p in external if p.get(key) is not None]
        return float(np.mean(values)) if values else None

    summary = {
        "patients": [p["patient"] for p in external],
        "lv_dice": float(np.mean([p[k] for p in external for k in ("ed_lv_dice", "es_lv_dice")])),
        "lv_dice_ed": mean("ed_lv_dice"),
        "lv_dice_es": mean("es_lv_dice"),
        "myo_dice_ed": mean("ed_myo_dice"),
        "myo_dice_patients": sum(p.get("ed_myo_dice") is not None for p in external),
        "edv_abs_error_ml": mean("edv_error_ml", abs),
        "esv_abs_error_ml": mean("esv_error_ml", abs),
        "edv_abs_error_relative": mean("edv_error_relative", abs),
        "esv_abs_error_relative": mean("esv_error_relative", abs),
        "ef_abs_error_points": mean("ef_error_points", abs),
        "ef_error_points_mean": mean("ef_error_points"),
    }
    shipped = [p for p in patients if p["patient"] == sample_patient]
    return {"per_patient": external, "summary": summary, "shipped_sample": shipped[0] if shipped else None}, seconds


def peak_memory_mib(model: Path, dicom_folder: Path, device: str) -> float:
    """Peak RSS of ``idealtrain segment`` on one DICOM frame, run as a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "IDEALTrain", "segment", "--model", str(model), "--input", str(dicom_folder),
                   "--frame", "0", "--device", device, "--output", str(Path(tmp) / "out.seg.nrrd")]
        subprocess.run(command, check=True, capture_output=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=os.environ.get("IDEAL_DATA"), help="the shared data folder (default $IDEAL_DATA)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.data is None:
        parser.error("set IDEAL_DATA or pass --data")

    import torch

    from IDEALTrain.inference.predictor import Predictor
    from IDEALTrain.io.atomic import atomic_path
    from IDEALTrain.model.bundle import load_bundle, read_card
    from IDEALTrain.model.postprocessing import Postprocessing

    bundle = load_bundle(args.model)
    predictor = Predictor(bundle, device=args.device)
    acdc, acdc_seconds = evaluate_acdc(predictor, args.data / "acdc")
    sunnybrook, sunnybrook_seconds = evaluate_sunnybrook(predictor, args.data / "sunnybrook")
    # The network alone (no postprocessing): what the postprocessing adds, and the like-for-like
    # figure for the float16 check when training validated without it.
    network_only, _ = evaluate_acdc(Predictor(dataclasses.replace(bundle, postprocessing=Postprocessing()), device=args.device), args.data / "acdc")
    card = read_card(args.model)
    result = {
        "model": {"path": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
                  "id": card["id"], "version": card["version"]},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "device": str(predictor.device)},
        "acdc_val": acdc,
        "sunnybrook": sunnybrook,
        "speed": {
            "acdc_seconds_per_volume_median": statistics.median(acdc_seconds),
            "sunnybrook_seconds_per_volume_median": statistics.median(sunnybrook_seconds),
            "peak_rss_mib_segment_dicom_frame": peak_memory_mib(args.model, args.data / "sunnybrook" / "dicoms" / "SCD0000101", args.device),
        },
    }
    result["acdc_val_without_postprocessing"] = {"postprocessing": bundle.postprocessing.to_json(), "summary": network_only["summary"]}
    trained = card.get("validation", {}).get("mean", {}).get("dice")
    validated_with = Postprocessing.from_json(card.get("validation", {}).get("postprocessing", {}))
    result["half_precision_check"] = {
        "weights_dtype": card["weights"]["dtype"],
        "val_dice_float32_during_training": trained,  # the same val.list score, before the weights were halved
        "val_dice_shipped_weights": (acdc if validated_with == bundle.postprocessing else network_only)["summary"]["mean"]["dice"],
        "postprocessing_of_that_score": validated_with.to_json(),
    }
    measured = {
        "acdc_mean_dice": acdc["summary"]["mean"]["dice"],
        "sunnybrook_lv_dice": sunnybrook["summary"]["lv_dice"],
        "sunnybrook_myo_dice": sunnybrook["summary"]["myo_dice_ed"],
        "sunnybrook_ef_abs_error": sunnybrook["summary"]["ef_abs_error_points"],
    }
    result["floors"] = {
        name: {"floor": floor, "measured": measured[name],
               "met": measured[name] is not None and (measured[name] <= floor if name.endswith("error") else measured[name] >= floor)}
        for name, floor in FLOORS.items()
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"floors": result["floors"], "speed": result["speed"], "half_precision_check": result["half_precision_check"]}, indent=2))


if __name__ == "__main__":
    main()
