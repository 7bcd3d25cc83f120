"""Clicks for click-to-fix refinement: the JSON contract, and points (LPS mm) to voxels.

Light on purpose (numpy only): Slicer's process reads and writes clicks without torch or the engines.
The document is ``{"clicks": [{"point": [x, y, z], "label": L, "positive": true|false}, ...]}``.
A point is in LPS millimetres unless the document (or the click) says ``"space": "ras"`` (RAS mm,
Slicer's coordinates) or ``"space": "ijk"`` (voxel indices i, j, k as a viewer shows them, from 0);
:func:`in_lps` turns them into LPS on the image they are clicked on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import IdealError
from ..io.image import Image


@dataclass(frozen=True)
class Click:
    """One click: a point (LPS mm), the structure's label value, and whether it adds or removes it."""

    point: tuple[float, float, float]
    label: int
    positive: bool = True
    space: str = "lps"  # "lps" / "ras" (mm) or "ijk" (voxel indices); in_lps() converts

    def to_json(self) -> dict:
        data = {"point": [float(v) for v in self.point], "label": int(self.label), "positive": bool(self.positive)}
        return data if self.space == "lps" else {**data, "space": self.space}


#: Coordinate spaces a click's point may be given in.
SPACES = ("lps", "ras", "ijk")


#: Bounds of a clicks document: a hostile file is one line, never a RecursionError or an overflow.
MAX_CLICKS_BYTES = 1 << 20
MAX_CLICKS = 10_000
MAX_DEPTH = 8  # the document itself nests 4 deep
MAX_COORDINATE_MM = 1e6
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _number(value: object) -> bool:
    """A JSON number (not a boolean) within +-MAX_COORDINATE_MM (NaN, inf and 400-digit integers are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -MAX_COORDINATE_MM <= value <= MAX_COORDINATE_MM


def parse_clicks(data: object) -> list[Click]:
    """Clicks from the ``{"clicks": [{"point": [x, y, z], "label": L, "positive": bool}, ...]}`` document."""
    if not isinstance(data, dict) or not isinstance(data.get("clicks"), list):
        raise IdealError(
            'clicks must be a JSON object {"clicks": [{"point": [x, y, z], "label": L, "positive": true}]}'
        )
    default_space = _space(data.get("space", "lps"), "the clicks document")
    if len(data["clicks"]) > MAX_CLICKS:
        raise IdealError(f"{len(data['clicks'])} clicks: at most {MAX_CLICKS} are read")
    clicks = []
    for n, item in enumerate(data["clicks"]):
        if not isinstance(item, dict) or "point" not in item or "label" not in item:
            raise IdealError(f"click {n}: needs a 'point' [x, y, z] and a 'label'")
        point, label, positive = item["point"], item["label"], item.get("positive", True)
        space = _space(item.get("space", default_space), f"click {n}")
        if not isinstance(point, list) or len(point) != 3 or not all(_number(v) for v in point):
            shown = repr(point) if len(repr(point)) <= 80 else repr(point)[:77] + "..."
            unit = "voxel indices (ijk)" if space == "ijk" else f"mm ({space.upper()})"
            raise IdealError(f"click {n}: 'point' must be three finite numbers within +-{MAX_COORDINATE_MM:g} {unit}, got {shown}")
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label <= 255:
            shown = repr(label) if len(repr(label)) <= 40 else repr(label)[:37] + "..."
            raise IdealError(f"click {n}: 'label' must be an integer label value 0-255, got {shown}")
        if not isinstance(positive, bool):
            raise IdealError(f"click {n}: 'positive' must be true or false, got {positive!r}")
        clicks.append(Click(tuple(float(v) for v in point), label, positive, space))
    return clicks


def _space(value: object, where: str) -> str:
    if not isinstance(value, str) or value.lower() not in SPACES:
        raise IdealError(f"{where}: 'space' must be one of {', '.join(SPACES)} (LPS or RAS mm, or voxel indices), got {value!r}")
    return value.lower()


def in_lps(clicks: list[Click], image: Image) -> list[Click]:
    """The clicks with their points in LPS mm on ``image`` (RAS flips x and y; ijk goes through the image geometry)."""
    converted = []
    for click in clicks:
        if click.space == "ras":
            point = (-click.point[0], -click.point[1], click.point[2])
        elif click.space == "ijk":
            ijk = np.asarray(click.point, float)
            if np.any(ijk < -0.5) or np.any(ijk > np.array(image.size) - 0.5):
                raise IdealError(f"click at voxel {tuple(click.point)} (i, j, k) is outside the image of size {image.size}")
            point = tuple(float(v) for v in (image.index_to_physical @ np.array([*ijk, 1.0]))[:3])
        else:
            point = click.point
        converted.append(Click(tuple(float(v) for v in point), click.label, click.positive))
    return converted


def read_clicks(path: str | Path) -> list[Click]:
    """Clicks from a JSON file; a missing or malformed file is an IdealError."""
    path = Path(path)
    if not path.is_file():
        raise IdealError(f"clicks file not found: {path}")
    if path.stat().st_size > MAX_CLICKS_BYTES:
        raise IdealError(f"{path}: {path.stat().st_size} bytes is too large for a clicks file (at most {MAX_CLICKS_BYTES})")
    raw = path.read_bytes()
    if _depth(raw) > MAX_DEPTH:
        raise IdealError(f"{path}: nested more than {MAX_DEPTH} levels deep; not a clicks file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise IdealError(f"{path}: not valid JSON ({str(error)[:200]})") from None
    try:
        return parse_clicks(data)
    except IdealError as error:
        raise IdealError(f"{path}: {error}") from None


def _depth(raw: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (strings skipped), without parsing it."""
    brackets = np.frombuffer(_STRINGS.sub(b'""', raw), np.uint8)
    steps = np.isin(brackets, (ord("["), ord("{"))).astype(np.int64) - np.isin(brackets, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def clicks_document(clicks: list[Click]) -> dict:
    """The JSON document of ``clicks`` (what :func:`parse_clicks` reads)."""
    return {"clicks": [c.to_json() for c in clicks]}


def voxel_of(image: Image, point: tuple[float, float, float]) -> tuple[int, int, int]:
    """(k, j, i) index of the voxel holding an LPS point; a point outside the image is an IdealError."""
    ijk = np.linalg.solve(image.index_to_physical, np.array([*point, 1.0]))[:3]
    index = np.floor(ijk + 0.5).astype(int)
    if np.any(index < 0) or np.any(index >= np.array(image.size)):
        raise IdealError(
            f"click point {tuple(round(float(v), 2) for v in point)} mm is outside the image "
            f"(voxel index {tuple(round(float(v), 1) for v in ijk)}, size {image.size})"  # plain numbers, not np.float64(...)
        )
    return int(index[2]), int(index[1]), int(index[0])
