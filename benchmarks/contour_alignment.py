"""Where do the Sunnybrook expert contours sit on their images? Settles the contour files' pixel origin.

Each endocardial contour is shifted over a grid of (dx, dy) sub-pixel offsets; at each offset the
image's directional derivative along the contour's outward normal is averaged over the contour
(bright blood inside, darker wall outside, so a contour on the edge gives the strongest fall). The
offset where the mean over all contours peaks is where the contours fit the image best; a bootstrap
over contours gives its 95 % interval. Read by the loader (``IDEALTrain.io.sunnybrook``), so a
well-placed contour peaks at (0, 0).

    IDEAL_DATA=../shared/data python benchmarks/contour_alignment.py --out benchmarks/results/contour_alignment.json
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


def edge_strength(image: np.ndarray, contour_xy: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """(dy, dx) grid of the mean inward-bright edge strength along the contour shifted by each offset."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    smooth = gaussian_filter(image.astype(float), 0.7)
    grad_y, grad_x = np.gradient(smooth)
    closed = np.vstack([contour_xy, contour_xy[:1]])
    dense = np.vstack([
        a + (b - a) * np.linspace(0, 1, max(2, int(np.ceil(4 * np.linalg.norm(b - a)))), endpoint=False)[:, None]
        for a, b in zip(closed[:-1], closed[1:])
    ])
    normal = dense - dense.mean(axis=0)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-9
    grid = np.zeros((len(shifts), len(shifts)))
    for j, dy in enumerate(shifts):
        for i, dx in enumerate(shifts):
            where = [dense[:, 1] + dy, dense[:, 0] + dx]
            outward = map_coordinates(grad_x, where, order=1) * normal[:, 0] + map_coordinates(grad_y, where, order=1) * normal[:, 1]
            grid[j, i] = -outward.mean() / (smooth.std() + 1e-9)
    return grid


def endocardial_contours(root: Path):
    """(patient, image 2D, 0-based contour) for every endocardial contour, through the project's loader."""
    from IDEALTrain.io.sunnybrook import list_sunnybrook_patients, read_contour, read_sunnybrook_patient

    for patient in list_sunnybrook_patients(root):
        for phase in read_sunnybrook_patient(root, patient):
            inner = [p for p in phase.contour_files if p.name.endswith("icontour-manual.txt")]
            for k, path in enumerate(inner):
                yield patient, phase.image.array[k], read_contour(path)


def best_offset(grid: np.ndarray, shifts: np.ndarray) -> tuple[float, float]:
    """(dx, dy) of the grid's maximum."""
    j, i = np.unravel_index(np.argmax(grid), grid.shape)
    return float(shifts[i]), float(shifts[j])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("IDEAL_DATA", "../shared/data")))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    shifts = np.arange(-2.0, 2.001, 0.25)
    grids = [edge_strength(image, contour, shifts) for _, image, contour in endocardial_contours(args.data / "sunnybrook")]
    mean = np.mean(grids, axis=0)
    rng = np.random.default_rng(0)
    draws = np.array([best_offset(np.mean([grids[k] for k in rng.integers(0, len(grids), len(grids))], axis=0), shifts)
                      for _ in range(args.bootstrap)])
    per_contour = np.array([best_offset(g, shifts) for g in grids])
    result = {
        "benchmark": "contour_alignment",
        "contours": len(grids),
        "offsets_px": shifts.tolist(),
        "best_offset_px": dict(zip("xy", best_offset(mean, shifts))),
        "bootstrap_95_px": {"x": np.percentile(draws[:, 0], [2.5, 97.5]).tolist(), "y": np.percentile(draws[:, 1], [2.5, 97.5]).tolist()},
        "per_contour_median_px": dict(zip("xy", np.median(per_contour, axis=0).tolist())),
        "edge_strength_at_dy0": mean[len(shifts) // 2].tolist(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("contours", "best_offset_px", "bootstrap_95_px", "per_contour_median_px")}))


if __name__ == "__main__":
    main()
