"""``idealtrain demo --train-comparison``: IDEAL against supervised-only training on phantoms with few labels.

Generates phantoms, pretrains the encoder on every training image (no labels), finetunes with
two-stream consistency from a few labelled volumes, trains the supervised-only baseline on the
same labelled volumes at the same budget, segments held-out phantoms with both, and prints and
writes a Dice table, the IDEAL bundle and overlay PNGs. About 10 minutes on a 2-core CPU.

What this budget can and cannot show: a few hundred iterations on three held-out phantoms exercise
every stage of the method (pretraining, two-stream finetuning, the baseline on the same code path),
but the Dice difference between the two methods at this size is within run-to-run noise, either
way. The method's benefit is measured on ACDC with several seeds (benchmarks/README.md).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..evaluation.metrics import mean_scores, score
from ..evaluation.overlay import overlay_rgb, save_png
from ..inference.predictor import Predictor
from ..io.datasets import load_folder_cases
from ..io.phantom import write_phantom_dataset
from ..io.volume_files import write_image
from ..model.bundle import save_bundle
from ..model.networks import NetworkConfig
from ..model.preprocessing import Preprocessing
from ..training.finetune import TrainConfig, train_segmentation
from ..training.pretraining import PretrainConfig, pretrain
from ..training.selection import LabelSelection, split_labeled

HELD_OUT_CASES = 3
VALIDATION_CASES = 2


def run_train_comparison(
    out: Path,
    *,
    cases: int = 12,
    labeled: int = 2,
    iterations: int = 300,
    pretrain_iterations: int = 200,
    seed: int = 0,
    device: str = "auto",
) -> dict:
    """Run the comparison and return the results written to ``out/results.json``."""
    started = time.perf_counter()
    train_dir, val_dir, test_dir = (out / "phantoms" / part for part in ("train", "val", "test"))
    write_phantom_dataset(train_dir, cases, seed, overwrite=True)  # the demo's own generated data
    write_phantom_dataset(val_dir, VALIDATION_CASES, seed + 1, overwrite=True)
    write_phantom_dataset(test_dir, HELD_OUT_CASES, seed + 2, overwrite=True)
    train_cases = load_folder_cases(train_dir, require_labels=True)
    labeled_cases, unlabeled_cases = split_labeled(train_cases, LabelSelection(slices=labeled))
    val_cases, test_cases = load_folder_cases(val_dir, require_labels=True), load_folder_cases(test_dir, require_labels=True)
    print(f"phantoms: {len(labeled_cases)} labelled + {len(unlabeled_cases)} unlabelled training volumes, "
          f"{len(val_cases)} validation, {len(test_cases)} held out, in {out / 'phantoms'}")

    # Phantoms carry real spacing, so slices are resampled to a physical 2 mm grid.
    network, plan = NetworkConfig(), Preprocessing(inplane="spacing", spacing=(2.0, 2.0))
    encoder = pretrain(train_cases, PretrainConfig(iterations=pretrain_iterations, batch_size=12, seed=seed, network=network, preprocessing=plan), device=device)
    models = {}
    for method, supervised_only in (("supervised-only", True), ("ideal", False)):
        config = TrainConfig(
            iterations=iterations, batch_size=6, unlabeled_batch_size=6, learning_rate=0.05, seed=seed,
            validate_every=max(1, iterations // 3), supervised_only=supervised_only, network=network, preprocessing=plan,
        )
        print(f"\ntraining {method} ({iterations} iterations)")
        models[method] = train_segmentation(
            labeled_cases, config, unlabeled=unlabeled_cases, pretrained=None if supervised_only else encoder,
            val_cases=val_cases, device=device,
        )
    bundle = models["ideal"]
    bundle.model_id, bundle.version, bundle.description = "phantom-demo", "0.1.0", "IDEAL demo model trained on phantoms"
    bundle.licence = "Apache-2.0 (trained on generated phantoms only)"
    bundle.training["data"] = f"folder:{train_dir}"
    bundle_path = save_bundle(bundle, out / "model", overwrite=True)

    results: dict = {"bundle": str(bundle_path), "methods": {}}
    for method, model in models.items():
        predictor = Predictor(model, device=device)
        per_case = {}
        for case in test_cases:
            prediction = predictor.predict(case.image)
            per_case[case.name] = score(prediction.labels, case.label)
            write_image(prediction.labels, out / "predictions" / method / f"{case.name}.seg.nrrd", model.labels)
            # Show the slice with the most reference heart, rather than a possibly apical middle one.
            axis = case.label.slice_axis
            index = int(np.argmax((np.moveaxis(case.label.array, axis, 0) > 0).sum(axis=(1, 2))))
            panels = [overlay_rgb(case.image, labels, index) for labels in (case.label, prediction.labels)]
            save_png(np.concatenate(panels, axis=1), out / "overlays" / method / f"{case.name}.png")
        results["methods"][method] = {"cases": per_case, "mean": mean_scores(list(per_case.values()))}
    results["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _print_table(results)
    print("\nAt budgets like the default (a few hundred iterations on phantoms) the difference between the two methods "
          "is within run-to-run noise: this run shows the training pipeline, not IDEAL's benefit (see "
          "benchmarks/README.md for the measured comparison on ACDC).")
    print(f"\nIDEAL bundle {bundle_path}; segmentations in {out / 'predictions'}, overlays (reference | prediction) "
          f"in {out / 'overlays'}, results in {out / 'results.json'} ({results['seconds']:.0f} s)")
    return results


def _print_table(results: dict) -> None:
    first = next(iter(results["methods"].values()))["mean"]
    names = list(first["classes"])
    print(f"\nheld-out phantoms, mean Dice over {first['volumes']} volumes")
    print("method".ljust(18) + "".join(name.rjust(15) for name in names) + "mean".rjust(10))
    for method, result in results["methods"].items():
        summary = result["mean"]
        print(method.ljust(18) + "".join(f"{summary['classes'][c]['dice']:15.3f}" for c in names) + f"{summary['mean']['dice']:10.3f}")
