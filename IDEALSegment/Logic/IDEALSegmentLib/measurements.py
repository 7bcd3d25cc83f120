"""Cardiac function from label maps: ED/ES frames, LV/RV volumes, ejection fractions, myocardial mass, QC flags.

The numbers come from IDEALTrain's whole-heart :func:`IDEALTrain.evaluation.function.measure_function`
(one convention for the Slicer module, the batch script, the CLI and the benchmarks); this module reads
labels back from segmentation nodes, puts the results into a table node that Slicer shows and saves,
and words the quality-control flags for the panel.
"""
from __future__ import annotations

import math

import numpy as np
import vtk

from IDEALTrain.errors import IdealError
from IDEALTrain.evaluation.function import (
    CardiacReport,
    QualityFlag,
    find_ed_es,  # noqa: F401  (one definition; re-exported for the Logic)
    measure_function,
)
from IDEALTrain.evaluation.metrics import MYOCARDIAL_DENSITY_G_PER_ML
from IDEALTrain.io.image import Image
from IDEALTrain.labels import CARDIAC_LABELS

from .segmentations import labels_from_segmentation
from .volumes import unique_node_name

#: Measurement key -> (row name, unit), in table order. Keys are those of ``cardiac_function``
#: plus the frame indices a cine adds.
MEASUREMENTS: dict[str, tuple[str, str]] = {
    "lv_edv_ml": ("LV end-diastolic volume (EDV)", "ml"),
    "lv_esv_ml": ("LV end-systolic volume (ESV)", "ml"),
    "lv_sv_ml": ("LV stroke volume (SV)", "ml"),
    "lv_ef_percent": ("LV ejection fraction (EF)", "%"),
    "rv_edv_ml": ("RV end-diastolic volume (EDV)", "ml"),
    "rv_esv_ml": ("RV end-systolic volume (ESV)", "ml"),
    "rv_sv_ml": ("RV stroke volume (SV)", "ml"),
    "rv_ef_percent": ("RV ejection fraction (EF)", "%"),
    "myocardial_mass_g": (f"LV myocardial mass at ED ({MYOCARDIAL_DENSITY_G_PER_ML} g/ml)", "g"),
    "ed_frame": ("End-diastolic (ED) frame", "frame index"),
    "es_frame": ("End-systolic (ES) frame", "frame index"),
}

_VALID_LABELS = [0] + [label.value for label in CARDIAC_LABELS]


def _check_labels(labels: Image, what: str) -> None:
    """Refuse anything that is not a cardiac label map (values 0-3)."""
    if not isinstance(labels, Image):
        raise IdealError(f"the {what} labels must be an Image, got {type(labels).__name__}")
    unknown = np.setdiff1d(np.unique(labels.array), _VALID_LABELS)
    if unknown.size:
        raise IdealError(
            f"the {what} labels hold values {unknown.tolist()} that are not cardiac labels {_VALID_LABELS} "
            "(0 background, 1 RV, 2 LV myocardium, 3 LV blood pool)"
        )


def pair_report(ed_labels: Image, es_labels: Image, ed_uncertainty: Image | None = None) -> CardiacReport:
    """The whole-heart report of an ED/ES pair (convention, per-slice volumes, QC flags)."""
    _check_labels(ed_labels, "end-diastolic")
    _check_labels(es_labels, "end-systolic")
    return measure_function([ed_labels, es_labels], [ed_uncertainty, None], ed=0, es=1)


def cardiac_measurements(ed_labels: Image, es_labels: Image) -> dict[str, float | None]:
    """LV/RV EDV, ESV, SV (ml), EF (%) and LV myocardial mass at ED (g) by the whole-heart convention; EF is None when EDV is 0."""
    measured = pair_report(ed_labels, es_labels).measurements
    return {key: value for key, value in measured.items() if key not in ("ed_frame", "es_frame")}


def report_from_segmentations(ed_segmentation: object, ed_volume: object, es_segmentation: object, es_volume: object,
                              ed_uncertainty: Image | None = None) -> CardiacReport:
    """:func:`pair_report` of two segmentation nodes, each read back on its own volume's grid."""
    ed_labels = labels_from_segmentation(ed_segmentation, ed_volume, CARDIAC_LABELS)
    es_labels = labels_from_segmentation(es_segmentation, es_volume, CARDIAC_LABELS)
    return pair_report(ed_labels, es_labels, ed_uncertainty)


def measurements_from_segmentations(ed_segmentation: object, ed_volume: object, es_segmentation: object, es_volume: object) -> dict:
    """:func:`cardiac_measurements` of two segmentation nodes, each read back on its own volume's grid."""
    measured = report_from_segmentations(ed_segmentation, ed_volume, es_segmentation, es_volume).measurements
    return {key: value for key, value in measured.items() if key not in ("ed_frame", "es_frame")}


def flags_text(report: CardiacReport | None) -> str:
    """The QC flags as lines for the panel beside the measurement table ('' before any measurement)."""
    if report is None:
        return ""
    if not report.flags:
        return f"Quality control: no flag raised ({report.convention.split(':')[0]})."
    lines = [f"Quality control: {len(report.flags)} flag(s) - check before using these numbers:"]
    lines += [f"- {flag_line(flag)}" for flag in report.flags]
    return "\n".join(lines)


def flag_line(flag: QualityFlag) -> str:
    """One flag in words: its message, then its value against its threshold."""
    return f"{flag.message} [{flag.name}: {flag.value:.3g} vs {flag.threshold:.3g}]"


def _table_value(key: str, value: object) -> float:
    """A measurement as a float for the table (NaN when undefined); refuses non-numbers."""
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise IdealError(f"measurement {key!r} must be a number or None, got {value!r}")
    return float(value)


def measurements_table(scene: object, measurements: dict, name: str = "IDEALSegment measurements") -> object:
    """A NEW table node (unique name) with one row per measurement: Measurement, Value, Unit.

    Rows follow :data:`MEASUREMENTS` order; an undefined value (e.g. EF with no LV) is left empty.
    """
    if scene is None:
        raise IdealError("no scene to add the measurements table to")
    columns = _table_columns(measurements)
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", unique_node_name(scene, name))
    _fill(table, columns)
    return table


def update_measurements_table(table: object, measurements: dict) -> None:
    """Replace the rows of a measurements table in place (after corrections), keeping the node and its name."""
    columns = _table_columns(measurements)
    was_modifying = table.StartModify()
    table.RemoveAllColumns()
    _fill(table, columns)
    table.EndModify(was_modifying)


def _table_columns(measurements: dict) -> tuple:
    """The Measurement, Value and Unit columns for ``measurements`` (checked)."""
    unknown = [key for key in measurements if key not in MEASUREMENTS]
    if unknown:
        raise IdealError(f"unknown measurements {unknown}; known ones are {list(MEASUREMENTS)}")
    if not measurements:
        raise IdealError("no measurements to put in a table")
    rows = [(key, _table_value(key, measurements[key])) for key in MEASUREMENTS if key in measurements]
    names, values, units = vtk.vtkStringArray(), vtk.vtkDoubleArray(), vtk.vtkStringArray()
    names.SetName("Measurement")
    values.SetName("Value")
    units.SetName("Unit")
    for key, value in rows:
        names.InsertNextValue(MEASUREMENTS[key][0])
        values.InsertNextValue(value)
        units.InsertNextValue(MEASUREMENTS[key][1])
    return names, values, units


def _fill(table: object, columns: tuple) -> None:
    was_modifying = table.StartModify()
    for column in columns:
        table.AddColumn(column)
    table.SetColumnDescription("Value", "empty where undefined (e.g. EF when the EDV is 0)")
    table.EndModify(was_modifying)


def cine_measurements(browser: object, volume_sequence: object, segmentation_sequence: object) -> dict:
    """ED/ES frames and cardiac function of a segmented cine as it is now (the user's corrections included)."""
    return dict(cine_report(browser, volume_sequence, segmentation_sequence).measurements)


def cine_report(browser: object, volume_sequence: object, segmentation_sequence: object) -> CardiacReport:
    """The whole-heart report of a segmented cine as it is now (the user's corrections included).

    Every frame's segmentation is read on its frame's grid; the browser's current frame is read
    from its proxy nodes, which hold any edit not yet saved into the sequence.
    """
    count = segmentation_sequence.GetNumberOfDataNodes()
    if count != volume_sequence.GetNumberOfDataNodes():
        raise IdealError(f"the cine has {volume_sequence.GetNumberOfDataNodes()} frames but its segmentation {count}")
    current = browser.GetSelectedItemNumber()
    labels = []
    for index in range(count):
        value = volume_sequence.GetNthIndexValue(index)
        if index == current and browser.GetProxyNode(segmentation_sequence) is not None:
            segmentation, volume = browser.GetProxyNode(segmentation_sequence), browser.GetProxyNode(volume_sequence)
        else:
            segmentation, volume = segmentation_sequence.GetDataNodeAtValue(value), volume_sequence.GetNthDataNode(index)
        labels.append(labels_from_segmentation(segmentation, volume, CARDIAC_LABELS))
    return measure_function(labels)


def table_measurements(table: object) -> dict[str, float | None]:
    """The measurements held in a table made by :func:`measurements_table` (NaN read back as None)."""
    by_name = {row_name: key for key, (row_name, _) in MEASUREMENTS.items()}
    result: dict[str, float | None] = {}
    contents = table.GetTable()
    names, values = contents.GetColumnByName("Measurement"), contents.GetColumnByName("Value")
    if names is None or values is None:
        raise IdealError(f"table '{table.GetName()}' has no Measurement and Value columns: it is not a measurements table")
    for row in range(contents.GetNumberOfRows()):
        key = by_name.get(names.GetValue(row))
        if key is not None:
            value = float(values.GetValue(row))
            result[key] = None if math.isnan(value) else value
    return result
