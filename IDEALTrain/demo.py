"""The README's main job: phantoms in, a trained bundle and a Dice table out, in a few minutes on a CPU."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .bundle import save_bundle
from .datasets import load_folder_cases
from .metrics import mean_scores, score
from .networks import NetworkConfig
from .phantom import write_phantom_dataset
from .predictor import Predictor
from .preprocessing import Preprocessing
from .training import TrainConfig, train_segmentation
from .volume_files import write_image

HELD_OUT_CASES = 3
VALIDATION_CASES = 2


def run_demo(out: Path, *, cases: int = 12, iterations: int = 500, seed: int = 0, device: str = "auto") -> dict:
    """Generate phantoms, train supervised, segment held-out phantoms and print per-class Dice."""
    started = time.perf_counter()
    train_dir, val_dir, test_dir = (out / "phantoms" / part for part in ("train", "val", "test"))
    write_phantom_dataset(train_dir, cases, seed)
    write_phantom_dataset(val_dir, VALIDATION_CASES, seed + 1)
    write_phantom_dataset(test_dir, HELD_OUT_CASES, seed + 2)
    print(f"generated {cases} training, {VALIDATION_CASES} validation and {HELD_OUT_CASES} held-out phantoms in {out / 'phantoms'}")

    config = TrainConfig(
        iterations=iterations,
        batch_size=8,
        learning_rate=0.05,
        seed=seed,
        validate_every=max(1, iterations // 3),
        network=NetworkConfig(),
        # Phantoms carry real spacing, so slices are resampled to a physical 2 mm grid.
        preprocessing=Preprocessing(inplane="spacing", spacing=(2.0, 2.0)),
    )
    train_cases = load_folder_cases(train_dir, require_labels=True)
    val_cases = load_folder_cases(val_dir, require_labels=True)
    bundle = train_segmentation(train_cases, config, val_cases=val_cases, device=device)
    bundle.model_id, bundle.version, bundle.description = "phantom-demo", "0.1.0", "Supervised demo model trained on phantoms"
    bundle.training["data"] = f"folder:{train_dir}"
    bundle.licence = "Apache-2.0 (trained on generated phantoms only)"
    bundle_path = save_bundle(bundle, out / "model", overwrite=True)

    predictor = Predictor(bundle, device=device)
    per_case = {}
    for case in load_folder_cases(test_dir, require_labels=True):
        prediction = predictor.predict(case.image)
        write_image(prediction.labels, out / "predictions" / f"{case.name}.seg.nrrd", bundle.labels)
        per_case[case.name] = score(prediction.labels, case.label)
    summary = mean_scores(list(per_case.values()))
    results = {"bundle": str(bundle_path), "cases": per_case, "mean": summary, "seconds": time.perf_counter() - started}
    (out / "results.json").write_text(json.dumps(results, indent=2))

    print(f"\nheld-out phantoms: Dice per class (model {bundle_path}, device {predictor.device})")
    names = list(summary["classes"])
    print("case".ljust(16) + "".join(name.rjust(15) for name in names) + "mean".rjust(10))
    for name, result in per_case.items():
        print(name.ljust(16) + "".join(f"{result['classes'][c]['dice']:15.3f}" for c in names) + f"{result['mean']['dice']:10.3f}")
    print("mean".ljust(16) + "".join(f"{summary['classes'][c]['dice']:15.3f}" for c in names) + f"{summary['mean']['dice']:10.3f}")
    print(f"\nsegmentations in {out / 'predictions'}, results in {out / 'results.json'} ({results['seconds']:.0f} s)")
    return results
