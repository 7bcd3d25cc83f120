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
#: ... and holds at least this share of the LV + RV volume of its frame (so it matters to the result).
UNCERTAIN_SLICE_SHARE = 0.03
#: EF points one more basal slice like the top one could change: more means the coverage is in doubt.
COVERAGE_EF_POINTS = 4.0
#: The smaller part of a structure split by an empty slice holds at least this share of it.
BROKEN_SHARE = 0.05
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


def _measured_frames(report: CardiacReport) -> list[int]:
    m = report.measurements
    return list(dict.fromkeys((int(m["ed_frame"]), int(m["es_frame"]))))


def _slice_heart_ml(report: CardiacReport, t: int) -> np.ndarray:
    """Per slice: LV + RV volume counted at frame t (ml)."""
    return np.array([s["LV"] + s["RV"] for s in report.slice_volumes[t]])


def _uncertain_slices(report: CardiacReport, facts, counted) -> list[QualityFlag]:
    """Slices that carry the measurement (at ED or ES) on which the model is far less sure than on the others."""
    flagged: dict[int, float] = {}
    frames = []
    for t in _measured_frames(report):
        u = facts[t].uncertainty
        if u is None:
            continue
        heart = _slice_heart_ml(report, t)
        valid = np.flatnonzero(np.isfinite(u))
        if valid.size < 3 or heart.sum() <= 0:
            continue
        for k in valid:
            others = float(np.median(u[valid[valid != k]]))
            ratio = float(u[k]) / max(others, 1e-6)
            matters = heart[k] >= UNCERTAIN_SLICE_SHARE * heart.sum()
            if ratio > UNCERTAINTY_RATIO and u[k] > UNCERTAINTY_FLOOR and matters:
                flagged[int(k)] = max(ratio, flagged.get(int(k), 0.0))
                frames.append(t)
    if not flagged:
        return []
    worst = max(flagged.values())
    ks = sorted(flagged)
    return [QualityFlag("slice_uncertainty_outlier", worst, UNCERTAINTY_RATIO,
                        f"the model is unsure on slice(s) {', '.join(map(str, ks))} ({worst:.1f}x the other slices), "
                        "which hold part of the measured volumes: review them", slices=tuple(ks),
                        frames=tuple(sorted(set(frames))))]


def _coverage(report: CardiacReport, facts, counted) -> list[QualityFlag]:
    """The stack (or the labels) stopping before the base or the apex, where one more slice could move the EF.

    Base: one more slice like the most basal one (when the LV still counts there at ED). Apex: one
    more slice beyond the last labelled one, tapering at the rate of the last two slices.
    """
    m = report.measurements
    ed, es = int(m["ed_frame"]), int(m["es_frame"])
    lv = np.array([[s["LV"] for s in frame] for frame in report.slice_volumes])
    if lv[ed].sum() <= 0 or m["lv_ef_percent"] is None:
        return []
    from_base = base_at_start(np.stack([f.areas["LV"] for f in facts]))
    base_k = 0 if from_base else lv.shape[1] - 1
    step = 1 if from_base else -1  # towards the apex
    flags = []
    if counted[ed, base_k] and lv[ed, base_k] > 0:
        change = _ef_change(lv, ed, es, lv[ed, base_k], lv[es, base_k], m["lv_ef_percent"])
        if change >= COVERAGE_EF_POINTS:
            flags.append(QualityFlag("missing_basal_coverage", change, COVERAGE_EF_POINTS,
                                     f"the LV still fills the most basal slice {base_k} at ED: the stack may stop below the "
                                     f"base, and one more slice could change the EF by {change:.1f} points; check the coverage",
                                     slices=(base_k,), frames=(ed, es)))
    extra, apex = [], None
    for t in (ed, es):
        present = np.flatnonzero(lv[t] > 0)
        if present.size < 2:
            extra.append(0.0)
            continue
        k = int(present[-1] if from_base else present[0])
        before = lv[t, k - step]
        extra.append(float(lv[t, k] * min(lv[t, k] / before, 1.0)) if before > 0 else 0.0)
        apex = k if t == ed else apex
    change = _ef_change(lv, ed, es, extra[0], extra[1], m["lv_ef_percent"])
    if apex is not None and change >= COVERAGE_EF_POINTS:
        beyond = apex + step
        inside = 0 <= beyond < lv.shape[1]
        where = f"nothing is labelled on slice {beyond}: check the apex there" if inside else "the stack stops there"
        flags.append(QualityFlag("missing_apical_coverage", change, COVERAGE_EF_POINTS,
                                 f"the LV does not taper off by slice {apex} towards the apex ({where}); one more slice "
                                 f"could change the EF by {change:.1f} points", slices=(beyond if inside else apex,),
                                 frames=(ed, es)))
    return flags


def _ef_change(lv: np.ndarray, ed: int, es: int, extra_ed: float, extra_es: float, ef: float) -> float:
    """EF points gained or lost if ``extra_ed`` / ``extra_es`` ml were added at ED / ES."""
    edv, esv = lv[ed].sum() + extra_ed, lv[es].sum() + extra_es
    return abs(100.0 * (edv - esv) / edv - ef) if edv > 0 else 0.0


def _broken_structures(report: CardiacReport, facts, counted) -> list[QualityFlag]:
    """A structure missing on a slice between slices that hold a real part of it (at ED or ES)."""
    gaps: dict[int, set[int]] = {}
    worst = 0.0
    for t in _measured_frames(report):
        for name in ("LV", "RV", "LV_Myocardium"):
            area = facts[t].areas[name]
            present = np.flatnonzero(area > 0)
            if present.size < 2 or area.sum() <= 0:
                continue
            for low, high in zip(present[:-1], present[1:]):
                if high - low < 2:
                    continue
                # the smaller side of the gap must be a real part of the structure, not a speck
                share = min(area[: low + 1].sum(), area[high:].sum()) / area.sum()
                if share >= BROKEN_SHARE:
                    worst = max(worst, float(share))
                    for k in range(int(low) + 1, int(high)):
                        gaps.setdefault(k, set()).add(t)
    if not gaps:
        return []
    frames = sorted({t for ts in gaps.values() for t in ts})
    return [QualityFlag("structure_broken_across_slices", worst, BROKEN_SHARE,
                        f"a structure is missing on slice(s) {', '.join(map(str, sorted(gaps)))} between slices that hold "
                        f"{worst:.0%} or more of it: check those slices", slices=tuple(sorted(gaps)), frames=tuple(frames))]


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
