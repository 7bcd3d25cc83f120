"""Quality-control flags of whole-heart measurements (IDEALTrain.evaluation.quality): each fires, each stays quiet."""
from __future__ import annotations

import numpy as np
import pytest

from IDEALTrain.evaluation import quality
from IDEALTrain.evaluation.function import measure_function
from IDEALTrain.io.image import Image

SPACING = (1.5, 1.5, 8.0)
SIZE = 96
APEX_TO_BASE = [6, 11, 14, 16, 17, 17, 17]  # LV blood-pool radius (px) per slice: a tapering ventricle
#: One heartbeat: the LV radius scale per frame (end-diastole at 0, end-systole at 4).
BEAT = [1.0, 0.96, 0.88, 0.8, 0.75, 0.77, 0.84, 0.91, 0.96, 0.99]


def _disc(radius: float, centre=(SIZE / 2, SIZE / 2)) -> np.ndarray:
    j, i = np.mgrid[:SIZE, :SIZE]
    return (j - centre[0]) ** 2 + (i - centre[1]) ** 2 <= radius**2


def heart_slice(radius: float, rv_radius: float | None = None) -> np.ndarray:
    """An LV blood pool ringed by 5 px of myocardium, and an RV crescent beside it."""
    out = np.zeros((SIZE, SIZE), np.uint8)
    if radius <= 0:
        return out
    rv_radius = radius if rv_radius is None else rv_radius
    out[_disc(rv_radius, (SIZE / 2, SIZE / 2 - radius - 6 - rv_radius))] = 1
    out[_disc(radius + 5)] = 2
    out[_disc(radius)] = 3
    return out


def frame(scale: float, radii=APEX_TO_BASE, rv_scale: float | None = None) -> Image:
    rv = scale if rv_scale is None else rv_scale
    return Image(np.stack([heart_slice(r * scale, r * rv) for r in radii]), SPACING)


def cine(**kw) -> list[Image]:
    return [frame(s, **kw) for s in BEAT]


def names(report) -> set[str]:
    return {flag.name for flag in report.flags}


@pytest.fixture(scope="module")
def healthy():
    return measure_function(cine())


def test_a_plausible_heart_raises_no_flag(healthy):
    m = healthy.measurements
    assert (m["ed_frame"], m["es_frame"]) == (0, 4)
    assert 40 < m["lv_ef_percent"] < 60 and 60 < m["lv_edv_ml"] < 300 and 40 < m["myocardial_mass_g"] < 350
    assert healthy.flags == []


def test_lv_rv_stroke_volume_mismatch():
    frames = [frame(s, rv_scale=1.0) for s in BEAT]  # the RV does not contract: it ejects nothing
    report = measure_function(frames)
    flag = next(f for f in report.flags if f.name == "lv_rv_stroke_volume_mismatch")
    assert flag.value > flag.threshold == quality.SV_MISMATCH_PERCENT
    assert flag.frames == (0, 4) and "stroke volumes differ" in flag.message


def test_implausible_volume_curve_jump_and_several_minima(healthy):
    jumpy = BEAT.copy()
    jumpy[7] = 0.6  # one frame far off its neighbours
    report = measure_function([frame(s) for s in jumpy])
    assert "volume_curve_jump" in names(report)
    jump = next(f for f in report.flags if f.name == "volume_curve_jump")
    assert 7 in jump.frames and jump.value > quality.CURVE_JUMP_PERCENT
    two_beats = [1.0, 0.93, 0.87, 0.93, 1.0, 0.97, 0.92, 0.87, 0.92, 0.98]  # two dips in one "cycle"
    report = measure_function([frame(s) for s in two_beats])
    assert "volume_curve_several_minima" in names(report) and "volume_curve_jump" not in names(report)
    assert not names(healthy) & {"volume_curve_jump", "volume_curve_several_minima"}


def test_slices_with_uncertainty_far_above_the_rest():
    frames = cine()
    calm = [f.with_array(np.full(f.array.shape, 0.02, np.float32)) for f in frames]
    assert "slice_uncertainty_outlier" not in names(measure_function(frames, calm))
    doubtful = []
    for f in calm:
        array = f.array.copy()
        array[3] = 0.3  # the model torn on a mid-ventricular slice
        doubtful.append(f.with_array(array))
    report = measure_function(frames, doubtful)
    flag = next(f for f in report.flags if f.name == "slice_uncertainty_outlier")
    assert flag.slices == (3,) and flag.value > quality.UNCERTAINTY_RATIO
    assert report.flagged_slices() == [3]  # what the panel's "next slice to review" shows first


def test_missing_basal_coverage():
    """The stack stops while the base is still wide open and not contracting: a slice more would change the EF."""
    radii = [6, 11, 14, 16, 17]
    frames = [Image(np.stack([heart_slice(r * s) for r in radii[:-1]] + [heart_slice(17)]), SPACING) for s in BEAT]
    report = measure_function(frames)
    flag = next(f for f in report.flags if f.name == "missing_basal_coverage")
    assert flag.slices == (4,) and flag.value >= quality.COVERAGE_EF_POINTS


def test_missing_apical_coverage():
    """The labels stop at a wide, contracting apex (no taper towards slice 0, then nothing): the heart cannot end there."""
    empty = np.zeros((SIZE, SIZE), np.uint8)
    frames = [Image(np.stack([empty, heart_slice(17 * s), heart_slice(17 * s)] + [heart_slice(17)] * 3), SPACING) for s in BEAT]
    report = measure_function(frames)
    flag = next(f for f in report.flags if f.name == "missing_apical_coverage")
    assert flag.slices == (0,) and "nothing is labelled on slice 0" in flag.message


def test_structure_broken_across_slices(healthy):
    frames = cine()
    broken = frames[0].array.copy()
    broken[2] = 0  # a mid slice lost at ED
    frames[0] = frames[0].with_array(broken)
    report = measure_function(frames)
    flag = next(f for f in report.flags if f.name == "structure_broken_across_slices")
    assert flag.slices == (2,) and 0 in flag.frames
    speck = cine()
    array = speck[0].array.copy()
    array[0] = 0
    array[0][_disc(1.5)] = 1  # a few pixels of RV at the apex, one slice from the rest: not a broken structure
    array[1] = np.where(array[1] == 1, 0, array[1])
    speck[0] = speck[0].with_array(array)
    assert "structure_broken_across_slices" not in names(measure_function(speck))


def test_values_outside_physiological_ranges():
    frames = [frame(s, radii=[2, 3, 4, 4]) for s in BEAT]  # a tiny "ventricle"
    report = measure_function(frames)
    assert {"lv_edv_ml_out_of_range", "myocardial_mass_g_out_of_range"} <= names(report)
    flat = measure_function([frame(1.0), frame(0.99)], ed=0, es=1)  # hardly any ejection
    flag = next(f for f in flat.flags if f.name == "lv_ef_percent_out_of_range")
    assert flag.value < flag.threshold == 5.0
    voxels = [f.with_array(f.array) for f in frames]
    unitless = [Image(f.array, (1.0, 1.0, 1.0)) for f in voxels]  # no spacing (ACDC h5): volumes in voxels, no ml ranges
    assert not {"lv_edv_ml_out_of_range", "myocardial_mass_g_out_of_range"} & names(measure_function(unitless))


def test_one_bad_slice_cannot_move_ed_or_es(healthy):
    """A basal slice that the model gets badly wrong in one frame leaves ED and ES where the heart puts them."""
    frames = cine()
    for t, radius in ((2, 30), (7, 2)):  # one frame swollen, another shrunk, on one slice each
        array = frames[t].array.copy()
        array[5] = heart_slice(radius)
        frames[t] = frames[t].with_array(array)
    plain = measure_function(frames, convention=False).measurements
    assert (plain["ed_frame"], plain["es_frame"]) != (0, 4)  # the plain volume curve is moved
    report = measure_function(frames)
    assert (report.measurements["ed_frame"], report.measurements["es_frame"]) == (0, 4)
