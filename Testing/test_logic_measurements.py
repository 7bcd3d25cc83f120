"""Cardiac measurements on real MRML (slicer-core): ED/ES choice, volumes and EF on phantom ground truth, table node."""
from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import import_slicer_core  # noqa: E402

slicer = import_slicer_core()

from IDEALSegmentLib.measurements import (  # noqa: E402
    MEASUREMENTS,
    cardiac_measurements,
    find_ed_es,
    measurements_from_segmentations,
    measurements_table,
    table_measurements,
)
from IDEALSegmentLib.segmentations import segmentation_from_labels  # noqa: E402
from IDEALSegmentLib.volumes import volume_from_image  # noqa: E402

from IDEALTrain.errors import IdealError  # noqa: E402
from IDEALTrain.evaluation.function import measure_function  # noqa: E402
from IDEALTrain.evaluation.metrics import label_volume_ml  # noqa: E402
from IDEALTrain.io.phantom import make_phantom_pair  # noqa: E402


@pytest.fixture(scope="module")
def pair():
    """A small oblique, anisotropic phantom heart at ED and ES (known label volumes)."""
    return make_phantom_pair(11, size=(64, 56, 8), spacing=(1.5, 1.4, 8.0))


def node_ids(scene):
    return sorted(scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes()))


def test_find_ed_es_on_a_known_curve():
    assert find_ed_es([80.0, 120.0, 95.0, 50.0, 70.0]) == (1, 3)
    assert find_ed_es([3, 1]) == (0, 1)
    assert find_ed_es([10.0, 30.0, 30.0, 5.0, 5.0]) == (1, 3)  # ties: the first frame


@pytest.mark.parametrize(
    "curve, message",
    [
        ([42.0], "at least 2 frames, got 1"),
        ([], "at least 2 frames, got 0"),
        ([0.0, 0.0, 0.0], "no LV blood pool was found in any of the 3 frames"),
        ([55.0, 55.0], "55 ml in every frame"),
        ([10.0, float("nan")], "finite and >= 0"),
        ([10.0, -1.0], "finite and >= 0"),
    ],
)
def test_find_ed_es_refuses_degenerate_curves(curve, message):
    with pytest.raises(IdealError, match=message):
        find_ed_es(curve)


def test_cardiac_measurements_on_phantom_ground_truth(pair):
    result = cardiac_measurements(pair.ed_label, pair.es_label)
    whole_heart = measure_function([pair.ed_label, pair.es_label], ed=0, es=1).measurements
    assert result == {key: value for key, value in whole_heart.items() if key not in ("ed_frame", "es_frame")}
    voxel_ml = 1.5 * 1.4 * 8.0 / 1000.0
    lv_edv = np.count_nonzero(pair.ed_label.array == 3) * voxel_ml
    lv_esv = np.count_nonzero(pair.es_label.array == 3) * voxel_ml
    # the phantom's ventricles are ringed throughout: the convention keeps (nearly) every voxel
    assert result["lv_edv_ml"] == pytest.approx(lv_edv) and result["lv_esv_ml"] == pytest.approx(lv_esv, rel=0.01)
    assert result["lv_sv_ml"] == pytest.approx(result["lv_edv_ml"] - result["lv_esv_ml"])
    assert result["lv_ef_percent"] == pytest.approx(100 * (lv_edv - lv_esv) / lv_edv, abs=0.1)
    assert 40.0 < result["lv_ef_percent"] < 75.0  # the phantom's documented range
    assert result["rv_edv_ml"] == pytest.approx(label_volume_ml(pair.ed_label, 1))
    assert result["rv_edv_ml"] > result["rv_esv_ml"] > 0
    assert result["myocardial_mass_g"] == pytest.approx(np.count_nonzero(pair.ed_label.array == 2) * voxel_ml * 1.05)


def test_cardiac_measurements_refuse_foreign_labels(pair):
    with pytest.raises(IdealError, match=r"end-systolic labels hold values \[7\]"):
        cardiac_measurements(pair.ed_label, pair.es_label.with_array(np.full(pair.es_label.array.shape, 7, np.uint8)))


def test_empty_ventricles_give_undefined_ejection_fraction(pair):
    empty = pair.ed_label.with_array(np.zeros_like(pair.ed_label.array))
    result = cardiac_measurements(empty, empty)
    assert result["lv_edv_ml"] == 0.0 and result["lv_ef_percent"] is None and result["rv_ef_percent"] is None


def test_measurements_from_segmentation_nodes(pair):
    scene = slicer.vtkMRMLScene()
    ed_volume = volume_from_image(pair.ed_image, scene, "ED")
    es_volume = volume_from_image(pair.es_image, scene, "ES")
    ed_segmentation = segmentation_from_labels(pair.ed_label, ed_volume)
    es_segmentation = segmentation_from_labels(pair.es_label, es_volume)
    before = node_ids(scene)
    result = measurements_from_segmentations(ed_segmentation, ed_volume, es_segmentation, es_volume)
    assert result == cardiac_measurements(pair.ed_label, pair.es_label)
    assert node_ids(scene) == before  # measuring adds nothing
    # A user's correction changes the numbers: clear the ES LV.
    es_segmentation.GetSegmentation().RemoveSegment("LV")
    with pytest.raises(IdealError, match=r"no segment with ID \['LV'\]"):
        measurements_from_segmentations(ed_segmentation, ed_volume, es_segmentation, es_volume)


def test_measurements_table_rows_units_and_values(pair):
    scene = slicer.vtkMRMLScene()
    measurements = {**cardiac_measurements(pair.ed_label, pair.es_label), "ed_frame": 0, "es_frame": 3}
    table = measurements_table(scene, measurements)
    assert table.IsA("vtkMRMLTableNode") and table.GetName() == "IDEALSegment measurements"
    contents = table.GetTable()
    assert [contents.GetColumnName(c) for c in range(contents.GetNumberOfColumns())] == ["Measurement", "Value", "Unit"]
    assert contents.GetNumberOfRows() == len(MEASUREMENTS)
    rows = {
        contents.GetValue(row, 0).ToString(): (contents.GetValue(row, 1).ToDouble(), contents.GetValue(row, 2).ToString())
        for row in range(contents.GetNumberOfRows())
    }
    assert rows["LV ejection fraction (EF)"] == (pytest.approx(measurements["lv_ef_percent"]), "%")
    assert rows["LV end-diastolic volume (EDV)"] == (pytest.approx(measurements["lv_edv_ml"]), "ml")
    assert rows["RV stroke volume (SV)"] == (pytest.approx(measurements["rv_sv_ml"]), "ml")
    assert rows["LV myocardial mass at ED (1.05 g/ml)"] == (pytest.approx(measurements["myocardial_mass_g"]), "g")
    assert rows["End-systolic (ES) frame"] == (3.0, "frame index")
    assert table_measurements(table) == pytest.approx(measurements)
    assert measurements_table(scene, measurements).GetName() == "IDEALSegment measurements_1"  # never replaces


def test_undefined_values_stay_empty_and_bad_input_adds_nothing():
    scene = slicer.vtkMRMLScene()
    table = measurements_table(scene, {"lv_edv_ml": 0.0, "lv_ef_percent": None}, name="empty heart")
    assert math.isnan(table.GetTable().GetValue(1, 1).ToDouble())
    assert table_measurements(table) == {"lv_edv_ml": 0.0, "lv_ef_percent": None}
    before = node_ids(scene)
    with pytest.raises(IdealError, match=r"unknown measurements \['lv_ef'\]"):
        measurements_table(scene, {"lv_ef": 50.0})
    with pytest.raises(IdealError, match="must be a number or None"):
        measurements_table(scene, {"lv_edv_ml": "120"})
    with pytest.raises(IdealError, match="no measurements"):
        measurements_table(scene, {})
    assert node_ids(scene) == before
