"""Whole-heart function (IDEALTrain.evaluation.function): the basal-slice convention, ED/ES, volumes, CSV."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from IDEALTrain.errors import IdealError
from IDEALTrain.evaluation.function import (
    CSV_COLUMNS,
    MEASUREMENT_KEYS,
    CardiacReport,
    QualityFlag,
    find_ed_es,
    find_ed_es_robust,
    measure_function,
    report_rows,
    ring_fraction,
    write_function_csv,
)
from IDEALTrain.io.image import Image

SPACING = (1.5, 1.5, 8.0)  # (i, j, k) mm: thick short-axis slices along k
SIZE = 72


def _disc(radius: float, centre=(SIZE / 2, SIZE / 2)) -> np.ndarray:
    j, i = np.mgrid[:SIZE, :SIZE]
    return (j - centre[0]) ** 2 + (i - centre[1]) ** 2 <= radius**2


def heart_slice(radius: float, ring: bool = True, rv: bool = True) -> np.ndarray:
    """One short-axis slice: LV blood pool of ``radius`` px, a 4 px myocardial ring (or none), an RV beside it."""
    out = np.zeros((SIZE, SIZE), np.uint8)
    if rv:
        out[_disc(radius + 9, (SIZE / 2, SIZE / 2 - radius - 6)) & ~_disc(radius + 5)] = 1
    if ring:
        out[_disc(radius + 4)] = 2
    if radius > 0:
        out[_disc(radius)] = 3
    return out


def heart(radii: list[float], basal_ring: bool = True, basal_radius: float | None = None) -> Image:
    """A stack apex (k=0) to base (k=last); the last slice's blood pool is ringed or bare (atrium)."""
    slices = [heart_slice(r) for r in radii]
    if basal_radius is not None:
        slices.append(heart_slice(basal_radius, ring=basal_ring))
    return Image(np.stack(slices), SPACING)


def cine(scale: list[float], **basal) -> list[Image]:
    base = [4, 8, 11, 13, 14, 14]
    return [heart([r * s for r in base], **basal) for s in scale]


def test_ring_fraction_of_a_ringed_and_a_bare_blood_pool():
    ringed = heart_slice(10)
    assert ring_fraction(ringed == 3, ringed == 2) == 1.0
    bare = heart_slice(10, ring=False)
    assert ring_fraction(bare == 3, bare == 2) == 0.0
    half = ringed.copy()
    half[:, : SIZE // 2][half[:, : SIZE // 2] == 2] = 0  # myocardium on one side only
    assert 0.35 < ring_fraction(half == 3, half == 2) < 0.65
    assert ring_fraction(np.zeros((5, 5), bool), np.ones((5, 5), bool)) == 0.0


def test_a_ringless_basal_slice_is_excluded_and_a_ringed_one_kept():
    ed_ringed = heart([4, 8, 11, 13, 14], basal_radius=14, basal_ring=True)
    ed_bare = heart([4, 8, 11, 13, 14], basal_radius=14, basal_ring=False)
    es = heart([3, 6, 8, 9, 10], basal_radius=0, basal_ring=True)
    kept = measure_function([ed_ringed, es], ed=0, es=1)
    excluded = measure_function([ed_bare, es], ed=0, es=1)
    voxel_ml = np.prod(SPACING) / 1000
    basal_ml = np.count_nonzero(ed_bare.array[-1] == 3) * voxel_ml
    assert 5 in kept.counted_slices[0] and 5 not in excluded.counted_slices[0]
    assert kept.measurements["lv_edv_ml"] - excluded.measurements["lv_edv_ml"] == pytest.approx(basal_ml)
    assert excluded.slice_volumes[0][5]["LV"] == 0.0
    assert excluded.raw_frame_volumes[0]["LV"] == pytest.approx(kept.raw_frame_volumes[0]["LV"])
    # the bare basal slice's myocardium is not LV mass either (there is none); the ringed one's is
    assert kept.slice_volumes[0][5]["LV_Myocardium"] > 0


def test_the_convention_runs_at_every_frame():
    """The atrium that enters the basal slice in systole is left out at ES but the slice counts at ED."""
    frames = [heart([4, 8, 11, 13, 14], basal_radius=14)] + [heart([3, 6, 8, 9, 10], basal_radius=16, basal_ring=False)]
    report = measure_function(frames, ed=0, es=1)
    assert report.counted_slices == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4]]
    assert report.frame_volumes[1]["LV"] < report.raw_frame_volumes[1]["LV"]


def test_report_measurements_and_json_are_complete():
    frames = cine([1.0, 0.9, 0.75, 0.7, 0.8, 0.95])
    report = measure_function(frames)
    assert isinstance(report, CardiacReport)
    assert set(report.measurements) == set(MEASUREMENT_KEYS)
    assert (report.measurements["ed_frame"], report.measurements["es_frame"]) == (0, 3)
    edv, esv = report.frame_volumes[0]["LV"], report.frame_volumes[3]["LV"]
    assert report.measurements["lv_ef_percent"] == pytest.approx(100 * (edv - esv) / edv)
    assert len(report.slice_volumes) == 6 and len(report.slice_volumes[0]) == 6
    assert sum(s["LV"] for s in report.slice_volumes[2]) == pytest.approx(report.frame_volumes[2]["LV"])
    text = json.dumps(report.to_json())
    assert json.loads(text)["measurements"]["ed_frame"] == 0
    assert "SCMR" in report.convention


def test_measure_function_refuses_bad_input():
    with pytest.raises(IdealError, match="no frames"):
        measure_function([])
    good = heart([4, 8, 11])
    with pytest.raises(IdealError, match="not cardiac labels"):
        measure_function([good, good.with_array(np.full(good.array.shape, 7, np.uint8))])
    with pytest.raises(IdealError, match="outside the 2 frames"):
        measure_function([good, good], ed=0, es=2)
    with pytest.raises(IdealError, match="uncertainty maps for 2 frames"):
        measure_function([good, good], [None], ed=0, es=1)


def test_find_ed_es_on_a_known_curve():
    assert find_ed_es([80.0, 120.0, 95.0, 50.0, 70.0]) == (1, 3)
    with pytest.raises(IdealError, match="at least 2 frames"):
        find_ed_es([5.0])


def test_one_bad_slice_cannot_move_ed_es():
    """A basal slice that swells with atrium in systole moves the plain volume curve's minimum, not the robust one."""
    scale = np.array([1.0, 0.95, 0.85, 0.75, 0.7, 0.72, 0.8, 0.9])
    areas = np.outer(scale, [50, 150, 250, 320, 350, 360, 360])
    areas[5, 6] = 0.0  # a bad slice: the model lost the blood pool there in one frame
    counted = np.ones_like(areas, dtype=bool)
    assert find_ed_es(areas.sum(axis=1)) == (0, 5)
    assert find_ed_es_robust(areas, counted) == (0, 4)


def test_csv_has_one_schema_and_one_precision(tmp_path):
    report = measure_function(cine([1.0, 0.8, 0.7, 0.9]))
    report.flags.append(QualityFlag("example_flag", 1.23456, 1.0, "check slice 2", slices=(2,), frames=(1,)))
    path = write_function_csv(report_rows("case1", report), tmp_path / "m.csv")
    rows = list(csv.DictReader(path.open()))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert {row["row_type"] for row in rows} == {"summary", "frame", "slice", "flag"}
    flag = [row for row in rows if row["row_type"] == "flag"][-1]
    assert (flag["name"], flag["value"], flag["slices"]) == ("example_flag", "1.23", "2")
    numbers = [row["LV_ml"] for row in rows if row["row_type"] == "frame"]
    assert all(len(n.split(".")[1]) == 2 for n in numbers)
    with pytest.raises(IdealError, match="unknown measurement CSV columns"):
        write_function_csv([{"row_type": "frame", "bogus": 1}], tmp_path / "x.csv")
