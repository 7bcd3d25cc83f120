"""A one-page picture report of one case (PNG or PDF): overlays, volume curve, table and QC flags.

Overlays at base, mid-ventricle and apex for end-diastole and end-systole (the slices holding the
heart at ED; the end with the larger LV blood pool is called base), the LV/RV volume of every frame,
the measurement table and the QC flags of :mod:`.table`. matplotlib draws it off-screen (Agg).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import IdealError
from ..io.atomic import atomic_path
from ..io.image import Image
from ..labels import CARDIAC_LABELS, LabelInfo
from .overlay import overlay_rgb
from .table import format_table

REPORT_SUFFIXES = (".png", ".pdf")


def heart_levels(labels: Image, lv_value: int = 3) -> dict[str, int]:
    """{'base', 'mid', 'apex'} -> slice index: the ends and middle of the slices holding any label; the end
    with more LV blood pool is the base."""
    axis = labels.slice_axis
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(np.any(labels.array > 0, axis=other))
    if present.size == 0:
        middle = labels.array.shape[axis] // 2
        return {"base": middle, "mid": middle, "apex": middle}
    first, last = int(present[0]), int(present[-1])
    lv = np.count_nonzero(labels.array == lv_value, axis=other)
    base, apex = (first, last) if lv[first] >= lv[last] else (last, first)
    return {"base": base, "mid": (first + last) // 2, "apex": apex}


def _frame_volumes(report, frames: int) -> dict[str, list[float]]:
    """LV and RV volume per frame from the report (whatever keys it uses for them)."""
    curves: dict[str, list[float]] = {}
    for row in list(getattr(report, "frame_volumes", []) or [])[:frames]:
        if isinstance(row, dict):
            for key, value in row.items():
                if isinstance(value, (int, float)) and key.lower().startswith(("lv", "rv")):
                    curves.setdefault(key, []).append(float(value))
    return curves


def write_case_report(
    images: Sequence[Image],
    labels: Sequence[Image],
    report,
    path: str | Path,
    *,
    ed: int,
    es: int,
    title: str = "",
    label_map: tuple[LabelInfo, ...] = CARDIAC_LABELS,
) -> Path:
    """Draw the report of one case (``images``/``labels``: every frame, or the ED/ES pair) to a PNG or PDF, atomically."""
    path = Path(path)
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise IdealError(f"{path}: a report is written as .png or .pdf")
    try:
        import matplotlib
    except ImportError:
        raise IdealError("--report needs matplotlib: pip install 'idealsegment[report]' (or pip install matplotlib)") from None
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 8.5), dpi=110)
    grid = figure.add_gridspec(3, 4, height_ratios=[1, 1, 1.1], width_ratios=[1, 1, 1, 1.3])
    levels = heart_levels(labels[ed])
    for row, (phase, index) in enumerate((("ED", ed), ("ES", es))):
        for column, (level, k) in enumerate(levels.items()):
            axes = figure.add_subplot(grid[row, column])
            axes.imshow(overlay_rgb(images[index], labels[index], k, label_map))
            axes.set_title(f"{phase} (frame {index}) {level}, slice {k}", fontsize=8)
            axes.axis("off")
    curve = figure.add_subplot(grid[0, 3])
    curves = _frame_volumes(report, len(labels))
    for key, values in curves.items():
        curve.plot(range(len(values)), values, marker="o", markersize=3, label=key)
    for index, name in ((ed, "ED"), (es, "ES")):
        curve.axvline(index, color="grey", linestyle=":", linewidth=1)
        curve.text(index, curve.get_ylim()[1], name, fontsize=7, ha="center", va="bottom")
    from matplotlib.ticker import MaxNLocator

    curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    curve.set_xlabel("frame", fontsize=8)
    curve.set_ylabel("volume (ml)", fontsize=8)
    curve.tick_params(labelsize=7)
    if curves:
        curve.legend(fontsize=7)
    legend = figure.add_subplot(grid[1, 3])
    legend.axis("off")
    for n, info in enumerate(label_map):
        legend.text(0.02, 0.9 - 0.15 * n, f"\u25a0 {info.name}", color=info.color, fontsize=9, transform=legend.transAxes)
    text = figure.add_subplot(grid[2, :])
    text.axis("off")
    text.text(0.0, 1.0, format_table(report), family="monospace", fontsize=8, va="top", transform=text.transAxes)
    if title:
        figure.suptitle(title, fontsize=11)
    with atomic_path(path) as temp:
        figure.savefig(str(temp), format=path.suffix.lower()[1:])
    return path
