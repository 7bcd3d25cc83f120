"""Probes behind the two unmet floors of issue 26 (ACDC RV EF error, flagging every case above 5 points).

Neither probe changes the measurement; each records the numbers that decided against a rule:

- **RV base at ES** (ACDC ``val.list``; ``--train`` adds the 70 training patients, stacked from
  their slice files — the model was fitted to them, so use them for the experts' convention, not for
  the model's accuracy). For each patient: does the expert keep the ED's most basal RV slice at ES;
  the signals a rule could use (how much the rest of the RV shrinks, whether the LV on that slice
  still counts at ES under the convention, the RV-LV centroid distance at ES / ED on that slice, the
  RV's septal contact); and the mean |RV EF error| under each rule: the shipped weighting, keep, drop,
  "LV-tied" (drop when the LV on that slice no longer counts at ES), a centroid-distance threshold,
  the per-patient best of keep/drop (an oracle: what a perfect decision would give), and the
  shipped weighting's (RV_BASE_KEEP, RV_BASE_DROP) grid.
- **Model-side flag** (the 15 cases of ``benchmarks/results/cine_ef.json``): the LV EF at the case's
  ED/ES frames from each decoder alone and from both under a horizontal flip; for each threshold
  of the spread, how many cases above 5 points and how many others it would flag (with the
  flags they already raise).

    IDEAL_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/cine_ef_probes.py --out benchmarks/results/cine_ef_probes.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = ROOT / "IDEALSegment" / "Resources" / "Models" / "idealsegment-acdc-1.1.0"
RV, LV = 1, 3
CENTROID_RATIO = 0.77  # the value that separates the 8 informative val patients best (post hoc)
SPREAD_THRESHOLDS = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0)


# -- inference --------------------------------------------------------------------------------
def _variants(predictor, image) -> dict[str, np.ndarray]:
    """Labels of each decoder alone ("d0", "d1") and of each under a horizontal flip ("f0", "f1")."""
    import torch

    from IDEALTrain.model.preprocessing import SliceGrid

    grid = SliceGrid(image, predictor.bundle.preprocessing, predictor.bundle.network.size_multiple)
    x = grid.image_to_network(image)
    parts: dict[str, list] = {"d0": [], "d1": [], "f0": [], "f1": []}
    with torch.inference_mode():
        for batch in torch.split(x, 4):
            plain = [torch.softmax(o.float(), 1) for o in predictor.network(batch.contiguous(memory_format=torch.channels_last))]
            flipped = [torch.softmax(o.float(), 1).flip(-1)
                       for o in predictor.network(batch.flip(-1).contiguous(memory_format=torch.channels_last))]
            for key, value in zip(("d0", "d1", "f0", "f1"), plain + flipped):
                parts[key].append(value)
    probabilities = {key: grid.network_to_volume(torch.cat(value)) for key, value in parts.items()}
    return {key: predictor.bundle.postprocessing.apply(p.argmax(axis=0).astype(np.uint8)) for key, p in probabilities.items()}


# -- RV base at ES ----------------------------------------------------------------------------
def _centroid_distance(labels: np.ndarray) -> float:
    rv, lv = np.argwhere(labels == RV), np.argwhere(labels == LV)
    return float(np.linalg.norm(rv.mean(0) - lv.mean(0))) if len(rv) and len(lv) else float("nan")


def rv_base_case(ed_ref, es_ref, ed_pred, es_pred) -> dict | None:
    """Signals at the ED's most basal (model) RV slice and the RV EF error of each rule; None without an RV."""
    from IDEALTrain.evaluation import function as F
    from IDEALTrain.io.image import Image

    facts = [F._frame_facts(Image(np.ascontiguousarray(a)), None) for a in (ed_pred, es_pred)]
    rv = np.stack([f.areas["RV"] for f in facts])
    present = np.flatnonzero(rv[0] > 0)
    expert = [(np.asarray(a) == RV).sum(axis=(1, 2)).astype(float) for a in (ed_ref, es_ref)]
    if present.size < 3 or expert[0].sum() <= 0:
        return None
    from_base = F.base_at_start(np.stack([f.areas["LV"] for f in facts]))
    base = int(present[0] if from_base else present[-1])
    shipped = F.rv_slice_weights(facts, 0, from_base)
    counted = F.lv_counted_slices(facts, 0)
    rest = [int(k) for k in present if k != base]
    ratio = _centroid_distance(es_pred[base]) / _centroid_distance(ed_pred[base])
    expert_ef = 100.0 * (expert[0].sum() - expert[1].sum()) / expert[0].sum()

    def error(es_base_weight: float | None = None, weights: np.ndarray | None = None) -> float:
        w = (shipped if weights is None else weights).copy()
        if es_base_weight is not None:
            w[1, base] = es_base_weight
        ed, es = (rv[0] * w[0]).sum(), (rv[1] * w[1]).sum()
        return float(100.0 * (ed - es) / ed - expert_ef)

    errors = {"shipped": error(), "keep": error(1.0), "drop": error(0.0),
              "lv_tied": error(1.0 if counted[1, base] or facts[1].areas["LV"][base] == 0 else 0.0),
              "centroid": error(1.0 if not np.isfinite(ratio) or ratio >= CENTROID_RATIO else 0.0)}
    errors["oracle"] = min(errors["keep"], errors["drop"], key=abs)
    grid = {}
    for keep in (0.0, 0.1, 0.2, 0.3):
        for drop in (0.3, 0.4, 0.5, 0.6, 0.7):
            if drop > keep:
                shrink = 1.0 - rv[1, rest].sum() / rv[0, rest].sum()
                w = shipped.copy()
                w[1, base] = float(np.clip((drop - shrink) / (drop - keep), 0.0, 1.0))
                grid[f"{keep}-{drop}"] = error(weights=w)
    expert_es = float(expert[1][base])
    order = list(np.flatnonzero(expert[0] > 0))[:: 1 if from_base else -1]  # the expert's ED RV slices, base first
    dropped = next((i for i, k in enumerate(order) if expert[1][k] > 0), len(order))  # left out at ES from the base
    return {"base_slice": base, "expert_ed_voxels": float(expert[0][base]), "expert_es_voxels": expert_es,
            "expert": "no RV at ED" if expert[0][base] == 0 else "keeps" if expert_es > 0 else "drops",
            "model_es_voxels": float(rv[1, base]),
            "expert_basal_slices_left_out_at_es": int(dropped),
            "of_them_model_labels_rv_at_es": int(sum(rv[1, k] > 0 for k in order[:dropped])), "rest_shrink": float(1.0 - rv[1, rest].sum() / rv[0, rest].sum()),
            "area_es_ed": float(rv[1, base] / rv[0, base]),
            "area_es_ed_below": float(rv[1, base + (1 if from_base else -1)] / max(1.0, rv[0, base + (1 if from_base else -1)])),
            "lv_counts_at_es": bool(counted[1, base]), "centroid_ratio_es_ed": _finite(ratio),
            "septal_contact_es": F.ring_fraction(es_pred[base] == RV, es_pred[base] == 2),
            "septal_contact_es_below": F.ring_fraction(es_pred[base + (1 if from_base else -1)] == RV,
                                                       es_pred[base + (1 if from_base else -1)] == 2),
            "rv_ef_error": errors, "rv_ef_error_grid": grid}


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _mean_abs(rows: list[dict], key: str, grid: bool = False) -> float:
    values = [abs(r["rv_ef_error_grid" if grid else "rv_ef_error"][key]) for r in rows]
    return round(float(np.mean(values)), 2)


def rv_summary(rows: list[dict]) -> dict:
    keys = rows[0]["rv_ef_error"].keys()
    left_out = [r["expert_basal_slices_left_out_at_es"] for r in rows]
    return {"patients": len(rows), "expert_drops": sum(r["expert"] == "drops" for r in rows),
            "expert_keeps": sum(r["expert"] == "keeps" for r in rows),
            "patients_by_basal_rv_slices_left_out_at_es": {str(n): left_out.count(n) for n in sorted(set(left_out))},
            "patients_where_model_labels_rv_on_a_left_out_slice": sum(r["of_them_model_labels_rv_at_es"] > 0 for r in rows),
            "mean_abs_rv_ef_error": {k: _mean_abs(rows, k) for k in keys},
            "shipped_weighting_grid": {k: _mean_abs(rows, k, grid=True) for k in rows[0]["rv_ef_error_grid"]}}


# -- data ---------------------------------------------------------------------------------------
def acdc_val_pairs(root: Path):
    """(patient, ED image, ED label, ES image, ES label): ED = the frame with the larger expert LV."""
    from IDEALTrain.io.ssl4mis import list_cases, read_case

    by: dict[str, list] = {}
    for case in list_cases(root, "val.list"):
        image, label = read_case(case)
        by.setdefault(case.name.split("_")[0], []).append((image, label))
    for patient, frames in sorted(by.items()):
        frames.sort(key=lambda f: -int(np.count_nonzero(f[1].array == LV)))
        yield patient, frames[0][0], frames[0][1].array, frames[1][0], frames[1][1].array


def acdc_train_pairs(root: Path):
    """The same for the training patients, stacked from ``data/slices`` (slice_N in order)."""
    import h5py

    from IDEALTrain.io.image import Image

    names = [n.strip() for n in (root / "train.list").read_text().splitlines() if n.strip()]
    volumes = {}
    for name in names:
        files = sorted((root / "data" / "slices").glob(f"{name}_slice_*.h5"), key=lambda p: int(re.search(r"slice_(\d+)", p.name)[1]))
        if not files:
            continue
        images, labels = [], []
        for path in files:
            with h5py.File(path, "r") as h5:
                images.append(h5["image"][()])
                labels.append(h5["label"][()])
        volumes[name] = (Image(np.stack(images).astype(np.float32)), np.stack(labels).astype(np.uint8))
    by: dict[str, list] = {}
    for name, value in volumes.items():
        by.setdefault(name.split("_")[0], []).append(value)
    for patient, frames in sorted(by.items()):
        if len(frames) == 2 and frames[0][1].shape == frames[1][1].shape:
            frames.sort(key=lambda f: -int(np.count_nonzero(f[1] == LV)))
            yield patient, frames[0][0], frames[0][1], frames[1][0], frames[1][1]


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("IDEAL_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--cine-ef", type=Path, default=ROOT / "benchmarks" / "results" / "cine_ef.json",
                        help="cine_ef.py's result: each case's error, flags and ED/ES frames")
    parser.add_argument("--train", action="store_true", help="also probe the RV rules on the 70 ACDC training patients")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cine_ef_probes.json")
    args = parser.parse_args(argv)
    import torch

    from IDEALTrain.evaluation.function import measure_function
    from IDEALTrain.inference.predictor import Predictor
    from IDEALTrain.io.sunnybrook import list_sunnybrook_patients
    from IDEALTrain.io.volume_files import read_frames

    torch.set_num_threads(1)
    start = time.perf_counter()
    predictor = Predictor(args.model, device="cpu")
    reference = json.loads(args.cine_ef.read_text())
    cases = {r["case"]: r for r in reference["sunnybrook"] + reference["acdc"]}

    def lv_ef(pairs: dict[str, tuple]) -> dict[str, float]:
        return {key: measure_function([ed.with_array(a), es.with_array(b)], ed=0, es=1).measurements["lv_ef_percent"]
                for key, (ed, a, es, b) in pairs.items()}

    spreads, rv_rows, train_rows = [], [], []
    for patient, ed_image, ed_ref, es_image, es_ref in acdc_val_pairs(args.data / "acdc"):
        ed, es = _variants(predictor, ed_image), _variants(predictor, es_image)
        row = rv_base_case(ed_ref, es_ref, predictor.predict(ed_image).labels.array, predictor.predict(es_image).labels.array)
        if row is not None:
            areas = [int(np.count_nonzero(es[k][row["base_slice"]] == RV)) for k in ("d0", "d1")]
            row["decoder_rv_disagreement_es"] = abs(areas[0] - areas[1]) / max(1.0, float(np.mean(areas)))
            rv_rows.append({"case": patient, **row})
        spreads.append((patient, lv_ef({k: (ed_image, ed[k], es_image, es[k]) for k in ("d0", "d1", "f0", "f1")})))
    root = args.data / "sunnybrook"
    for patient in list_sunnybrook_patients(root):
        frames = read_frames(root / "cine" / patient)
        m = cases[patient]["convention"]
        ed_image, es_image = frames[m["ed_frame"]], frames[m["es_frame"]]
        ed, es = _variants(predictor, ed_image), _variants(predictor, es_image)
        spreads.append((patient, lv_ef({k: (ed_image, ed[k], es_image, es[k]) for k in ("d0", "d1", "f0", "f1")})))
    if args.train:
        for patient, ed_image, ed_ref, es_image, es_ref in acdc_train_pairs(args.data / "acdc"):
            ed_pred, es_pred = predictor.predict(ed_image).labels.array, predictor.predict(es_image).labels.array
            row = rv_base_case(ed_ref, es_ref, ed_pred, es_pred)
            if row is not None:
                train_rows.append({"case": patient, **row})

    flag_rows = []
    for patient, efs in spreads:
        c = cases[patient]["convention"]
        flag_rows.append({"case": patient, "lv_ef_error": c["error"]["lv_ef_percent"], "flags": c["flags"],
                          "ef": {k: round(v, 2) for k, v in efs.items()},
                          "decoder_spread": round(abs(efs["d0"] - efs["d1"]), 2),
                          "decoder_and_flip_spread": round(max(efs.values()) - min(efs.values()), 2)})
    sweep = {}
    for signal in ("decoder_spread", "decoder_and_flip_spread"):
        for threshold in SPREAD_THRESHOLDS:
            bad = [r for r in flag_rows if abs(r["lv_ef_error"]) > 5.0]
            good = [r for r in flag_rows if abs(r["lv_ef_error"]) <= 5.0]
            fires = lambda r: bool(r["flags"]) or r[signal] > threshold  # noqa: E731
            sweep[f"{signal}>{threshold}"] = {"bad_flagged": f"{sum(map(fires, bad))}/{len(bad)}",
                                              "good_flagged": f"{sum(map(fires, good))}/{len(good)}"}
    result = {"model": args.model.name, "rv_base": {"val": {"summary": rv_summary(rv_rows), "patients": rv_rows}},
              "flag": {"cases": flag_rows, "threshold_sweep": sweep}, "seconds": None}
    if train_rows:
        result["rv_base"]["train"] = {"summary": rv_summary(train_rows), "patients": train_rows}
    result["seconds"] = round(time.perf_counter() - start, 1)
    from IDEALTrain.io.atomic import atomic_path

    with atomic_path(args.out) as temp:
        temp.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"rv_base": {k: v["summary"] for k, v in result["rv_base"].items()}, "flag_sweep": sweep}, indent=2))
    for r in flag_rows:
        print(f"{r['case']:11s} LV EF err {r['lv_ef_error']:+5.1f} decoder spread {r['decoder_spread']:4.1f} "
              f"with flip {r['decoder_and_flip_spread']:4.1f} flags {', '.join(r['flags']) or '-'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
