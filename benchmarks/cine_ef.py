"""Whole-heart ejection fraction of the shipped model against experts, with and without the convention.

- Sunnybrook (5 patients, full cines: every frame of every slice position, as a user loads them):
  ``measure_function`` on the model's labels of all 20 frames (it picks ED and ES itself) against the
  expert's EDV, ESV and EF from the contoured ED and ES slices.
- ACDC ``val.list`` (10 patients, labelled ED and ES frames, full coverage): ``measure_function`` on
  the model's ED/ES labels (``ed=0, es=1``) against the same function of the expert labels, LV and RV.
  The h5 files carry no spacing: volumes are in voxels (thousands), EF is a ratio and unaffected.
- "as is" counts every labelled voxel and takes ED/ES from the plain LV volume curve; "convention" is
  the whole-heart convention of ``IDEALTrain.evaluation.function``. Each case lists the QC flags it
  raises; the floors of issue 26 are checked at the end. ACDC val mean Dice of the model is reported
  too (the model is unchanged).

    IDEAL_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/cine_ef.py --out benchmarks/results/cine_ef.json

``--cache FOLDER`` keeps the model's labels and uncertainty maps (npz) so a rerun skips inference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = ROOT / "IDEALSegment" / "Resources" / "Models" / "idealsegment-acdc-1.1.0"
FLOORS = {"sunnybrook_max_abs_lv_ef_error": 5.0, "sunnybrook_mean_abs_lv_ef_error": 3.0,
          "acdc_mean_abs_lv_ef_error": 3.0, "acdc_mean_abs_rv_ef_error": 5.0, "acdc_mean_dice": 0.889,
          "flagged_share_of_good_cases": 0.2}
GOOD_CASE_EF_ERROR = 5.0  # points: a case above this must raise a flag


def _predictions(predictor_factory, images, cache: Path | None, name: str):
    """(labels, uncertainty) arrays of each image, from the cache when there."""
    path = cache / f"{name}.npz" if cache else None
    if path is not None and path.is_file():
        data = np.load(path)
        return list(data["labels"]), [u.astype(np.float32) for u in data["unc"]]
    predictor = predictor_factory()
    labels, uncertainty = [], []
    for image in images:
        prediction = predictor.predict(image)
        labels.append(prediction.labels.array)
        uncertainty.append(prediction.uncertainty.array if prediction.uncertainty is not None else np.zeros_like(image.array, np.float32))
    if path is not None:
        cache.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, labels=np.stack(labels), unc=np.stack(uncertainty).astype(np.float16))
    return labels, uncertainty


def _both(frames, maps, **frames_given) -> dict:
    """The report with the convention and the plain one, as JSON, keyed "convention" / "as_is"."""
    from IDEALTrain.evaluation.function import measure_function

    return {"convention": measure_function(frames, maps, **frames_given).to_json(),
            "as_is": measure_function(frames, maps, convention=False, **frames_given).to_json()}


def _errors(measured: dict, expert: dict, keys=("lv_edv_ml", "lv_esv_ml", "lv_ef_percent")) -> dict:
    return {key: None if measured[key] is None or expert.get(key) is None else measured[key] - expert[key] for key in keys}


def sunnybrook(root: Path, predictor_factory, cache: Path | None) -> list[dict]:
    from IDEALTrain.evaluation.metrics import cardiac_function
    from IDEALTrain.io.image import Image
    from IDEALTrain.io.sunnybrook import list_sunnybrook_patients, read_sunnybrook_patient
    from IDEALTrain.io.volume_files import read_frames

    rows = []
    for patient in list_sunnybrook_patients(root):
        frames = read_frames(root / "cine" / patient)
        labels, uncertainty = _predictions(predictor_factory, frames, cache, patient)
        label_images = [frame.with_array(np.asarray(a, np.uint8)) for frame, a in zip(frames, labels)]
        maps = [frame.with_array(np.asarray(u, np.float32)) for frame, u in zip(frames, uncertainty)]
        phases = {phase.phase: phase for phase in read_sunnybrook_patient(root, patient)}
        expert_frames = {name: next(t for t, f in enumerate(frames) if _holds(f, phase.image)) for name, phase in phases.items()}
        expert = cardiac_function(phases["ED"].label, phases["ES"].label)
        expert = {key: expert[key] for key in ("lv_edv_ml", "lv_esv_ml", "lv_ef_percent")}
        reports = _both(label_images, maps)
        row = {"case": patient, "expert": expert, "expert_frames": expert_frames}
        for name, report in reports.items():
            m = report["measurements"]
            row[name] = {"ed_frame": m["ed_frame"], "es_frame": m["es_frame"],
                         **{key: m[key] for key in ("lv_edv_ml", "lv_esv_ml", "lv_ef_percent", "rv_ef_percent")},
                         "error": _errors(m, expert), "flags": [flag["name"] for flag in report["flags"]],
                         "flag_details": report["flags"], "counted_slices_ed": report["counted_slices"][m["ed_frame"]]}
        rows.append(row)
        assert isinstance(label_images[0], Image)
    return rows


def _holds(frame, image) -> bool:
    """True when the expert's phase volume is this frame's slices (same voxels on the contoured positions)."""
    axis = frame.slice_axis
    stack = np.moveaxis(frame.array, axis, 0)
    return all(any(np.array_equal(s, e) for s in stack) for e in np.moveaxis(image.array, image.slice_axis, 0))


def acdc(root: Path, predictor_factory, cache: Path | None) -> tuple[list[dict], dict]:
    from IDEALTrain.evaluation.function import measure_function
    from IDEALTrain.evaluation.metrics import mean_scores, score
    from IDEALTrain.io.ssl4mis import list_cases, read_case

    by_patient: dict[str, list] = {}
    scores = []
    for case in list_cases(root, "val.list"):
        image, label = read_case(case)
        labels, uncertainty = _predictions(predictor_factory, [image], cache, f"acdc_{case.name}")
        predicted = image.with_array(np.asarray(labels[0], np.uint8))
        scores.append(score(predicted, label))
        by_patient.setdefault(case.name.split("_")[0], []).append(
            (case.name, label, predicted, image.with_array(np.asarray(uncertainty[0], np.float32))))
    rows = []
    for patient, cases in sorted(by_patient.items()):
        if len(cases) != 2:
            continue
        # ED = the labelled frame with the larger expert LV blood pool (ACDC's ED/ES are the two labelled frames)
        cases.sort(key=lambda c: -int(np.count_nonzero(c[1].array == 3)))
        (ed_name, ed_ref, ed_pred, ed_unc), (es_name, es_ref, es_pred, es_unc) = cases
        expert = measure_function([ed_ref, es_ref], ed=0, es=1, convention=False).measurements
        reports = _both([ed_pred, es_pred], [ed_unc, es_unc], ed=0, es=1)
        row = {"case": patient, "ed": ed_name, "es": es_name,
               "expert": {key: expert[key] for key in ("lv_edv_ml", "lv_esv_ml", "lv_ef_percent", "rv_ef_percent")}}
        for name, report in reports.items():
            m = report["measurements"]
            row[name] = {**{key: m[key] for key in ("lv_edv_ml", "lv_esv_ml", "lv_ef_percent", "rv_ef_percent")},
                         "error": _errors(m, expert, ("lv_edv_ml", "lv_esv_ml", "lv_ef_percent", "rv_ef_percent")),
                         "flags": [flag["name"] for flag in report["flags"]], "flag_details": report["flags"]}
        rows.append(row)
    return rows, mean_scores(scores)


def summarise(sunny: list[dict], acdc_rows: list[dict], dice_summary: dict | None) -> dict:
    def mean_abs(rows, key, variant="convention"):
        values = [abs(r[variant]["error"][key]) for r in rows if r[variant]["error"].get(key) is not None]
        return float(np.mean(values)) if values else None

    summary: dict = {}
    for variant in ("as_is", "convention"):
        summary[variant] = {
            "sunnybrook_mean_abs_lv_ef_error": mean_abs(sunny, "lv_ef_percent", variant),
            "sunnybrook_max_abs_lv_ef_error": max((abs(r[variant]["error"]["lv_ef_percent"]) for r in sunny), default=None),
            "sunnybrook_mean_abs_lv_edv_error_ml": mean_abs(sunny, "lv_edv_ml", variant),
            "sunnybrook_mean_abs_lv_esv_error_ml": mean_abs(sunny, "lv_esv_ml", variant),
            "acdc_mean_abs_lv_ef_error": mean_abs(acdc_rows, "lv_ef_percent", variant),
            "acdc_mean_abs_rv_ef_error": mean_abs(acdc_rows, "rv_ef_percent", variant),
        }
    cases = [r["convention"] for r in sunny + acdc_rows]
    bad = [c for c in cases if abs(c["error"]["lv_ef_percent"]) > GOOD_CASE_EF_ERROR]
    good = [c for c in cases if abs(c["error"]["lv_ef_percent"]) <= GOOD_CASE_EF_ERROR]
    summary["flags"] = {"cases_above_5_points": len(bad), "of_them_flagged_bad": sum(bool(c["flags"]) for c in bad),
                        "other_cases": len(good), "of_them_flagged_good": sum(bool(c["flags"]) for c in good)}
    if dice_summary is not None:
        summary["acdc_mean_dice"] = dice_summary["mean"]["dice"]
        summary["acdc_dice_per_class"] = {name: values["dice"] for name, values in dice_summary["classes"].items()}
    c = summary["convention"]
    flags = summary["flags"]
    summary["floors"] = FLOORS
    summary["floors_met"] = {
        "sunnybrook_max_abs_lv_ef_error": c["sunnybrook_max_abs_lv_ef_error"] is not None and c["sunnybrook_max_abs_lv_ef_error"] <= FLOORS["sunnybrook_max_abs_lv_ef_error"],
        "sunnybrook_mean_abs_lv_ef_error": c["sunnybrook_mean_abs_lv_ef_error"] is not None and c["sunnybrook_mean_abs_lv_ef_error"] <= FLOORS["sunnybrook_mean_abs_lv_ef_error"],
        "acdc_mean_abs_lv_ef_error": c["acdc_mean_abs_lv_ef_error"] is not None and c["acdc_mean_abs_lv_ef_error"] <= FLOORS["acdc_mean_abs_lv_ef_error"],
        "acdc_mean_abs_rv_ef_error": c["acdc_mean_abs_rv_ef_error"] is not None and c["acdc_mean_abs_rv_ef_error"] <= FLOORS["acdc_mean_abs_rv_ef_error"],
        "every_bad_case_flagged": flags["of_them_flagged_bad"] == flags["cases_above_5_points"],
        "flagged_share_of_good_cases": flags["other_cases"] == 0 or flags["of_them_flagged_good"] / flags["other_cases"] <= FLOORS["flagged_share_of_good_cases"],
    }
    if dice_summary is not None:
        summary["floors_met"]["acdc_mean_dice"] = summary["acdc_mean_dice"] >= FLOORS["acdc_mean_dice"]
    return summary


def table(sunny: list[dict], acdc_rows: list[dict]) -> str:
    """The markdown table of benchmarks/README.md: EF error as is and with the convention, flags."""
    lines = ["| case | expert LV EF | LV EF err as is | LV EF err convention | EDV err (ml/vox) | ESV err | RV EF err | flags |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sunny + acdc_rows:
        a, c = r["as_is"]["error"], r["convention"]["error"]
        rv = c.get("rv_ef_percent")
        lines.append(f"| {r['case']} | {r['expert']['lv_ef_percent']:.1f} | {a['lv_ef_percent']:+.1f} | {c['lv_ef_percent']:+.1f} | "
                     f"{c['lv_edv_ml']:+.1f} | {c['lv_esv_ml']:+.1f} | {'' if rv is None else f'{rv:+.1f}'} | "
                     f"{', '.join(r['convention']['flags']) or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("IDEAL_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--cache", type=Path, help="keep the model's labels here (npz) and reuse them")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cine_ef.json")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    predictor = []

    def factory():
        if not predictor:
            import torch

            from IDEALTrain.inference.predictor import Predictor

            torch.set_num_threads(1)
            predictor.append(Predictor(args.model, device=args.device))
        return predictor[0]

    sunny = sunnybrook(args.data / "sunnybrook", factory, args.cache)
    acdc_rows, dice_summary = acdc(args.data / "acdc", factory, args.cache)
    summary = summarise(sunny, acdc_rows, dice_summary)
    result = {"model": str(args.model.name), "summary": summary, "sunnybrook": sunny, "acdc": acdc_rows,
              "seconds": round(time.perf_counter() - start, 1)}
    from IDEALTrain.io.atomic import atomic_path

    with atomic_path(args.out) as temp:
        temp.write_text(json.dumps(result, indent=2) + "\n")
    print(table(sunny, acdc_rows))
    print(json.dumps({k: v for k, v in summary.items() if k != "floors"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
