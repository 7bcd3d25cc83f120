"""Whole-heart cardiac function by a stated clinical convention, with quality-control flags.

:func:`measure_function` takes the label maps of one cine (every frame) or of an ED/ES pair and
returns a :class:`CardiacReport`: LV/RV volumes, ejection fractions and mass measured over the whole
stack by the convention below, the volume of every structure per frame and per slice, and the named
quality-control flags a clinician should read before trusting the numbers. The Slicer module, the
batch script, the command line, the demo and the benchmarks all call it (one definition).

The convention (SCMR post-processing recommendations, Schulz-Menger et al. 2020), applied at every
frame because the base moves towards the apex in systole; see docs/measurements.md:

- Papillary muscles and trabeculation are part of the blood pool (the model labels them so); the
  LV outflow tract is LV.
- A slice's LV blood pool counts when the slice lies in the ventricle: at the base, a slice counts
  only while its blood pool is mostly ringed by LV myocardium (the left atrium has no ring).
- The myocardium counts on the slices where the LV does, and on the apical cap below them.
- ED and ES come from a curve that one bad slice cannot move much (see :func:`find_ed_es_robust`).

Pure numpy: no slicer, no torch.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import IdealError
from ..io.atomic import atomic_path
from ..io.image import Image

RV, LV_MYOCARDIUM, LV = 1, 2, 3
STRUCTURES: dict[str, int] = {"LV": LV, "LV_Myocardium": LV_MYOCARDIUM, "RV": RV}
MYOCARDIAL_DENSITY_G_PER_ML = 1.05
MEASUREMENT_KEYS = ("lv_edv_ml", "lv_esv_ml", "lv_sv_ml", "lv_ef_percent", "rv_edv_ml", "rv_esv_ml", "rv_sv_ml",
                    "rv_ef_percent", "myocardial_mass_g", "ed_frame", "es_frame")

#: A basal slice's LV counts when at least this share of its blood-pool edge lies next to myocardium.
RING_THRESHOLD = 0.5
#: "Next to": within this in-plane distance (pixels) of an LV myocardium pixel.
RING_DISTANCE_PX = 2
#: At ED a basal slice keeps at least this share of the blood-pool cross-section of the slice below it.
CONTINUITY = 0.5
#: At ED a basal slice whose mean uncertainty exceeds this multiple of the mid-ventricle's is the junction.
UNCERTAINTY_LIMIT = 3.0
#: The ED's most basal RV slice counts in full while the rest of the RV has shrunk by at most this share...
RV_BASE_KEEP = 0.1
#: ... and not at all once it has shrunk by this share (a well-contracting RV pulls its base further down).
RV_BASE_DROP = 0.5
CONVENTION = (
    "SCMR whole-heart (Schulz-Menger 2020): at every frame a basal slice's LV blood pool counts while at least "
    f"{RING_THRESHOLD:.0%} of its edge is ringed by LV myocardium; LV outflow tract is LV; papillary muscles "
    "and trabeculation are in the blood pool; ED/ES from a slice-robust curve"
)
NO_CONVENTION = "none: every labelled voxel counts; ED/ES = largest/smallest LV volume"
CSV_PRECISION = 2  # decimals of every number in the CSV


# -- value types ------------------------------------------------------------------------------
@dataclass(frozen=True)
class QualityFlag:
    """One quality-control check that fired: what, by how much, against which limit, and where to look."""

    name: str  # stable snake_case id, e.g. "lv_rv_stroke_volume_mismatch"
    value: float
    threshold: float
    message: str  # one line a clinician understands: what to check
    slices: tuple[int, ...] = ()  # slice indices (k along the slice axis) to review
    frames: tuple[int, ...] = ()

    def to_json(self) -> dict:
        data = asdict(self)
        data["slices"], data["frames"] = list(self.slices), list(self.frames)
        data["value"], data["threshold"] = _finite(self.value), _finite(self.threshold)
        return data


@dataclass
class CardiacReport:
    """Whole-heart function of one case: measurements, per-frame and per-slice volumes, QC flags."""

    measurements: dict[str, float | None]  # MEASUREMENT_KEYS (ml, %, g; frame indices)
    frame_volumes: list[dict[str, float]]  # per frame, after the convention: {"LV", "LV_Myocardium", "RV"} ml
    slice_volumes: list[list[dict[str, float]]]  # [frame][slice] -> the same keys (ml), after the convention
    flags: list[QualityFlag]
    convention: str
    unit: str = "ml"  # "voxel" (in thousands of voxels) for data without spacing: volumes are relative there
    raw_frame_volumes: list[dict[str, float]] = field(default_factory=list)  # every labelled voxel, no convention
    counted_slices: list[list[int]] = field(default_factory=list)  # [frame] -> slices whose LV counts

    @property
    def flagged(self) -> bool:
        return bool(self.flags)

    def flagged_slices(self) -> list[int]:
        """Every slice some flag asks to review, in order of first mention."""
        return list(dict.fromkeys(k for flag in self.flags for k in flag.slices))

    def to_json(self) -> dict:
        """JSON-serialisable, stable keys; undefined numbers are null."""
        return {
            "convention": self.convention,
            "unit": self.unit,
            "measurements": {key: _finite(self.measurements.get(key)) for key in MEASUREMENT_KEYS},
            "flags": [flag.to_json() for flag in self.flags],
            "frame_volumes": [_rounded(frame) for frame in self.frame_volumes],
            "raw_frame_volumes": [_rounded(frame) for frame in self.raw_frame_volumes],
            "slice_volumes": [[_rounded(s) for s in frame] for frame in self.slice_volumes],
            "counted_slices": [list(ks) for ks in self.counted_slices],
        }

    def summary(self) -> str:
        """One line: LV EF, EDV, ESV, ED/ES frames and the flags' names (or 'no QC flag')."""
        m = self.measurements
        ef = "n/a" if m.get("lv_ef_percent") is None else f"{m['lv_ef_percent']:.1f} %"
        flags = ", ".join(flag.name for flag in self.flags) or "no QC flag"
        return (f"LV EF {ef}, EDV {m['lv_edv_ml']:.1f} {self.unit}, ESV {m['lv_esv_ml']:.1f} {self.unit} "
                f"(ED frame {m['ed_frame']}, ES frame {m['es_frame']}); {flags}")


def _finite(value: object) -> object:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    value = float(value)
    return value if math.isfinite(value) else None


def _rounded(volumes: dict[str, float]) -> dict[str, float]:
    return {key: round(float(value), 3) for key, value in volumes.items()}


# -- ED/ES ------------------------------------------------------------------------------------
def find_ed_es(lv_volumes_ml: Sequence[float]) -> tuple[int, int]:
    """(ED, ES) frame indices: the largest and the smallest LV blood-pool volume (first on ties)."""
    curve = np.asarray(list(lv_volumes_ml), dtype=np.float64)
    if curve.ndim != 1 or curve.size < 2:
        raise IdealError(
            f"finding end-diastole and end-systole needs the LV volume of at least 2 frames, got {curve.size}: "
            "segment a cine with several frames, or choose the ED and ES frames yourself"
        )
    if not np.all(np.isfinite(curve)) or np.any(curve < 0):
        raise IdealError(f"LV volumes must be finite and >= 0 ml, got {curve.tolist()}")
    if curve.max() <= 0:
        raise IdealError(
            f"no LV blood pool was found in any of the {curve.size} frames: check that the cine is a "
            "short-axis stack through the ventricles and that the model suits it"
        )
    if curve.max() == curve.min():
        raise IdealError(
            f"the LV volume is {curve[0]:.3g} ml in every frame: end-diastole and end-systole cannot be told "
            "apart; check the cine has frames across the whole heart cycle"
        )
    return int(np.argmax(curve)), int(np.argmin(curve))


def find_ed_es_robust(slice_lv: np.ndarray, counted: np.ndarray) -> tuple[int, int]:
    """(ED, ES) from per-slice LV areas (frames x slices) so that one bad slice cannot move them.

    Only the slices whose LV counts in every frame are used (the atrium that enters a basal slice in
    systole is left out); each slice's area curve is divided by its own maximum and the frames are
    ranked by the mean of those curves with the highest and lowest slice dropped (a trimmed mean):
    one slice changes the curve by at most 1/(n-2) of its range. With fewer than 3 such slices the
    plain LV volume curve decides (:func:`find_ed_es`).
    """
    slice_lv = np.asarray(slice_lv, dtype=np.float64)
    total = slice_lv.sum(axis=1)
    core = np.flatnonzero((counted & (slice_lv > 0)).all(axis=0))
    if core.size < 3 or slice_lv.shape[0] < 3:
        return find_ed_es(total)
    find_ed_es(total)  # the same refusals (no LV, a flat curve)
    normalised = slice_lv[:, core] / slice_lv[:, core].max(axis=0)
    ordered = np.sort(normalised, axis=1)
    trimmed = ordered[:, 1:-1] if core.size >= 5 else ordered
    curve = trimmed.mean(axis=1)
    if curve.max() == curve.min():
        return find_ed_es(total)
    return int(np.argmax(curve)), int(np.argmin(curve))


# -- per-slice geometry -----------------------------------------------------------------------
def _slices_first(image: Image) -> np.ndarray:
    """The array with the slice axis first: (slices, rows, columns)."""
    return np.moveaxis(image.array, image.slice_axis, 0)


def _in_plane_spacing_area(image: Image) -> float:
    """Voxel volume (mm^3) of the image."""
    return float(np.prod(image.spacing))


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """In-plane 8-neighbour dilation of a 2D mask by ``steps`` pixels (numpy only)."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        grown[1:, 1:] |= out[:-1, :-1]
        grown[:-1, :-1] |= out[1:, 1:]
        grown[1:, :-1] |= out[:-1, 1:]
        grown[:-1, 1:] |= out[1:, :-1]
        out = grown
    return out


def _edge(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2D mask with a 4-neighbour outside it (the image border counts as outside)."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def ring_fraction(blood_pool: np.ndarray, myocardium: np.ndarray, distance_px: int = RING_DISTANCE_PX) -> float:
    """Share (0-1) of a 2D blood pool's edge that lies within ``distance_px`` of myocardium; 0 without blood pool."""
    edge = _edge(np.asarray(blood_pool, bool))
    if not edge.any():
        return 0.0
    near = _dilate(np.asarray(myocardium, bool), distance_px)
    return float(np.count_nonzero(edge & near)) / float(np.count_nonzero(edge))


@dataclass(frozen=True)
class _Frame:
    """Per-slice facts of one frame's labels (slice axis first)."""

    areas: dict[str, np.ndarray]  # structure -> voxels per slice
    ring: np.ndarray  # per slice: ring fraction of the LV blood pool
    uncertainty: np.ndarray | None  # per slice: mean uncertainty over the heart (NaN where no heart)
    voxel_ml: float


def _frame_facts(labels: Image, uncertainty: Image | None) -> _Frame:
    array = _slices_first(labels)
    areas = {name: (array == value).sum(axis=(1, 2)).astype(np.float64) for name, value in STRUCTURES.items()}
    ring = np.array([ring_fraction(s == LV, s == LV_MYOCARDIUM) for s in array])
    per_slice_uncertainty = None
    if uncertainty is not None:
        if uncertainty.array.shape != labels.array.shape:
            raise IdealError(f"the uncertainty map {uncertainty.array.shape} is not on the labels' grid {labels.array.shape}")
        values = np.moveaxis(uncertainty.array, labels.slice_axis, 0).astype(np.float64)
        per_slice_uncertainty = np.full(array.shape[0], np.nan)
        for k, s in enumerate(array):
            heart = _dilate(s > 0, 2)
            if heart.any():
                per_slice_uncertainty[k] = float(values[k][heart].mean())
    return _Frame(areas, ring, per_slice_uncertainty, _in_plane_spacing_area(labels) / 1000.0)


def base_at_start(lv_area: np.ndarray) -> bool:
    """True when slice 0 is the basal end of the LV: the end of the LV's extent with the larger cross-section.

    ``lv_area`` is (frames, slices) or (slices,); the apex tapers, the base does not.
    """
    area = np.atleast_2d(np.asarray(lv_area, dtype=np.float64)).sum(axis=0)
    present = np.flatnonzero(area > 0)
    if present.size == 0:
        return True
    first, last = int(present[0]), int(present[-1])
    return area[first:first + 2].sum() >= area[max(last - 1, 0):last + 1].sum()


def _walk_to_base(order: list[int], present: np.ndarray, keep) -> set[int]:
    """Slices kept walking from the middle of the present LV towards the base until ``keep(k, previous)`` fails.

    ``order`` lists slice indices base first; the apical half always counts.
    """
    ks = [k for k in order if present[k]]
    if not ks:
        return set()
    mid = len(ks) // 2
    kept = set(ks[mid:])  # from the middle to the apex
    previous = ks[mid]
    for k in reversed(ks[:mid]):  # from the middle towards the base
        if not keep(k, previous):
            break
        kept.add(k)
        previous = k
    return kept


def lv_counted_slices(facts: Sequence[_Frame], ed: int, *, threshold: float | None = None) -> np.ndarray:
    """(frames, slices) booleans: where a slice's LV blood pool counts under the convention.

    At end-diastole the ventricle reaches furthest: walking from the mid-ventricle to the base, a slice
    counts while its blood pool is ringed by at least ``threshold`` myocardium, keeps at least
    :data:`CONTINUITY` of the cross-section of the slice below it, and the model is sure of it
    (uncertainty at most :data:`UNCERTAINTY_LIMIT` times that of the mid-ventricle, when known); the
    first slice failing one of these is the atrioventricular junction, and it and everything beyond
    it are atrium. At every other frame only the slices of the ED ventricle can count (the base moves
    towards the apex in systole, and the apex does not move), and a basal slice stops counting once
    the atrium has replaced its ring (ring below ``threshold``, walking from the middle again).
    """
    threshold = RING_THRESHOLD if threshold is None else threshold
    lv = np.stack([f.areas["LV"] for f in facts])
    ring = np.stack([f.ring for f in facts])
    frames, slices = lv.shape
    order = list(range(slices)) if base_at_start(lv) else list(range(slices))[::-1]  # base first
    reference = _mid_uncertainty(facts[ed], lv[ed] > 0, order)

    def keep_at_ed(k: int, below: int) -> bool:
        if ring[ed, k] < threshold or lv[ed, k] < CONTINUITY * lv[ed, below]:
            return False
        u = facts[ed].uncertainty
        return u is None or reference is None or not u[k] > UNCERTAINTY_LIMIT * reference

    ventricle = _walk_to_base(order, lv[ed] > 0, keep_at_ed)
    counted = np.zeros((frames, slices), bool)
    for t in range(frames):
        inside = np.array([k in ventricle for k in range(slices)]) & (lv[t] > 0)
        if t == ed:
            kept = ventricle
        else:
            kept = _walk_to_base(order, inside, lambda k, below, t=t: ring[t, k] >= threshold)
        counted[t, sorted(kept)] = True
    return counted


def _mid_uncertainty(facts: _Frame, present: np.ndarray, order: list[int]) -> float | None:
    """Median slice uncertainty over the apical half of the LV (the slices that always count); None if unknown."""
    if facts.uncertainty is None:
        return None
    ks = [k for k in order if present[k]]
    values = facts.uncertainty[ks[len(ks) // 2:]] if ks else np.array([])
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else None


# -- the report -------------------------------------------------------------------------------
def measure_function(
    frames: Sequence[Image],
    uncertainty: Sequence[Image | None] | None = None,
    *,
    ed: int | None = None,
    es: int | None = None,
    convention: bool = True,
) -> CardiacReport:
    """Whole-heart function of a cine (every frame) or an ED/ES pair (``measure_function([ed, es], ed=0, es=1)``).

    ``frames`` are cardiac label maps (0 background, 1 RV, 2 LV myocardium, 3 LV blood pool) on one
    grid; ``uncertainty`` optional per-frame maps on the same grid (the decoders' disagreement).
    ED/ES are found from the convention's curve unless given. ``convention=False`` counts every
    labelled voxel and takes ED/ES from the plain LV volume curve (for comparison only).
    """
    frames = list(frames)
    if not frames:
        raise IdealError("no frames to measure: give the label maps of a cine or of an ED/ES pair")
    for index, frame in enumerate(frames):
        _check_labels(frame, f"frame {index}")
    if uncertainty is not None and len(uncertainty) != len(frames):
        raise IdealError(f"{len(uncertainty)} uncertainty maps for {len(frames)} frames: give one per frame (or None)")
    maps = list(uncertainty) if uncertainty is not None else [None] * len(frames)
    facts = [_frame_facts(frame, u) for frame, u in zip(frames, maps)]
    shapes = {f.ring.shape for f in facts}
    if len(shapes) > 1:
        raise IdealError(f"the frames have different numbers of slices {sorted(s[0] for s in shapes)}: measure one stack")
    lv_slices = np.stack([f.areas["LV"] for f in facts])
    ringed = (lv_slices > 0) & (np.stack([f.ring for f in facts]) >= RING_THRESHOLD)
    if ed is None or es is None:
        if len(frames) < 2:
            raise IdealError("one frame cannot give ED and ES: give a cine or an ED/ES pair")
        found_ed, found_es = find_ed_es_robust(lv_slices, ringed) if convention else find_ed_es(lv_slices.sum(axis=1))
        ed = found_ed if ed is None else ed
        es = found_es if es is None else es
    for name, index in (("ED", ed), ("ES", es)):
        if not 0 <= int(index) < len(frames):
            raise IdealError(f"the {name} frame {index} is outside the {len(frames)} frames (0-{len(frames) - 1})")
    ed, es = int(ed), int(es)
    from_base = base_at_start(lv_slices)
    counted = lv_counted_slices(facts, ed) if convention else lv_slices > 0
    rv_weights = rv_slice_weights(facts, ed, from_base) if convention else None
    slice_volumes, frame_volumes, raw = _volumes(facts, counted, from_base, rv_weights)
    measurements = _measurements(frame_volumes, ed, es)
    unit = "voxel" if frames[0].spacing == (1.0, 1.0, 1.0) else "ml"
    report = CardiacReport(measurements, frame_volumes, slice_volumes, [], CONVENTION if convention else NO_CONVENTION, unit, raw,
                           [np.flatnonzero(row).tolist() for row in counted])
    from .quality import quality_flags  # the checks live beside this module

    report.flags = quality_flags(report, facts, counted)
    return report


def _check_labels(labels: Image, what: str) -> None:
    if not isinstance(labels, Image):
        raise IdealError(f"the {what} labels must be an Image, got {type(labels).__name__}")
    unknown = np.setdiff1d(np.unique(labels.array), [0, RV, LV_MYOCARDIUM, LV])
    if unknown.size:
        raise IdealError(
            f"the {what} labels hold values {unknown.tolist()} that are not cardiac labels [0, 1, 2, 3] "
            "(0 background, 1 RV, 2 LV myocardium, 3 LV blood pool)"
        )


def rv_slice_weights(facts: Sequence[_Frame], ed: int, from_base: bool) -> np.ndarray:
    """(frames, slices) weights (0-1) of each slice's RV under the convention.

    The RV counts on the slices where it is labelled at ED (the base moves towards the apex in
    systole: a slice above the ED base is atrium at every frame). The tricuspid annulus descends
    further than the mitral one, by more the better the RV contracts (TAPSE): at each frame the ED's
    most basal RV slice counts in full while the rest of the RV has shrunk by at most
    :data:`RV_BASE_KEEP` of its ED volume, not at all from :data:`RV_BASE_DROP`, and in
    proportion between (the slice is partly right atrium).
    """
    rv = np.stack([f.areas["RV"] for f in facts])
    frames, slices = rv.shape
    weights = np.zeros((frames, slices))
    present = np.flatnonzero(rv[ed] > 0)
    if present.size == 0:
        return weights
    weights[:, present] = 1.0
    if present.size < 3:
        return weights
    base = int(present[0] if from_base else present[-1])
    rest = [int(k) for k in present if k != base]
    ed_rest = rv[ed, rest].sum()
    for t in range(frames):
        shrink = 1.0 - rv[t, rest].sum() / ed_rest if ed_rest > 0 else 0.0
        weights[t, base] = float(np.clip((RV_BASE_DROP - shrink) / (RV_BASE_DROP - RV_BASE_KEEP), 0.0, 1.0))
    return weights


def _volumes(facts: Sequence[_Frame], counted: np.ndarray, from_base: bool, rv_weights: np.ndarray | None = None):
    """Per-slice and per-frame volumes (ml) after the convention, and per-frame volumes without it."""
    slice_volumes, frame_volumes, raw = [], [], []
    for t, f in enumerate(facts):
        myo_counted = _myocardium_counted(f, counted[t], from_base)
        rows = []
        for k in range(f.ring.size):
            rows.append({
                "LV": f.areas["LV"][k] * f.voxel_ml * bool(counted[t, k]),
                "LV_Myocardium": f.areas["LV_Myocardium"][k] * f.voxel_ml * bool(myo_counted[k]),
                "RV": f.areas["RV"][k] * f.voxel_ml * (1.0 if rv_weights is None else float(rv_weights[t, k])),
            })
        slice_volumes.append(rows)
        frame_volumes.append({name: float(sum(r[name] for r in rows)) for name in STRUCTURES})
        raw.append({name: float(f.areas[name].sum() * f.voxel_ml) for name in STRUCTURES})
    return slice_volumes, frame_volumes, raw


def _myocardium_counted(f: _Frame, lv_counted: np.ndarray, from_base: bool) -> np.ndarray:
    """Myocardium counts where the LV does, and on the apical cap (slices with myocardium but no blood pool)."""
    excluded = (f.areas["LV"] > 0) & ~lv_counted  # basal slices left to the atrium
    if not excluded.any():
        return np.ones_like(lv_counted, dtype=bool)
    k = np.arange(lv_counted.size)
    limit = k[excluded].max() if from_base else k[excluded].min()
    return (k > limit) if from_base else (k < limit)


def _measurements(frame_volumes: list[dict[str, float]], ed: int, es: int) -> dict[str, float | None]:
    result: dict[str, float | None] = {}
    for prefix, name in (("lv", "LV"), ("rv", "RV")):
        edv, esv = frame_volumes[ed][name], frame_volumes[es][name]
        result[f"{prefix}_edv_ml"] = edv
        result[f"{prefix}_esv_ml"] = esv
        result[f"{prefix}_sv_ml"] = edv - esv
        result[f"{prefix}_ef_percent"] = 100.0 * (edv - esv) / edv if edv > 0 else None
    result["myocardial_mass_g"] = frame_volumes[ed]["LV_Myocardium"] * MYOCARDIAL_DENSITY_G_PER_ML
    result["ed_frame"], result["es_frame"] = ed, es
    return result


# -- CSV ----------------------------------------------------------------------------------------
CSV_COLUMNS = ("row_type", "case", "frame", "slice", "name", "value", "unit", "threshold", "slices", "frames", "message",
               "LV_ml", "LV_Myocardium_ml", "RV_ml", "LV_counted")


def report_rows(case: str, report: CardiacReport) -> list[dict]:
    """The CSV rows of one case: ``summary`` (one per measurement), ``frame``, ``slice`` and ``flag`` rows."""
    units = {"ed_frame": "frame", "es_frame": "frame"}
    rows: list[dict] = []
    for key in MEASUREMENT_KEYS:
        unit = units.get(key) or ("%" if key.endswith("_percent") else "g" if key.endswith("_g") else report.unit)
        rows.append({"row_type": "summary", "case": case, "name": key, "value": report.measurements.get(key), "unit": unit})
    for t, volumes in enumerate(report.frame_volumes):
        rows.append({"row_type": "frame", "case": case, "frame": t, **{f"{n}_ml": volumes[n] for n in STRUCTURES}})
    for t, per_slice in enumerate(report.slice_volumes):
        counted = set(report.counted_slices[t]) if report.counted_slices else set()
        for k, volumes in enumerate(per_slice):
            rows.append({"row_type": "slice", "case": case, "frame": t, "slice": k,
                         **{f"{n}_ml": volumes[n] for n in STRUCTURES}, "LV_counted": int(k in counted)})
    for flag in report.flags:
        rows.append({"row_type": "flag", "case": case, "name": flag.name, "value": flag.value, "threshold": flag.threshold,
                     "slices": " ".join(map(str, flag.slices)), "frames": " ".join(map(str, flag.frames)),
                     "message": flag.message})
    return rows


def _csv_value(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "" if not math.isfinite(value) else f"{float(value):.{CSV_PRECISION}f}"
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_function_csv(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows (from :func:`report_rows`) as one CSV with a ``row_type`` column, every number at one precision.

    Written atomically (a reader never sees half a file); unknown columns are refused.
    """
    rows = list(rows)
    unknown = sorted({key for row in rows for key in row} - set(CSV_COLUMNS))
    if unknown:
        raise IdealError(f"unknown measurement CSV columns {unknown}; the schema is {list(CSV_COLUMNS)}")
    path = Path(path)
    with atomic_path(path) as temp, open(temp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_value(row.get(key)) for key in CSV_COLUMNS})
    return path


def report_json_text(report: CardiacReport) -> str:
    """The report as indented JSON text (what results.json files embed)."""
    return json.dumps(report.to_json(), indent=2)
