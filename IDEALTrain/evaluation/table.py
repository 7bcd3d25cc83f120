"""The measurement table the command line prints and writes: volumes, EF, mass and the QC flags.

The one call into the whole-heart measurement (:func:`measure`), shared by ``segment``, ``measure``,
``--report`` and ``batch.py``; the formatting of its figures for people (:func:`format_table`) and
files (:func:`write_table`).
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import IdealError
from ..io.image import Image

#: Units the table shows for a measurement key's last word.
_UNITS = {"ml": "ml", "percent": "%", "g": "g", "mm": "mm", "ml_m2": "ml/m²"}
_NAMES = {"lv": "LV", "rv": "RV", "edv": "EDV", "esv": "ESV", "sv": "SV", "ef": "EF", "myocardial": "myocardial"}


def measure(frames: Sequence[Image], uncertainty: Sequence[Image] | None = None, *, ed: int | None = None, es: int | None = None):
    """The whole-heart measurement of a cine's label frames (or an ED/ES pair: ``frames=[ed, es], ed=0, es=1``)."""
    if not frames:
        raise IdealError("no label maps to measure")
    try:
        from .function import measure_function
    except ImportError:  # until issue 26's whole-heart measurement is merged
        return _FrameVolumes(list(frames), ed, es)
    return measure_function(list(frames), uncertainty, ed=ed, es=es)


class _FrameVolumes:
    """Interim report (same fields as issue 26's CardiacReport): ED = largest, ES = smallest LV volume."""

    convention = "all labelled voxels"

    def __init__(self, frames: list[Image], ed: int | None, es: int | None) -> None:
        from .metrics import cardiac_function, label_volume_ml

        self.frame_volumes = [{"lv_ml": label_volume_ml(f, 3), "rv_ml": label_volume_ml(f, 1)} for f in frames]
        lv = [v["lv_ml"] for v in self.frame_volumes]
        self.ed = ed if ed is not None else max(range(len(lv)), key=lv.__getitem__)
        self.es = es if es is not None else min(range(len(lv)), key=lv.__getitem__)
        self.measurements = {"ed_frame": self.ed, "es_frame": self.es, **cardiac_function(frames[self.ed], frames[self.es])}
        self.slice_volumes: list = []
        self.flags: list = []

    def to_json(self) -> dict:
        return {"measurements": self.measurements, "frame_volumes": self.frame_volumes, "flags": [], "convention": self.convention}


def _label(key: str) -> tuple[str, str]:
    """('LV EDV', 'ml') from 'lv_edv_ml'."""
    words = key.split("_")
    unit = ""
    for suffix, shown in _UNITS.items():
        if key.endswith("_" + suffix):
            unit, words = shown, key[: -len(suffix) - 1].split("_")
            break
    return " ".join(_NAMES.get(w, w) for w in words), unit


def _number(value) -> str:
    """A figure as people read it (never ``np.float64(...)``); '-' when undefined."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    try:
        return f"{float(value):.1f}"
    except (TypeError, ValueError):
        return str(value)


def table_rows(report) -> list[tuple[str, str, str]]:
    """(measurement, value, unit) rows of a report, in the report's order."""
    rows = []
    for key, value in report.measurements.items():
        if isinstance(value, (dict, list)):
            continue
        name, unit = _label(key)
        rows.append((name, _number(value), unit))
    return rows


def format_table(report, title: str = "") -> str:
    """The table as aligned text lines, the QC flags below it (or 'QC: no flags')."""
    rows = table_rows(report)
    width = max([len(name) for name, _, _ in rows] + [10])
    lines = [title] if title else []
    lines += [f"  {name:<{width}}  {value:>8} {unit}".rstrip() for name, value, unit in rows]
    flags = list(getattr(report, "flags", []) or [])
    if flags:
        lines.append(f"QC: {len(flags)} flag(s)")
        lines += [f"  ! {flag.name}: {flag.message}" for flag in flags]
    else:
        lines.append("QC: no flags")
    return "\n".join(lines)


def report_json(report) -> dict:
    """The report as a JSON-ready dict (plain Python numbers only)."""
    return json.loads(json.dumps(report.to_json(), default=_plain))


def _plain(value):
    try:
        return value.item()  # numpy scalars
    except AttributeError:
        return str(value)


def write_table(report, path: str | Path, source: str = "") -> Path:
    """Write the table atomically: ``.csv`` (one row per measurement, flags after) or ``.json`` (the whole report)."""
    from ..io.atomic import atomic_path

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise IdealError(f"{path}: the measurement table is written as .csv or .json")
    if suffix == ".json":
        text = json.dumps({"source": source, **report_json(report)}, indent=2)
    else:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["source", "measurement", "value", "unit"])
        for key, value in report.measurements.items():
            if not isinstance(value, (dict, list)):
                writer.writerow([source, key, _number(value) if value is not None else "", _label(key)[1]])
        for flag in getattr(report, "flags", []) or []:
            writer.writerow([source, f"qc:{flag.name}", _number(flag.value), flag.message])
        text = buffer.getvalue()
    with atomic_path(path) as temp:
        temp.write_text(text)
    return path
