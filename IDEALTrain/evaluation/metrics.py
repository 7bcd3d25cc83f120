"""Segmentation quality (Dice, HD95, ASD) and cardiac function (volumes, EF, mass) from label maps.

Surface distances follow medpy 0.4 (``medpy.metric.binary``), which the semi-supervised ACDC
papers (SSL4MIS, BCP, ABD, ...) use, so numbers are comparable with theirs:

- surface of a mask = the mask XOR its erosion by the 6-neighbour (face) cross; the volume
  border counts as background, so an object touching it has a surface there;
- d(P -> R) = Euclidean distance (with spacing) from each surface voxel centre of P to the
  nearest surface voxel centre of R;
- ``hd95`` = 95th percentile (linear interpolation) of d(pred -> ref) and d(ref -> pred) pooled
  together, exactly as medpy's ``hd95``. This is not the max of the two directed 95th
  percentiles that some other tools report, which is never smaller;
- ``asd`` = mean of d(pred -> ref): medpy's ``asd(result=pred, reference=ref)``, directed;
- ``assd`` = mean of the two directed means (medpy 0.4 ``assd``), symmetric;
- ``hd`` = max of both directions (the Hausdorff distance).

Distances are in millimetres from the image spacing. Data stored without spacing (the SSL4MIS
ACDC h5 files) has unit spacing, so the numbers are in voxels as in those papers, and the
scores say ``"unit": "voxel"`` (as they would for true 1 mm isotropic data: same numbers).

Empty masks: both empty -> dice 1.0 and every distance 0.0; exactly one empty -> dice 0.0 and
distances None (undefined; JSON null). Averages skip None and report how many were undefined.

In a label-map :func:`score`, a structure the *reference* does not contain (Sunnybrook has no RV
contours and no end-systolic epicardium) is not applicable: every metric None and
``"applicable": False``, never a 0 and never in a mean; :func:`mean_scores` counts those volumes
apart (``not_applicable``).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import IdealError
from ..io.image import Image
from ..labels import CARDIAC_LABELS

#: Label value -> class name used in score reports (segment IDs of the cardiac label map).
CLASS_NAMES: dict[int, str] = {label.value: label.segment_id for label in CARDIAC_LABELS}
MYOCARDIAL_DENSITY_G_PER_ML = 1.05
METRICS = ("dice", "hd95", "asd", "assd", "hd")


# -- one binary structure ---------------------------------------------------------------------
def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice overlap 2|P and R| / (|P| + |R|) of two boolean masks; 1.0 when both are empty."""
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(pred & ref)) / total


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (pred -> ref, ref -> pred) of two non-empty (k, j, i) masks.

    ``spacing`` is (i, j, k) like ``Image.spacing``. The masks are cropped to their joint bounding
    box plus one voxel first, which changes no distance but saves most of the work.
    """
    if not pred.any() or not ref.any():
        raise IdealError("surface distances need two non-empty masks; handle empty structures first")
    crop = _bounding_box(pred | ref)
    pred_surface, pred_distance = _surface_and_distance(pred[crop], spacing)
    ref_surface, ref_distance = _surface_and_distance(ref[crop], spacing)
    return ref_distance[pred_surface], pred_distance[ref_surface]


def binary_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, float | None]:
    """Dice, HD95, ASD, ASSD and HD of two (k, j, i) masks with (i, j, k) spacing (module doc)."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return {"dice": 1.0, "hd95": 0.0, "asd": 0.0, "assd": 0.0, "hd": 0.0}
    if not has_pred or not has_ref:
        return {"dice": 0.0, "hd95": None, "asd": None, "assd": None, "hd": None}
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    return {
        "dice": dice(pred, ref),
        "hd95": float(np.percentile(np.concatenate([to_ref, to_pred]), 95)),
        "asd": float(to_ref.mean()),
        "assd": float((to_ref.mean() + to_pred.mean()) / 2),
        "hd": float(max(to_ref.max(), to_pred.max())),
    }


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Slices covering the non-zero voxels plus a one-voxel margin (clipped to the array)."""
    box = []
    for axis, length in enumerate(mask.shape):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, length)))
    return tuple(box)


def _surface_and_distance(mask: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The mask's surface (mask XOR face-cross erosion) and every voxel's distance (mm) to it."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing))
    eroded = sitk.BinaryErode(image, [1, 1, 1], sitk.sitkCross, 0.0, 1.0, False)  # outside = background
    surface = sitk.Xor(image, eroded)
    distance = sitk.SignedMaurerDistanceMap(surface, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    # Voxels of the surface itself are "inside" (negative): their distance to it is 0.
    return sitk.GetArrayViewFromImage(surface).astype(bool), np.maximum(sitk.GetArrayFromImage(distance), 0.0)


# -- label maps -------------------------------------------------------------------------------
def score(pred: Image, ref: Image, labels: dict[int, str] = CLASS_NAMES) -> dict:
    """Per-class metrics of a predicted label map against a reference on the same grid.

    Returns ``{"unit": "mm" | "voxel", "classes": {name: {metric: value}}, "mean": {metric:
    mean over classes}}``; None values (undefined distances) are skipped in the mean. A class absent
    from the reference is not applicable: all its metrics are None and it carries ``"applicable": False``.
    """
    if not pred.same_grid(ref):
        raise IdealError(
            f"prediction and reference are on different voxel grids (size {pred.size} vs {ref.size}, "
            f"spacing {pred.spacing} vs {ref.spacing}, or origin/direction differ): resample the "
            "prediction onto the reference grid with nearest-neighbour interpolation first"
        )
    classes = {}
    for value, name in labels.items():
        reference = ref.array == value
        if reference.any():
            classes[name] = {**binary_metrics(pred.array == value, reference, ref.spacing), "applicable": True}
        else:
            classes[name] = {**dict.fromkeys(METRICS), "applicable": False}
    return {"unit": _unit(ref), "classes": classes, "mean": _mean_over(classes.values())}


def mean_scores(scores: Sequence[dict]) -> dict:
    """Average ``score`` results over volumes, per class, skipping undefined (None) values.

    ``mean`` is the mean over classes of the per-class averages (the SSL4MIS convention);
    ``undefined`` counts, per class and metric, the volumes whose value was None although the
    reference holds the class; ``not_applicable`` counts, per class, the volumes whose reference
    does not (left out of every mean).
    """
    if not scores:
        raise IdealError("no scores to average: score at least one volume first")
    names = list(scores[0]["classes"])
    units = {s["unit"] for s in scores}
    if any(list(s["classes"]) != names for s in scores):
        raise IdealError("the scores to average cover different classes: score every volume with the same labels")
    if len(units) > 1:
        raise IdealError("cannot average scores in millimetres with scores in voxels: give every volume its spacing")
    classes, undefined, not_applicable = {}, {}, {}
    for name in names:
        per_volume = [s["classes"][name] for s in scores if s["classes"][name].get("applicable", True)]
        classes[name] = _mean_over(per_volume)
        undefined[name] = {m: sum(v[m] is None for v in per_volume) for m in METRICS}
        not_applicable[name] = len(scores) - len(per_volume)
    return {
        "unit": units.pop(),
        "volumes": len(scores),
        "classes": classes,
        "mean": _mean_over(classes.values()),
        "undefined": undefined,
        "not_applicable": not_applicable,
    }


def score_table(result: dict) -> str:
    """A per-structure table of a ``score`` or ``mean_scores`` result: Dice, HD95, ASD; n/a where not applicable."""
    unit = result["unit"]
    lines = [f"{'structure':16}{'Dice':>8}{'HD95 (' + unit + ')':>14}{'ASD (' + unit + ')':>13}"]
    skipped = result.get("not_applicable", {})
    for name, values in list(result["classes"].items()) + [("mean", result["mean"])]:
        if values.get("applicable", True) is False or all(values.get(m) is None for m in METRICS):
            lines.append(f"{name:16}{'n/a':>8}{'n/a':>14}{'n/a':>13}  (not in the reference)")
            continue
        cells = [("-" if values[m] is None else f"{values[m]:.3f}" if m == "dice" else f"{values[m]:.2f}") for m in ("dice", "hd95", "asd")]
        note = f"  ({skipped[name]} volume(s) without it in the reference: not applicable)" if skipped.get(name) else ""
        lines.append(f"{name:16}{cells[0]:>8}{cells[1]:>14}{cells[2]:>13}{note}")
    return "\n".join(lines)


def _mean_over(rows) -> dict[str, float | None]:
    """Mean of each metric over rows, ignoring None; None when no row defines it."""
    rows = list(rows)
    means = {}
    for metric in METRICS:
        values = [row[metric] for row in rows if row.get(metric) is not None]
        means[metric] = float(np.mean(values)) if values else None
    return means


def _unit(image: Image) -> str:
    """'voxel' for unit spacing (data stored without spacing), else 'mm'."""
    return "voxel" if image.spacing == (1.0, 1.0, 1.0) else "mm"


# -- clinical measurements --------------------------------------------------------------------
def label_volume_ml(label: Image, value: int) -> float:
    """Volume (ml) of the voxels equal to ``value``: count x voxel volume in mm^3 / 1000."""
    return int(np.count_nonzero(label.array == value)) * float(np.prod(label.spacing)) / 1000.0


def cardiac_function(ed_label: Image, es_label: Image) -> dict[str, float | None]:
    """LV and RV EDV, ESV, SV (ml) and EF (%), and myocardial mass (g) from ACDC label maps.

    EF = SV / EDV x 100, None when EDV is 0. Mass = ED myocardium volume x 1.05 g/ml. The two
    frames may have different grids; each volume uses its own spacing.
    """
    result: dict[str, float | None] = {}
    for prefix, value in (("lv", 3), ("rv", 1)):
        edv, esv = label_volume_ml(ed_label, value), label_volume_ml(es_label, value)
        result[f"{prefix}_edv_ml"] = edv
        result[f"{prefix}_esv_ml"] = esv
        result[f"{prefix}_sv_ml"] = edv - esv
        result[f"{prefix}_ef_percent"] = 100.0 * (edv - esv) / edv if edv > 0 else None
    result["myocardial_mass_g"] = label_volume_ml(ed_label, 2) * MYOCARDIAL_DENSITY_G_PER_ML
    return result
