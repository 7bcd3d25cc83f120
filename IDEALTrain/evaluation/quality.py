"""Quality-control flags of a whole-heart measurement: each a named check with its value and threshold.

Called by :func:`IDEALTrain.evaluation.function.measure_function`; every flag says what a clinician
should look at (which slices, which frames). The thresholds are stated beside each check and in
docs/measurements.md. Volume-range checks are skipped for data without spacing (voxel units).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .function import CardiacReport, QualityFlag, base_at_start

#: |LV SV - RV SV| / the larger SV, percent: both ventricles eject the same blood without a shunt or
#: regurgitation; segmentation errors show up as a mismatch.
SV_MISMATCH_PERCENT = 30.0
#: A frame-to-frame change of the LV volume above this share of the EDV is not a heartbeat.
CURVE_JUMP_PERCENT = 20.0
#: A second dip of the LV curve deeper than this share of the SV makes the cycle implausible.
CURVE_MINIMUM_PROMINENCE_PERCENT = 25.0
#: A slice whose mean uncertainty is this many times the median of the others is singled out...
UNCERTAINTY_RATIO = 4.0
#: ... if it is also above this absolute level (decoder disagreement, 0-1).
UNCERTAINTY_FLOOR = 0.01
#: Share of the largest LV cross-section still on the first/last slice that means the stack stops too early.
COVERAGE_AREA_SHARE = 0.5
#: Physiological plausibility (adults; the widest clinical ranges, not normal ranges).
RANGES: dict[str, tuple[float, float]] = {
    "lv_ef_percent": (5.0, 85.0),
    "rv_ef_percent": (5.0, 85.0),
    "lv_edv_ml": (40.0, 500.0),
    "rv_edv_ml": (40.0, 500.0),
    "myocardial_mass_g": (40.0, 350.0),
}
VOLUME_KEYS = ("lv_edv_ml", "rv_edv_ml", "myocardial_mass_g")


def quality_flags(report: CardiacReport, facts: Sequence, counted: np.ndarray) -> list[QualityFlag]:
    """Every check that fires on a report (``facts``: per-frame slice facts; ``counted``: LV slices counted)."""
    flags: list[QualityFlag] = []
    for check in (_stroke_volume_mismatch, _volume_curve, _uncertain_slices, _coverage, _broken_structures, _ranges):
        flags.extend(check(report, facts, counted))
    return flags


def _stroke_volume_mismatch(report: CardiacReport, facts, counted) -> list[QualityFlag]:
    m = report.measurements
    lv, rv = m["lv_sv_ml"], m["rv_sv_ml"]
    if lv is None or rv is None or m["rv_edv_ml"] <= 0 or max(lv, rv) <= 0:
        return []
    mismatch = 100.0 * abs(lv - rv) / max(lv, rv)
    if mismatch <= SV_MISMATCH_PERCENT:
        return []
    return [QualityFlag("lv_rv_stroke_volume_mismatch", mismatch, SV_MISMATCH_PERCENT,
                        f"LV and RV stroke volumes differ by {mismatch:.0f} % ({lv:.0f} vs {rv:.0f} {report.unit}): "
                        "check the basal slices of both ventricles at ED and ES (or a valve leak)",
                        frames=(m["ed_frame"], m["es_frame"]))]


def _volume_curve(report: CardiacReport, facts, counted) -> list[QualityFlag]:
    curve = np.array([frame["LV"] for frame in report.frame_volumes])
    if curve.size < 6 or curve.max() <= 0:
        return []
    flags = []
    edv = curve.max()
    steps = 100.0 * np.abs(np.diff(np.append(curve, curve[0]))) / edv  # a cine is a cycle
    worst = int(np.argmax(steps))
    if steps[worst] > CURVE_JUMP_PERCENT:
        after = (worst + 1) % curve.size
        flags.append(QualityFlag("volume_curve_jump", float(steps[worst]), CURVE_JUMP_PERCENT,
                                 f"the LV volume jumps by {steps[worst]:.0f} % of the EDV between frames {worst} and {after}: "
                                 "check those frames' segmentations", frames=(worst, after)))
    minima = _cyclic_minima(curve, CURVE_MINIMUM_PROMINENCE_PERCENT / 100.0 * (edv - curve.min()))
    if len(minima) > 1:
        flags.append(QualityFlag("volume_curve_several_minima", float(len(minima)), 1.0,
                                 f"the LV volume curve has {len(minima)} separate dips (frames {', '.join(map(str, minima))}): "
                                 "one heartbeat has one; check those frames", frames=tuple(minima)))
    return flags


def _cyclic_minima(curve: np.ndarray, prominence: float) -> list[int]:
    """Local minima of a cyclic curve that rise by at least ``prominence`` on both sides before a lower point."""
    n = curve.size
    found = []
    for i in range(n):
        if any(curve[(i + d) % n] < curve[i] for d in (-1, 1)):
            continue
        rises = []
        for direction in (-1, 1):
            peak, j = curve[i], i
            for _ in range(n - 1):
                j = (j + direction) % n
                if curve[j] < curve[i]:
                    break
                peak = max(peak, curve[j])
            rises.append(peak - curve[i])
        if min(rises) >= prominence and not any(curve[f] == curve[i] and abs(f - i) <= 1 for f in found):
            found.append(i)
    return found


def _uncertain_slices(report: CardiacReport, facts, counted) -> list[QualityFlag]:
    if any(f.uncertainty is None for f in facts):
        return []
    stacked = np.stack([f.uncertainty for f in facts])
    seen = np.isfinite(stacked).any(axis=0)
    per_slice = np.full(seen.shape, np.nan)
    per_slice[seen] = np.nanmean(stacked[:, seen], axis=0)
    valid = np.flatnonzero(np.isfinite(per_slice))
    if valid.size < 3:
        return []
    flagged, ratios = [], []
    for k in valid:
        others = np.median(per_slice[valid[valid != k]])
        ratio = per_slice[k] / max(others, 1e-6)
        if ratio > UNCERTAINTY_RATIO and per_slice[k] > UNCERTAINTY_FLOOR:
            flagged.append(int(k))
            ratios.append(ratio)
    if not flagged:
        return []
    return [QualityFlag("slice_uncertainty_outlier", float(max(ratios)), UNCERTAINTY_RATIO,
                        f"the model is unsure on slice(s) {', '.join(map(str, flagged))} "
                        f"({max(ratios):.1f}x the other slices): review them", slices=tuple(flagged))]


def _coverage(report: CardiacReport, facts, counted) -> list[QualityFlag]:
    ed = report.measurements["ed_frame"]
    area = facts[ed].areas["LV"] * counted[ed]
    myocardium = facts[ed].areas["LV_Myocardium"]
    if area.max() <= 0:
        return []
    from_base = base_at_start(np.stack([f.areas["LV"] for f in facts]))
    last = area.size - 1
    base_k, apex_k = (0, last) if from_base else (last, 0)
    flags = []
    share = area[base_k] / area.max()
    if counted[ed, base_k] and share >= COVERAGE_AREA_SHARE:
        flags.append(QualityFlag("missing_basal_coverage", float(share), COVERAGE_AREA_SHARE,
                                 f"the LV still fills the most basal slice ({share:.0%} of its largest section) at ED: "
                                 "the stack may stop below the base; the volumes are then too small", slices=(base_k,)))
    share = area[apex_k] / area.max()
    if share >= COVERAGE_AREA_SHARE / 2 or (area[apex_k] > 0 and myocardium[apex_k] <= 0):
        flags.append(QualityFlag("missing_apical_coverage", float(share), COVERAGE_AREA_SHARE / 2,
                                 f"the LV blood pool reaches the most apical slice ({share:.0%} of its largest section) at ED: "
                                 "the stack may stop above the apex", slices=(apex_k,)))
    return flags


def _broken_structures(report: CardiacReport, facts, counted) -> list[QualityFlag]:
    gaps: dict[int, list[int]] = {}
    for t, f in enumerate(facts):
        for name in ("LV", "RV", "LV_Myocardium"):
            present = np.flatnonzero(f.areas[name] > 0)
            if present.size < 2:
                continue
            missing = sorted(set(range(int(present[0]), int(present[-1]) + 1)) - set(present.tolist()))
            for k in missing:
                gaps.setdefault(k, []).append(t)
    if not gaps:
        return []
    frames = sorted({t for ts in gaps.values() for t in ts})
    return [QualityFlag("structure_broken_across_slices", float(len(gaps)), 0.0,
                        f"a structure is missing on slice(s) {', '.join(map(str, sorted(gaps)))} between slices that have it: "
                        "check those slices", slices=tuple(sorted(gaps)), frames=tuple(frames))]


def _ranges(report: CardiacReport, facts, counted) -> list[QualityFlag]:
    flags = []
    for key, (low, high) in RANGES.items():
        value = report.measurements.get(key)
        if value is None or (report.unit != "ml" and key in VOLUME_KEYS):
            continue
        if key.startswith("rv") and report.measurements["rv_edv_ml"] <= 0:
            continue
        if not low <= value <= high:
            limit = low if value < low else high
            flags.append(QualityFlag(f"{key}_out_of_range", float(value), float(limit),
                                     f"{key.replace('_', ' ')} {value:.1f} is outside the plausible {low:g}-{high:g}: "
                                     "check the segmentation before using it"))
    return flags
