"""The measurement table the command line prints and writes: volumes, EF, mass and the QC flags.

The whole-heart measurement (:func:`.function.measure_function`) as shown by ``segment``, ``measure``,
``--report`` and ``batch.py``; the formatting of its figures for people (:func:`format_table`) and
files (:func:`write_table`).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import IdealError

#: Units the table shows for a measurement key's last word.
_UNITS = {"ml": "ml", "percent": "%", "g": "g", "mm": "mm", "ml_m2": "ml/m²"}
_NAMES = {"lv": "LV", "rv": "RV", "ed": "ED", "es": "ES", "edv": "EDV", "esv": "ESV", "sv": "SV", "ef": "EF", "myocardial": "myocardial"}


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
    from .function import report_rows

    rows = []
    for row in report_rows("", report):
        if row["row_type"] == "summary":
            name, _ = _label(row["name"])
            unit = "" if row["unit"] == "frame" else row["unit"]
            value = row["value"]
            rows.append((name, str(int(value)) if row["unit"] == "frame" and value is not None else _number(value), unit))
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
        for flag in flags:
            where = "; ".join(part for part in (
                f"slices {', '.join(map(str, flag.slices))}" if flag.slices else "",
                f"frames {', '.join(map(str, flag.frames))}" if flag.frames else "",
            ) if part)
            lines.append(f"  ! {flag.name}: {flag.message}" + (f" ({where})" if where else ""))
    else:
        lines.append("QC: no flags")
    return "\n".join(lines)



def write_table(report, path: str | Path, source: str = "") -> Path:
    """Write the table atomically: ``.csv`` (the whole-heart CSV schema: summary, frame, slice and flag rows) or
    ``.json`` (the whole report, with its source)."""
    from ..io.atomic import atomic_path
    from .function import report_rows, write_function_csv

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise IdealError(f"{path}: the measurement table is written as .csv or .json")
    if suffix == ".csv":
        return write_function_csv(report_rows(source, report), path)
    with atomic_path(path) as temp:
        temp.write_text(json.dumps({"source": source, **report.to_json()}, indent=2))
    return path
