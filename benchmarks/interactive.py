"""Click-simulator benchmark of click-to-fix refinement (``IDEALTrain.inference.refine``).

Standard protocol: per structure, click at the interior point (largest in-plane distance to the
boundary, in mm) of the largest error region (3D connected component) of the current result; a
missed region gets a positive click, a false region a negative one; refine; up to 5 clicks per
structure, one round = one click on each structure. Reported: Dice per structure after 0-5 clicks,
NoC@90 per structure (clicks needed to reach Dice 0.90; a volume that never does counts as 6), the
time per click (refinement only; the network prediction, paid once per image by the first click, is
reported apart) and the share of changed voxels farther than 20 mm from every click.

- ACDC ``val.list`` (SSL4MIS h5, no geometry stored: distances in voxels, as in the project's
  ACDC evaluation: this sets the in-plane reach; a click also carries over to up to
  ``--propagate-slices`` slices either side, see ``IDEALTrain.inference.refine_propagation``).
- Sunnybrook, all patients, ED and ES, contoured slices only, LV blood pool only, mm geometry.

    IDEAL_DATA=../shared/data OMP_NUM_THREADS=1 python benchmarks/interactive.py \
        --engine geodesic --out benchmarks/results/interactive_geodesic.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "IDEALSegment" / "Resources" / "Models" / "idealsegment-acdc-1.1.0"
MAX_CLICKS = 5
FAR_MM = 20.0
TARGET_DICE = 0.90
STRUCTURES = {1: "RV", 2: "Myo", 3: "LV"}


def next_click(labels: np.ndarray, reference: np.ndarray, structure: int, spacing_kji) -> tuple[tuple, bool] | None:
    """(k, j, i) voxel and sign of the simulated click for one structure, or None when it is perfect."""
    best = None
    for positive, error in (
        (True, (reference == structure) & (labels != structure)),
        (False, (labels == structure) & (reference != structure)),
    ):
        components, count = ndimage.label(error)
        if count:
            sizes = np.bincount(components.ravel())[1:]
            largest = int(np.argmax(sizes)) + 1
            if best is None or sizes[largest - 1] > best[0]:
                best = (sizes[largest - 1], components == largest, positive)
    if best is None:
        return None
    _, region, positive = best
    box = ndimage.find_objects(region.astype(np.uint8))[0]
    # Interior point in-plane, slice by slice: across thick slices (or ACDC's voxel units) 3D depth means little.
    padded = np.pad(region[box], ((0, 0), (1, 1), (1, 1)))
    distance = np.stack([ndimage.distance_transform_edt(s, sampling=spacing_kji[1:]) for s in padded])[:, 1:-1, 1:-1]
    local = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return tuple(int(b.start + v) for b, v in zip(box, local)), positive


class SliceOracle:
    """A ceiling, not an engine: each click sets its error region right from the reference.

    The region is the clicked 3D error component, within ``slices`` slices of the click and within the
    radius in-plane (``slices=0``: what any engine that edits only the clicked slice can at best do).
    """

    def __init__(self, refiner, slices: int) -> None:
        self.predictor, self.radius_mm, self.slices = refiner.predictor, refiner.radius_mm, slices

    def set_prior(self, image, probabilities) -> None:
        """Nothing to keep: the oracle reads the reference."""

    def fix(self, labels: np.ndarray, reference: np.ndarray, voxel: tuple, structure: int, positive: bool, spacing_kji):
        """Labels with the clicked error component set as the reference says (within the slices and the radius)."""
        inside = (reference if positive else labels) == structure
        outside = (labels if positive else reference) != structure
        components, _ = ndimage.label(inside & outside)  # the simulator's error region kind
        region = components == components[voxel]
        k, j, i = np.ogrid[tuple(slice(0, n) for n in labels.shape)]
        region &= np.abs(k - voxel[0]) <= self.slices
        region &= ((j - voxel[1]) * spacing_kji[1]) ** 2 + ((i - voxel[2]) * spacing_kji[2]) ** 2 <= self.radius_mm**2
        return np.where(region, reference, labels).astype(labels.dtype)


def dice(labels: np.ndarray, reference: np.ndarray, structure: int) -> float:
    a, b = labels == structure, reference == structure
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def simulate(refiner, image, reference: np.ndarray, structures: list[int]) -> dict:
    """Run the click simulator on one volume; Dice per structure after each round, timings, far changes."""
    from IDEALTrain.inference.refine import Click, distance_from_clicks_mm

    automatic = refiner.predictor.predict(image)
    refiner.set_prior(image, automatic.probabilities)
    draft, labels = automatic.labels, automatic.labels.array
    spacing_kji = image.spacing[::-1]
    curves = {s: [dice(labels, reference, s)] for s in structures}
    clicks, seconds = [], []
    for _ in range(MAX_CLICKS):
        for structure in structures:
            found = next_click(labels, reference, structure, spacing_kji)
            if found is not None:
                (k, j, i), positive = found
                point = tuple(float(v) for v in (image.index_to_physical @ np.array([i, j, k, 1.0]))[:3])
                clicks.append(Click(point, structure, positive))
                if isinstance(refiner, SliceOracle):
                    labels = refiner.fix(labels, reference, (k, j, i), structure, positive, spacing_kji)
                    seconds.append(0.0)
                    continue
                result = refiner.refine(image, draft, clicks)
                seconds.append(result.seconds)
                labels = result.labels.array
                clicked = labels[k, j, i] == structure
                if clicked != positive:
                    raise AssertionError(f"clicked voxel {(k, j, i)} not honoured")
        for structure in structures:
            curves[structure].append(dice(labels, reference, structure))
    changed = labels != draft.array
    far = int(np.count_nonzero(changed & (distance_from_clicks_mm(image, clicks) > FAR_MM)))
    return {
        "dice": {STRUCTURES[s]: curves[s] for s in structures},
        "click_seconds": seconds,
        "network_seconds": automatic.seconds,  # paid once per image, by the first click
        "changed_voxels": int(changed.sum()),
        "far_changed_voxels": far,
    }


def noc(curve: list[float]) -> int:
    """Clicks needed to reach the target Dice (6 when five were not enough)."""
    return next((n for n, d in enumerate(curve) if d >= TARGET_DICE), MAX_CLICKS + 1)


def summarise(rows: list[dict], structures: list[int]) -> dict:
    """Mean curves, NoC@90, time per click, far-change share; plus the 5 volumes with the lowest automatic Dice."""
    names = [STRUCTURES[s] for s in structures]
    mean_curve = [
        statistics.mean(statistics.mean(r["dice"][n][c] for n in names) for r in rows) for c in range(MAX_CLICKS + 1)
    ]
    worst = sorted(rows, key=lambda r: statistics.mean(r["dice"][n][0] for n in names))[:5]
    worst_curve = [
        statistics.mean(statistics.mean(r["dice"][n][c] for n in names) for r in worst) for c in range(MAX_CLICKS + 1)
    ]
    times = [t for r in rows for t in r["click_seconds"]]
    changed = sum(r["changed_voxels"] for r in rows)
    return {
        "volumes": len(rows),
        "dice_per_structure": {
            n: [round(statistics.mean(r["dice"][n][c] for r in rows), 4) for c in range(MAX_CLICKS + 1)] for n in names
        },
        "mean_dice": [round(d, 4) for d in mean_curve],
        "gain_3_clicks": round(mean_curve[3] - mean_curve[0], 4),
        "worst5": [r["case"] for r in worst],
        "worst5_mean_dice": [round(d, 4) for d in worst_curve],
        "worst5_gain_3_clicks": round(worst_curve[3] - worst_curve[0], 4),
        "noc90": {n: round(statistics.mean(noc(r["dice"][n]) for r in rows), 2) for n in names},
        "noc90_reached_share": {
            n: round(statistics.mean(noc(r["dice"][n]) <= MAX_CLICKS for r in rows), 3) for n in names
        },
        "network_seconds_first_click": round(statistics.mean(r["network_seconds"] for r in rows), 3),
        "seconds_per_click": {
            "mean": round(statistics.mean(times), 3),
            "max": round(max(times), 3),
            "p95": round(float(np.percentile(times, 95)), 3),
        },
        "far_change_share": round(sum(r["far_changed_voxels"] for r in rows) / changed, 5) if changed else 0.0,
    }


def acdc_cases(root: Path, limit: int | None):
    from IDEALTrain.io.ssl4mis import list_cases, read_case

    for case in list_cases(root, "val.list")[:limit]:
        image, label = read_case(case)
        yield case.name, image, label.array


def sunnybrook_cases(root: Path, limit: int | None):
    from IDEALTrain.io.sunnybrook import LV_BLOOD_POOL, list_sunnybrook_patients, read_sunnybrook_patient

    for patient in list_sunnybrook_patients(root)[:limit]:
        for phase in read_sunnybrook_patient(root, patient):
            # LV blood pool only: the reference keeps label 3; the automatic result is compared on label 3 only.
            yield f"{patient}_{phase.phase}", phase.image, np.where(phase.label.array == LV_BLOOD_POOL, 3, 0)


def _shown(path: Path) -> str:
    """A path as the report records it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("IDEAL_DATA", ROOT.parent / "shared" / "data"))
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument(
        "--engine",
        default="auto",
        help="an engine, 'auto' (guided where the model carries a refinement network, else levelset), "
        "'oracle' (a ceiling from the reference)",
    )
    parser.add_argument(
        "--refinement", type=Path, default=None, help="guided: refinement bundle (default: the model's refinement/)"
    )
    parser.add_argument("--oracle-slices", type=int, default=0, help="oracle: slices either side of the click it fixes")
    parser.add_argument("--radius-mm", type=float, default=20.0, help="in-plane reach of a click (the shipped default)")
    parser.add_argument(
        "--propagate-slices",
        type=int,
        default=None,
        help="slices either side a click carries over to (default: shipped)",
    )
    parser.add_argument("--propagate-intensity", type=float, default=None, help="override PROPAGATE_INTENSITY")
    parser.add_argument("--propagate-margin", type=float, default=None, help="override PROPAGATE_MARGIN")
    parser.add_argument("--propagate-search-mm", type=float, default=None, help="override PROPAGATE_SEARCH_MM")
    parser.add_argument("--propagate-negative", choices=("yes", "no"), default=None, help="override PROPAGATE_NEGATIVE")
    parser.add_argument(
        "--limit", type=int, default=None, help="first N ACDC volumes / Sunnybrook patients (development)"
    )
    parser.add_argument("--datasets", default="acdc,sunnybrook")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from IDEALTrain.inference import refine_propagation as propagation
    from IDEALTrain.inference.refine import Refiner
    from IDEALTrain.model.card import REFINEMENT_FOLDER

    if args.propagate_intensity is not None:
        propagation.PROPAGATE_INTENSITY = args.propagate_intensity
    if args.propagate_margin is not None:
        propagation.PROPAGATE_MARGIN = args.propagate_margin
    if args.propagate_search_mm is not None:
        propagation.PROPAGATE_SEARCH_MM = args.propagate_search_mm
    if args.propagate_negative is not None:
        propagation.PROPAGATE_NEGATIVE = args.propagate_negative == "yes"
    slices = propagation.PROPAGATE_SLICES if args.propagate_slices is None else args.propagate_slices
    oracle = args.engine == "oracle"
    refiner = Refiner(
        args.model,
        device="cpu",
        engine="levelset" if oracle else args.engine,
        radius_mm=args.radius_mm,
        propagate_slices=slices,
        refinement=args.refinement,
    )
    resolved = "oracle" if oracle else refiner.engine
    refinement = (args.refinement or args.model / REFINEMENT_FOLDER) if resolved == "guided" else None
    if oracle:
        refiner = SliceOracle(refiner, args.oracle_slices)
    report = {
        "engine": args.engine,
        **({"oracle_slices": args.oracle_slices} if oracle else {}),
        "resolved_engine": resolved,
        "refinement": None if refinement is None else _shown(refinement),
        "radius_mm": args.radius_mm,
        **(
            {}
            if oracle
            else {
                "propagate_slices": slices,
                "propagate_intensity": propagation.PROPAGATE_INTENSITY,
                "propagate_margin": propagation.PROPAGATE_MARGIN,
                "propagate_negative": propagation.PROPAGATE_NEGATIVE,
                "propagate_search_mm": propagation.PROPAGATE_SEARCH_MM,
            }
        ),
        "model": args.model.name,
        "max_clicks": MAX_CLICKS,
        "far_mm": FAR_MM,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "datasets": {},
    }
    sources = {"acdc": (acdc_cases, "acdc", [1, 2, 3]), "sunnybrook": (sunnybrook_cases, "sunnybrook", [3])}
    for name in args.datasets.split(","):
        cases, folder, structures = sources[name]
        rows, start = [], time.perf_counter()
        for case, image, reference in cases(args.data / folder, args.limit):
            row = {"case": case, **simulate(refiner, image, reference, structures)}
            rows.append(row)
            print(
                case,
                {k: [round(d, 3) for d in v] for k, v in row["dice"].items()},
                f"{statistics.mean(row['click_seconds']):.2f}s/click",
                flush=True,
            )
        report["datasets"][name] = {
            "summary": summarise(rows, structures),
            "per_volume": rows,
            "wall_seconds": round(time.perf_counter() - start, 1),
        }
        print(name, json.dumps(report["datasets"][name]["summary"]), flush=True)
    if args.out:
        from IDEALTrain.io.atomic import atomic_path

        with atomic_path(args.out) as temp:
            temp.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
