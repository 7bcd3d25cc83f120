"""Site adaptation: does retraining on a clinician's corrections pay off at a new site (issue 20)?

Sunnybrook is the new site. The benchmark follows the module's own code path, not a separate
training script: each corrected case is segmented by the shipped model through the Logic
(``segment_volume`` on a real MRML volume node), corrected as a clinician would (the LV blood pool
replaced by the expert's contour on every contoured slice, the myocardium on the slices with an
epicardial contour; the RV is left as the model drew it and is NOT reviewed), exported with
``export_correction`` (reviewed structures and slices recorded), the site's cines are added with
``add_to_pool`` (all 20 phases of every slice position of the 5 patients), then ``prepare_run`` ->
``training_plan`` (the default "continue the current model" plan) -> ``TrainingJob``, and the
module's ``compare_models`` gives its verdict on the held-out patients.

Splits rotate over the 5 patients: split i corrects patients i and i+1 (mod 5), first only patient
i, then both, and always tests on the other three (all their frames: a patient-level hold-out).
Reported before (shipped model) and after: held-out LV blood-pool Dice (ED and ES), myocardium
Dice (ED, slices with an epicardial contour), EF absolute error, ACDC val.list mean Dice (forgetting)
and the wall-clock time of the retraining job.

    IDEAL_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/site_adaptation.py \
        --splits 3 --corrected 2 1 --out benchmarks/results/site_adaptation.json

``--workflows`` (issue 31) compares how the module is used, the corrected patients' own cines being the
only pool (no manual pool step): ``corrections_only`` (explicit marks, no pool: supervised-only),
``automatic_pool`` (explicit marks; the cine of each reviewed frame joins the pool at export),
``panel_default`` (the panel's default marking: the structures edited, where edited; automatic pool) and
``forgetting`` (lr 0.01, no distillation, no mixing, nothing frozen, no pool). Each reports the site's
held-out patients, ACDC val, and the module's verdict with its non-site reference (the first
``--reference-cases`` ACDC val volumes: the shipped sample is a site patient here):

    IDEAL_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/site_adaptation.py --only-split 0 --corrected 2 \
        --workflows panel_default automatic_pool corrections_only forgetting --out benchmarks/results/site_adaptation_workflows.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "IDEALSegment"))
DEFAULT_MODEL = ROOT / "IDEALSegment" / "Resources" / "Models" / "idealsegment-acdc-1.1.0"
REVIEWER = "Sunnybrook expert contours (simulated review)"
LV, MYO = 3, 2


def model_entry(path: Path):
    """A registry entry for a bundle folder, as the module's model selector holds it."""
    from IDEALSegmentLib.registry import ModelEntry

    from IDEALTrain.model.bundle import read_card

    card = read_card(path)
    return ModelEntry(card["id"], card["version"], Path(path), "shipped", card)


#: The workflows --workflows runs: how cases are marked reviewed, whether the scans join the pool, extra finetune flags.
WORKFLOWS = {
    "corrections_only": {"marking": "explicit", "pool": False, "extra": []},
    "automatic_pool": {"marking": "explicit", "pool": True, "extra": []},
    "panel_default": {"marking": "default", "pool": True, "extra": []},
    # A deliberately forgetting plan (no distillation, no mixing, no frozen levels, lr 0.01, no pool): the verdict must see it.
    "forgetting": {"marking": "explicit", "pool": False, "extra": ["--lr", "0.01", "--distill", "0", "--keep-old", "0", "--frozen-levels", "0"]},
}


def correct_and_export(scene, dataset: Path, phase, entry, marking: str = "explicit", cine=None, pool: bool = True) -> None:
    """Segment one phase with the model via the Logic, correct LV (and myocardium) from the expert, export it."""
    from IDEALSegmentLib.corrections import export_correction
    from IDEALSegmentLib.inference import segment_volume
    from IDEALSegmentLib.review import mark_model_output
    from IDEALSegmentLib.segmentations import labels_from_segmentation, replace_segments
    from IDEALSegmentLib.volumes import volume_from_image

    volume = volume_from_image(phase.image, scene, f"{phase.patient}_{phase.phase}")
    segmentation = segment_volume(volume, entry, device="cpu", with_uncertainty=False).segmentation
    labels = labels_from_segmentation(segmentation, volume)
    mark_model_output(segmentation, labels)  # what the module records when the model draws
    corrected = labels.array.copy()
    axis = phase.image.slice_axis
    view, reference = np.moveaxis(corrected, axis, 0), np.moveaxis(phase.label.array, axis, 0)
    slices = list(range(view.shape[0]))
    myo_slices = [k for k in slices if phase.myocardium_slices[k]]
    for k in slices:  # the clinician redraws the LV on every slice the expert contoured ...
        view[k][view[k] == LV] = 0
        view[k][reference[k] == LV] = LV
    for k in myo_slices:  # ... and the myocardium where an epicardial contour exists
        view[k][view[k] == MYO] = 0
        view[k][reference[k] == MYO] = MYO
    edited = ["LV"] + (["LV_Myocardium"] if myo_slices else [])
    replace_segments(segmentation, labels.with_array(corrected), volume, edited)
    reviewed = {"LV": slices} | ({"LV_Myocardium": myo_slices} if myo_slices else {})
    export_correction(
        dataset, volume, segmentation, case_id=f"{phase.patient}_{phase.phase}", reviewer=REVIEWER,
        reviewed_structures=reviewed if marking == "explicit" else None, patient_id=phase.patient, scans=cine, pool=pool,
    )


def build_pool(scene, root: Path, patients: list[str], pool_dir: Path) -> int:
    """Every frame of every patient's cine into a pool through the Logic's add_to_pool; the frame count."""
    from IDEALSegmentLib.cine import sequence_from_images
    from IDEALSegmentLib.corrections import add_to_pool

    from IDEALTrain.io.dicom_series import read_dicom_frames

    added = 0
    for patient in patients:
        cine = sequence_from_images(scene, read_dicom_frames(root / "cine" / patient), f"{patient}_cine")
        added += len(add_to_pool(pool_dir, cine, f"{patient}_cine"))
    return added


def sunnybrook_metrics(predictor, phases_by_patient: dict) -> dict:
    """LV Dice (every frame), ED myocardium Dice on the epicardial-contour slices, EF absolute error (points)."""
    from IDEALTrain.evaluation.metrics import dice, label_volume_ml

    lv, myo, ef_errors = [], [], []
    for _patient, phases in phases_by_patient.items():
        volumes = {}
        for phase in phases:
            pred = predictor.predict(phase.image).labels
            p, r = pred.array, phase.label.array
            lv.append(dice(p == LV, r == LV))
            volumes[phase.phase] = (label_volume_ml(pred, LV), label_volume_ml(phase.label, LV))
            rows = np.array(phase.myocardium_slices)
            if phase.phase == "ED" and rows.any():
                axis = phase.image.slice_axis
                myo.append(dice(np.moveaxis(p, axis, 0)[rows] == MYO, np.moveaxis(r, axis, 0)[rows] == MYO))
        (ed, ed_ref), (es, es_ref) = volumes["ED"], volumes["ES"]
        ef_errors.append(abs(100 * (ed - es) / ed - 100 * (ed_ref - es_ref) / ed_ref))
    return {"lv_dice": float(np.mean(lv)), "myo_dice": float(np.mean(myo)) if myo else None,
            "ef_abs_error": float(np.mean(ef_errors)), "frames": len(lv), "myo_frames": len(myo)}


def acdc_mean_dice(predictor, acdc: Path) -> dict:
    """Mean 3D Dice over ACDC val.list (20 volumes), per class too: does the model forget ACDC?"""
    from IDEALTrain.evaluation.metrics import mean_scores, score
    from IDEALTrain.io.datasets import load_cases

    summary = mean_scores([score(predictor.predict(c.image).labels, c.label) for c in load_cases(f"ssl4mis:{acdc}", default_list="val.list")])
    return {"mean": summary["mean"]["dice"], "classes": {k: v["dice"] for k, v in summary["classes"].items()}}


def evaluate(model: Path, phases_by_patient: dict, acdc: Path | None) -> dict:
    """Every figure of one model: held-out Sunnybrook metrics and ACDC val mean Dice."""
    from IDEALTrain.inference.predictor import Predictor
    from IDEALTrain.model.bundle import load_bundle

    predictor = Predictor(load_bundle(model), device="cpu")
    result = sunnybrook_metrics(predictor, phases_by_patient)
    if acdc is not None:
        result["acdc"] = acdc_mean_dice(predictor, acdc)
    return result


def retrain(work: Path, corrections: Path, entry, iterations: int | None, extra: list[str], pool: bool = True) -> tuple[Path, float, str]:
    """prepare_run -> training_plan (continue the current model) -> TrainingJob; (bundle, seconds, estimate)."""
    from IDEALSegmentLib.jobs import TrainingJob
    from IDEALSegmentLib.retraining import estimate_text, prepare_run, training_plan

    run = prepare_run(corrections, work / "run", pool=pool)
    plan = training_plan(run, encoder="model", iterations=iterations, device="cpu", old_model=entry, extra=extra)
    pool = len(list((run.unlabeled_dir / "images").iterdir())) if run.unlabeled_dir else 0
    estimate = estimate_text(len(run.train_cases), pool, iterations)
    start = time.perf_counter()
    for _phase, arguments in plan:
        job = TrainingJob(arguments, run.log)
        job.start()
        if job.wait() != 0:
            raise RuntimeError(f"training failed: {job.error} (log {run.log})")
    return run.bundle, time.perf_counter() - start, estimate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("IDEAL_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--splits", type=int, default=3, help="rotated splits (1-5)")
    parser.add_argument("--only-split", type=int, help="run just this split (to run splits as parallel processes)")
    parser.add_argument("--combine", type=Path, nargs="+", help="merge these result files into --out (no training)")
    parser.add_argument("--corrected", type=int, nargs="+", default=[2, 1], help="numbers of corrected patients to run, in order")
    parser.add_argument("--iterations", type=int, help="override the default plan's iterations")
    parser.add_argument("--extra", default="", help="extra idealtrain finetune flags (ablations), one string")
    parser.add_argument("--self-test", action="store_true",
                        help="a ceiling: split i corrects patient i alone and tests on that same patient (use --corrected 1)")
    parser.add_argument("--no-acdc", action="store_true", help="skip ACDC val (forgetting) to save time")
    parser.add_argument("--workflows", nargs="+", choices=sorted(WORKFLOWS),
                        help="issue 31: run these workflows on the splits (the corrected patients' own cines are the only pool) "
                        "instead of the old protocol (every patient's cine in the pool)")
    parser.add_argument("--reference-cases", type=int, default=5,
                        help="with --workflows: the first N ACDC val volumes are the module's non-site reference")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "site_adaptation.json")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    if args.self_test and args.corrected != [1]:
        parser.error("--self-test corrects one patient per split: use --corrected 1")
    if args.combine:
        parts = [json.loads(path.read_text()) for path in args.combine]
        if parts[0].get("benchmark") == "site_adaptation_workflows":
            merged = parts[0] | {"runs": [run for part in parts for run in part["runs"]], "parts": [str(p) for p in args.combine]}
            merged["summary"] = summarise_workflows(merged["runs"])
            args.out.write_text(json.dumps(merged, indent=2))
            print(json.dumps(merged["summary"], indent=2))
            return
        merged = parts[0] | {"runs": [run for part in parts for run in part["runs"]], "parts": [str(p) for p in args.combine]}
        merged["old"] = {k: v for part in parts for k, v in part["old"].items()}
        merged["summary"] = summarise(merged["runs"])
        args.out.write_text(json.dumps(merged, indent=2))
        print(json.dumps(merged["summary"], indent=2))
        return
    import slicer
    from IDEALSegmentLib.comparison import compare_models
    from IDEALSegmentLib.retraining import CONTINUE
    from IDEALSegmentLib.segmentations import register_converter_rules

    from IDEALTrain.io.atomic import atomic_path
    from IDEALTrain.io.sunnybrook import list_sunnybrook_patients, read_sunnybrook_patient

    register_converter_rules()
    root, acdc = args.data / "sunnybrook", None if args.no_acdc else args.data / "acdc"
    patients = list_sunnybrook_patients(root)
    phases = {p: read_sunnybrook_patient(root, p) for p in patients}
    entry = model_entry(DEFAULT_MODEL)
    work = args.work or Path(tempfile.mkdtemp(prefix="site-adaptation-"))
    scene = slicer.vtkMRMLScene()
    started = time.perf_counter()
    if args.workflows:
        run_workflows(args, scene, root, patients, phases, entry, work, acdc)
        return
    pool_frames = build_pool(scene, root, patients, work / "pool")
    result = {
        "benchmark": "site_adaptation", "command": " ".join(sys.argv), "model": entry.display_name,
        "settings": {"iterations": args.iterations or CONTINUE.iterations, "continue": CONTINUE.flags(), "extra": args.extra,
                     "self_test": args.self_test},
        "pool_volumes": pool_frames, "pool_seconds": time.perf_counter() - started,
        "machine": {"cpu_count": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version()},
        "old": {}, "runs": [],
    }

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.out) as temp:
            temp.write_text(json.dumps(result, indent=2))

    old_acdc = evaluate(DEFAULT_MODEL, {}, acdc)["acdc"] if acdc else None
    result["old"]["acdc"] = old_acdc
    for split in [args.only_split] if args.only_split is not None else range(args.splits):
        pair = [patients[split % len(patients)], patients[(split + 1) % len(patients)]]
        test = [p for p in patients if p not in pair]
        if args.self_test:  # a ceiling, not a hold-out: the corrected patient is the tested one
            pair = test = pair[:1]
        held_out = {p: phases[p] for p in test}
        test_dir = work / f"split{split}" / "test"
        for patient in test:
            for phase in phases[patient]:
                correct_and_export(scene, test_dir, phase, entry)
        old = evaluate(DEFAULT_MODEL, held_out, None)
        result["old"][f"split{split}"] = old
        for count in args.corrected:
            corrected = pair[:count]
            folder = work / f"split{split}" / f"corrected{count}"
            dataset = folder / "corrections"
            shutil.copytree(work / "pool", dataset)
            for patient in corrected:
                for phase in phases[patient]:
                    correct_and_export(scene, dataset, phase, entry)
            bundle, seconds, estimate = retrain(folder, dataset, entry, args.iterations, args.extra.split())
            new = evaluate(bundle, held_out, acdc)
            comparison = compare_models(entry, bundle, test_dir, device="cpu")
            result["runs"].append({
                "split": split, "corrected": corrected, "test": test, "train_seconds": seconds, "estimate": estimate,
                "old": old | {"acdc": old_acdc}, "new": new, "card_training": json.loads((bundle / "card.json").read_text())["training"].get("corrections"),
                "module_verdict": comparison.summary(), "module_says_better": comparison.new_is_better(),
            })
            save()
            print(json.dumps({k: result["runs"][-1][k] for k in ("split", "corrected", "train_seconds", "new", "module_says_better")}), flush=True)
    result["summary"] = summarise(result["runs"])
    save()
    print(json.dumps(result["summary"], indent=2))


def reference_folder(acdc: Path, count: int, folder: Path) -> Path:
    """The first ``count`` ACDC val volumes as a folder data set: the module's non-site reference in this benchmark
    (the shipped sample is Sunnybrook SCD0000101, a site patient here)."""
    from IDEALTrain.io.datasets import load_cases
    from IDEALTrain.io.volume_files import write_image

    for case in load_cases(f"ssl4mis:{acdc}", default_list="val.list")[:count]:
        write_image(case.image, folder / "images" / f"{case.name}.nii.gz")
        write_image(case.label, folder / "labels" / f"{case.name}.nii.gz")
    return folder


def run_workflows(args, scene, root: Path, patients: list[str], phases: dict, entry, work: Path, acdc: Path | None) -> None:
    """Issue 31: each workflow on each split, through the module's code path; the module's verdict with a non-site reference."""
    import slicer  # noqa: F401  (MRML through slicer-core)
    from IDEALSegmentLib.cine import sequence_from_images
    from IDEALSegmentLib.comparison import compare_models

    from IDEALTrain.io.atomic import atomic_path
    from IDEALTrain.io.dicom_series import read_dicom_frames

    reference = {"ACDC val (first volumes)": f"folder:{reference_folder(acdc, args.reference_cases, work / 'reference')}"} if acdc else None
    result = {"benchmark": "site_adaptation_workflows", "command": " ".join(sys.argv), "model": entry.display_name,
              "workflows": {name: WORKFLOWS[name] for name in args.workflows}, "runs": [],
              "machine": {"cpu_count": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version()}}
    result["old_acdc"] = evaluate(DEFAULT_MODEL, {}, acdc)["acdc"] if acdc else None
    cines = {}
    for split in [args.only_split] if args.only_split is not None else range(args.splits):
        pair = [patients[split % len(patients)], patients[(split + 1) % len(patients)]][: args.corrected[0]]
        test = [p for p in patients if p not in pair]
        held_out = {p: phases[p] for p in test}
        test_dir = work / f"split{split}" / "test"
        for patient in test:
            for phase in phases[patient]:
                correct_and_export(scene, test_dir, phase, entry, pool=False)
        old = evaluate(DEFAULT_MODEL, held_out, None)
        for name in args.workflows:
            flow = WORKFLOWS[name]
            folder = work / f"split{split}" / name
            dataset = folder / "corrections"
            for patient in pair:
                if flow["pool"] and patient not in cines:
                    cines[patient] = sequence_from_images(scene, read_dicom_frames(root / "cine" / patient), f"{patient}_cine")
                for phase in phases[patient]:
                    correct_and_export(scene, dataset, phase, entry, flow["marking"], cines.get(patient) if flow["pool"] else None, flow["pool"])
            extra = flow["extra"] + args.extra.split()
            bundle, seconds, estimate = retrain(folder, dataset, entry, args.iterations, extra, pool=flow["pool"])
            new = evaluate(bundle, held_out, acdc)
            comparison = compare_models(entry, bundle, test_dir, device="cpu", references=reference)
            manifest = json.loads((dataset / "manifest.json").read_text())
            result["runs"].append({
                "workflow": name, "split": split, "corrected": pair, "test": test, "train_seconds": seconds, "estimate": estimate,
                "pool_volumes": sum(c["kind"] == "unlabeled" for c in manifest["cases"]),
                "reviewed": {c["case_id"]: c["reviewed"] for c in manifest["cases"] if c["kind"] == "labeled"},
                "old": old | {"acdc": result["old_acdc"]}, "new": new, "comparison": comparison.to_json(),
                "module_verdict": comparison.summary(), "verdict": comparison.verdict(),
            })
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(args.out) as temp:
                temp.write_text(json.dumps(result, indent=2))
            run = result["runs"][-1]
            print(json.dumps({"workflow": name, "split": split, "seconds": round(seconds), "verdict": run["verdict"],
                              "lv": [old["lv_dice"], new["lv_dice"]], "myo": [old["myo_dice"], new["myo_dice"]],
                              "acdc": [(result["old_acdc"] or {}).get("mean"), (new.get("acdc") or {}).get("mean")]}), flush=True)


def summarise_workflows(runs: list[dict]) -> dict:
    """Per workflow: mean before/after/change over the splits run, the verdicts, and issue 31's floors for the panel's default."""
    summary = {}
    for name in dict.fromkeys(run["workflow"] for run in runs):
        chosen = [run for run in runs if run["workflow"] == name]

        def change(get, chosen=chosen) -> dict:
            before, after = (float(np.mean([get(run, side) for run in chosen])) for side in ("old", "new"))
            return {"before": before, "after": after, "change": after - before}

        row = {
            "splits": [run["split"] for run in chosen],
            "lv_dice": change(lambda run, side: run[side]["lv_dice"]),
            "myo_dice": change(lambda run, side: run[side]["myo_dice"]),
            "ef_abs_error": change(lambda run, side: run[side]["ef_abs_error"]),
            "acdc": change(lambda run, side: run[side]["acdc"]["mean"]),
            "reference": change(lambda run, side: run["comparison"]["references"][0][side]),
            "agreement": float(np.mean([run["comparison"]["agreement"] for run in chosen])),
            "train_seconds": [round(run["train_seconds"]) for run in chosen],
            "verdicts": [run["verdict"] for run in chosen],
        }
        kept = [run["new"]["acdc"]["mean"] - run["old"]["acdc"]["mean"] >= -0.005 and run["new"]["myo_dice"] >= run["old"]["myo_dice"]
                for run in chosen]
        # Consistent: a run that kept ACDC and the held-out myocardium is not called "not better", one that lost is not "better".
        row["verdict_consistent"] = all((run["verdict"] != "not better") if ok else (run["verdict"] != "better") for run, ok in zip(chosen, kept))
        if name == "panel_default":
            row["floors"] = {
                "acdc_drop_at_most_0.005": all(run["new"]["acdc"]["mean"] - run["old"]["acdc"]["mean"] >= -0.005 for run in chosen),
                "myo_not_down": all(run["new"]["myo_dice"] >= run["old"]["myo_dice"] for run in chosen),
                "verdict_consistent": row["verdict_consistent"],
            }
        summary[name] = row
    return summary


def summarise(runs: list[dict]) -> dict:
    """Mean before/after/change per number of corrected patients, and the issue's acceptance checks for 2."""
    summary = {}
    for count in sorted({len(r["corrected"]) for r in runs}):
        chosen = [r for r in runs if len(r["corrected"]) == count]

        def mean(side: str, key: str, chosen=chosen) -> float | None:
            values = [r[side][key] if key != "acdc" else (r[side].get("acdc") or {}).get("mean") for r in chosen]
            values = [v for v in values if v is not None]
            return float(np.mean(values)) if values else None

        row = {"runs": len(chosen), "train_seconds_mean": float(np.mean([r["train_seconds"] for r in chosen])),
               "train_seconds_max": float(max(r["train_seconds"] for r in chosen)),
               "module_says_better": sum(r["module_says_better"] for r in chosen)}
        for key in ("lv_dice", "myo_dice", "ef_abs_error", "acdc"):
            before, after = mean("old", key), mean("new", key)
            row[key] = {"before": before, "after": after, "change": None if before is None or after is None else after - before}
        if count == 2:
            row["checks"] = {
                "lv_dice_up_0.015": row["lv_dice"]["change"] >= 0.015,
                "myo_dice_not_down": row["myo_dice"]["change"] >= 0,
                "ef_error_not_worse": row["ef_abs_error"]["change"] <= 0,
                "acdc_within_0.005": row["acdc"]["change"] is not None and row["acdc"]["change"] >= -0.005,
                "retraining_10_min": row["train_seconds_max"] <= 600,
            }
        summary[f"{count}_corrected"] = row
    return summary


if __name__ == "__main__":
    main()
