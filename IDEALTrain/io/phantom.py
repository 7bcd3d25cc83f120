"""Synthetic short-axis cine MRI phantoms with ACDC labels: the embedded data for demos and tests.

Each phantom is an oblique, anisotropic 3D stack (slices along k) with an LV blood pool, a
myocardial ring and an RV crescent, drawn in physical millimetres so the anatomy does not depend
on the voxel spacing. Everything random comes from ``np.random.default_rng(seed)``: the same seed
always gives the same voxels and geometry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import IdealError
from .atomic import check_outputs
from .image import Image
from .volume_files import write_image

RV, MYO, LV = 1, 2, 3  # ACDC label values

_MIN_RADIUS = 1e-3  # mm: a structure tapered to nothing draws no voxel


class PhantomPair(NamedTuple):
    """End-diastolic and end-systolic frames of one phantom heart on the same voxel grid."""

    ed_image: Image
    ed_label: Image
    es_image: Image
    es_label: Image


@dataclass(frozen=True)
class _Heart:
    """The heart in one cardiac phase; lengths in mm, slice positions measured along k."""

    base: float  # slice-axis position of the mitral (base) plane
    cavity: tuple[float, float]  # LV blood-pool semi-axes at the base
    cavity_length: float  # base to the cavity apex
    wall: float  # mean myocardial thickness
    apex_wall: float  # myocardial thickness at the apex
    rv_thickness: float  # RV cavity depth beyond the LV epicardium at the base
    rv_width: float  # RV semi-axis across the septum
    rv_length: float  # base to the RV apex


@dataclass(frozen=True)
class _Scene:
    """Everything drawn once per seed and shared by both cardiac phases."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    centre: tuple[float, float]  # LV axis at slice position 0, in-plane mm
    tilt: tuple[float, float]  # in-plane drift of the LV axis per mm along k
    angle: float  # LV ellipse orientation
    wall_angle: float  # direction of the thickest wall
    wall_variation: float  # relative wall-thickness modulation around the ring
    rv_angle: float  # direction from the LV axis to the RV
    rv_offset: float  # RV ellipse centre distance, as a fraction of the epicardial radius
    rv_wall: float  # RV free-wall thickness (drawn, not labelled)
    papillary: tuple[float, float, float]  # two angles and a radius
    ed: _Heart
    es: _Heart
    blood: float
    rv_blood: float
    myocardium: float
    background: list[tuple[tuple[float, ...], float]]  # (ellipsoid, intensity), painted in order
    bias: np.ndarray  # log-bias coefficients: x, y, z, x^2, y^2, xy
    noise: float  # Rician noise sigma relative to LV blood
    gain: float


def make_phantom(
    seed: int,
    size: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> tuple[Image, Image]:
    """One end-diastolic phantom: (float32 image, uint8 ACDC label) on an oblique grid.

    ``size`` (i, j, k voxels) and ``spacing`` (i, j, k mm) override the random defaults
    (128-192 in-plane, 8-12 slices; 1.2-1.6 mm in-plane, 6-10 mm between slices) without
    changing any other random choice. It equals the ED frame of ``make_phantom_pair(seed)``.
    """
    rng = np.random.default_rng(seed)
    scene = _draw_scene(rng, size, spacing)
    return _render(scene, scene.ed, rng)


def make_phantom_pair(
    seed: int,
    size: tuple[int, int, int] | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> PhantomPair:
    """ED and ES frames of one heart: at ES the cavities shrink and the myocardium thickens.

    The myocardial volume is roughly conserved and the LV ejection fraction is about 45-70 %.
    """
    rng = np.random.default_rng(seed)
    scene = _draw_scene(rng, size, spacing)
    ed_image, ed_label = _render(scene, scene.ed, rng)
    es_image, es_label = _render(scene, scene.es, rng)
    return PhantomPair(ed_image, ed_label, es_image, es_label)


def case_seed(seed: int, case: int) -> int:
    """The phantom seed of case number ``case`` in a data set generated from ``seed``."""
    return int(np.random.SeedSequence((seed, case)).generate_state(1)[0])


def write_phantom_dataset(
    out_dir: str | Path, cases: int, seed: int, *, pairs: bool = False, overwrite: bool = False
) -> list[Path]:
    """Write ``images/<name>.nii.gz`` and ``labels/<name>.nii.gz`` per case; return the image paths.

    Names are ``phantom_0000`` ..., or ``phantom_0000_ED`` / ``phantom_0000_ES`` with ``pairs``.
    The label of an image is the file of the same name under ``labels/``. Existing files of those
    names are refused (before anything is written) unless ``overwrite``.
    """
    if cases < 1:
        raise IdealError(f"--cases must be at least 1, got {cases}")
    out = Path(out_dir)
    names = [f"phantom_{case:04d}{suffix}" for case in range(cases) for suffix in (("_ED", "_ES") if pairs else ("",))]
    check_outputs([out / part / f"{name}.nii.gz" for part in ("images", "labels") for name in names], overwrite,
                  hint="choose another --out or pass --overwrite")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    written = []
    for case in range(cases):
        name = f"phantom_{case:04d}"
        if pairs:
            pair = make_phantom_pair(case_seed(seed, case))
            frames = [(f"{name}_ED", pair.ed_image, pair.ed_label), (f"{name}_ES", pair.es_image, pair.es_label)]
        else:
            frames = [(name, *make_phantom(case_seed(seed, case)))]
        for frame, image, label in frames:
            write_image(image, out / "images" / f"{frame}.nii.gz")
            write_image(label, out / "labels" / f"{frame}.nii.gz")
            written.append(out / "images" / f"{frame}.nii.gz")
    return written


# -- random choices ---------------------------------------------------------------------------
def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A random oblique rotation matrix (det +1): QR of a Gaussian, redrawn while nearly axis-aligned."""
    while True:
        q, r = np.linalg.qr(rng.standard_normal((3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        if np.abs(q).max() < 0.98:
            return q


def _draw_scene(
    rng: np.random.Generator,
    size: tuple[int, int, int] | None,
    spacing: tuple[float, float, float] | None,
) -> _Scene:
    """Draw geometry, anatomy, contrast and artefacts; overrides never shift the random stream."""
    u = rng.uniform
    drawn_size = (int(rng.integers(128, 193)), int(rng.integers(128, 193)), int(rng.integers(8, 13)))
    in_plane = u(1.2, 1.6)
    drawn_spacing = (in_plane, in_plane * u(0.97, 1.03), u(6.0, 10.0))
    size = tuple(int(n) for n in size) if size is not None else drawn_size
    spacing = tuple(float(s) for s in spacing) if spacing is not None else drawn_spacing
    origin = tuple(u(-200.0, 200.0, 3))
    direction = _random_rotation(rng)
    fov = (size[0] * spacing[0], size[1] * spacing[1])
    coverage = size[2] * spacing[2]

    # End diastole: LV half-ellipsoids (cavity, epicardium) cut by the base plane.
    a = u(22.0, 30.0)
    cavity = (a, a * u(0.8, 0.95))
    wall = u(6.0, 12.0)
    apex_wall = wall * u(0.6, 0.9)
    length = max(min(u(65.0, 95.0), coverage - u(0.3, 1.0) * spacing[2]), 2.0 * apex_wall + 10.0)
    room = (size[2] - 0.2) * spacing[2] - length
    base = -0.3 * spacing[2] + u(0.0, 1.0) * float(np.clip(room, 0.0, 1.5 * spacing[2]))
    epi_radius = sum(cavity) / 2 + wall
    ed = _Heart(
        base=base,
        cavity=cavity,
        cavity_length=length - apex_wall,
        wall=wall,
        apex_wall=apex_wall,
        rv_thickness=u(12.0, 26.0),
        rv_width=epi_radius * u(1.2, 1.6),
        rv_length=(length - apex_wall) * u(0.6, 0.85),
    )
    es = _systole(ed, ejection=u(0.52, 0.64), shortening=u(0.88, 0.95), rv_squeeze=u(0.35, 0.5),
                  rv_narrowing=u(0.8, 0.9))

    tilt = tuple(u(-0.15, 0.15, 2))
    reach = epi_radius + ed.rv_thickness + 10.0 + 0.15 * coverage
    centre = tuple(
        u(reach, extent - reach) if extent > 2 * reach else extent / 2 for extent in fov
    )
    return _Scene(
        size=size,
        spacing=spacing,
        origin=origin,
        direction=direction,
        centre=centre,
        tilt=tilt,
        angle=u(0.0, np.pi),
        wall_angle=u(0.0, 2 * np.pi),
        wall_variation=u(0.0, 0.25),
        rv_angle=np.pi + u(-0.6, 0.6),
        rv_offset=u(0.5, 0.8),
        rv_wall=u(2.5, 4.0),
        papillary=(u(0.0, 2 * np.pi), u(0.0, 2 * np.pi), u(3.0, 5.0)),
        ed=ed,
        es=es,
        blood=1.0,  # LV blood is the intensity reference
        rv_blood=u(0.85, 1.0),
        myocardium=u(0.15, 0.35),
        background=_draw_background(rng, centre, epi_radius, coverage, base),
        bias=np.concatenate([rng.normal(0.0, 0.2, 3), rng.normal(0.0, 0.1, 3)]),
        noise=u(0.02, 0.06),
        gain=float(np.exp(u(np.log(100.0), np.log(3000.0)))),
    )


def _systole(ed: _Heart, ejection: float, shortening: float, rv_squeeze: float, rv_narrowing: float) -> _Heart:
    """End-systolic heart: the apex stays, the base descends, cavities shrink, the wall thickens.

    The wall thickness solves (a+w)(b+w)(L+k w) - a b L = ED myocardial volume (half-ellipsoid
    shells share the factor 2 pi / 3), with the apical wall growing in proportion (k).
    """
    length = ed.cavity_length * shortening
    scale = np.sqrt((1.0 - ejection) / shortening)
    a, b = ed.cavity[0] * scale, ed.cavity[1] * scale
    (a0, b0), w0 = ed.cavity, ed.wall
    myocardium = (a0 + w0) * (b0 + w0) * (ed.cavity_length + ed.apex_wall) - a0 * b0 * ed.cavity_length
    k = ed.apex_wall / ed.wall
    cubic = np.polymul(np.polymul([1.0, a], [1.0, b]), [k, length])
    cubic[-1] -= a * b * length + myocardium
    roots = np.roots(cubic)
    wall = float(max(r.real for r in roots if abs(r.imag) < 1e-9 and r.real > 0))
    return _Heart(
        base=ed.base + ed.cavity_length - length,
        cavity=(a, b),
        cavity_length=length,
        wall=wall,
        apex_wall=wall * k,
        rv_thickness=ed.rv_thickness * rv_squeeze,
        rv_width=ed.rv_width * rv_narrowing,
        rv_length=ed.rv_length * shortening,
    )


def _draw_background(
    rng: np.random.Generator, centre: tuple[float, float], heart: float, coverage: float, base: float
) -> list[tuple[tuple[float, ...], float]]:
    """Body with a fat rim, lungs beside the heart, an atrium and aorta above the base, random blobs.

    Each item is ((cx, cy, cz, rx, ry, rz, angle), relative intensity), painted in order.
    """
    u = rng.uniform
    cx, cy = centre
    mid = coverage / 2
    items = []
    away, shift = u(0.0, 2 * np.pi), u(20.0, 50.0)
    body = (cx + shift * np.cos(away), cy + shift * np.sin(away), mid, u(110, 170), u(80, 120), np.inf)
    body_angle = u(0.0, np.pi)
    fat = u(5.0, 15.0)
    items.append(((*body, body_angle), u(0.6, 0.95)))
    items.append(((*body[:3], body[3] - fat, body[4] - fat, np.inf, body_angle), u(0.25, 0.5)))
    side = u(0.0, np.pi)
    for sign in (-1.0, 1.0):
        gap = heart + u(25.0, 45.0)
        lung = (cx + sign * gap * np.cos(side), cy + sign * gap * np.sin(side), mid + u(-20, 20))
        items.append(((*lung, u(30, 50), u(55, 85), u(90, 150), side + u(-0.3, 0.3)), u(0.02, 0.08)))
    for _ in range(int(rng.integers(3, 8))):
        reach, turn = u(0.0, 130.0), u(0.0, 2 * np.pi)
        blob = (cx + reach * np.cos(turn), cy + reach * np.sin(turn), u(0.0, coverage), *u(8.0, 35.0, 3))
        items.append(((*blob, u(0.0, np.pi)), u(0.1, 0.9)))
    items.append(((cx + u(-10, 10), cy + u(-10, 10), base - u(15, 30), u(15, 30), u(15, 30), u(20, 35), 0.0),
                  u(0.85, 1.05)))
    turn = u(0.0, 2 * np.pi)
    aorta = (cx + heart * np.cos(turn), cy + heart * np.sin(turn), base - u(0, 20))
    items.append(((*aorta, u(10, 15), u(10, 15), u(25, 45), 0.0), u(0.85, 1.05)))
    return items


# -- drawing ----------------------------------------------------------------------------------
def _ellipse(x, y, cx, cy, rx, ry, angle: float) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an in-plane ellipse; all broadcast."""
    cx, cy = np.float32(cx), np.float32(cy)  # keep the full-size arithmetic in float32
    rx, ry = np.maximum(np.float32(rx), _MIN_RADIUS), np.maximum(np.float32(ry), _MIN_RADIUS)
    dx, dy = x - cx, y - cy
    cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    along, across = dx * cos + dy * sin, dy * cos - dx * sin
    return (np.sqrt((along / rx) ** 2 + (across / ry) ** 2) - 1.0) * np.sqrt(rx * ry)


def _taper(position, length) -> np.ndarray:
    """Half-ellipsoid profile: 1 at position 0, falling to 0 at ``length``; 0 before the base."""
    inside = (position >= 0) & (position < length)
    return np.where(inside, np.sqrt(np.clip(1.0 - (position / length) ** 2, 0.0, 1.0)), 0.0).astype(np.float32)


def _render(scene: _Scene, heart: _Heart, rng: np.random.Generator) -> tuple[Image, Image]:
    """Paint background and heart with partial-volume edges, then bias field and Rician noise."""
    ni, nj, nk = scene.size
    si, sj, sk = scene.spacing
    x = (np.arange(ni, dtype=np.float32) * np.float32(si))[None, None, :]
    y = (np.arange(nj, dtype=np.float32) * np.float32(sj))[None, :, None]
    z = (np.arange(nk, dtype=np.float32) * np.float32(sk))[:, None, None]
    pixel = np.float32(min(si, sj))
    image = np.zeros((nk, nj, ni), np.float32)
    label = np.zeros((nk, nj, ni), np.uint8)

    def paint(distance: np.ndarray, value: float, label_value: int | None = None) -> None:
        # Fraction of a voxel inside the edge, for a straight edge: 0.5 - d / pixel.
        image[...] += (np.float32(value) - image) * np.clip(0.5 - distance / pixel, 0.0, 1.0)
        if label_value is not None:
            label[distance < 0] = label_value

    for (cx, cy, cz, rx, ry, rz, angle), value in scene.background:
        profile = np.float32(1.0) if np.isinf(rz) else np.sqrt(np.clip(1.0 - ((z - cz) / rz) ** 2, 0.0, 1.0))
        paint(_ellipse(x, y, cx, cy, rx * profile, ry * profile, angle), value)

    # Per-slice LV axis and profiles, measured from the base plane towards the apex.
    depth = z - np.float32(heart.base)
    cx = np.float32(scene.centre[0]) + np.float32(scene.tilt[0]) * z
    cy = np.float32(scene.centre[1]) + np.float32(scene.tilt[1]) * z
    cavity = _taper(depth, heart.cavity_length)
    epicardium = _taper(depth, heart.cavity_length + heart.apex_wall)
    rv = _taper(depth, heart.rv_length)

    # RV: an ellipse pushed out from the LV towards rv_angle; the LV painted next cuts the crescent.
    a, b = heart.cavity
    epi_radius = (a + b) / 2 + heart.wall
    level = epi_radius * epicardium
    offset = scene.rv_offset * level
    outer = level + heart.rv_thickness * rv
    rx, ry = np.where(rv > 0, outer - offset, 0.0), heart.rv_width * rv
    rcx, rcy = cx + offset * math.cos(scene.rv_angle), cy + offset * math.sin(scene.rv_angle)
    wall = np.where(rv > 0, scene.rv_wall, 0.0)
    paint(_ellipse(x, y, rcx, rcy, rx + wall, ry + wall, scene.rv_angle), scene.myocardium)
    paint(_ellipse(x, y, rcx, rcy, rx, ry, scene.rv_angle), scene.rv_blood, RV)

    # LV myocardium: wall thickness varies smoothly around the ring.
    dx, dy = x - cx, y - cy
    towards = (dx * math.cos(scene.wall_angle) + dy * math.sin(scene.wall_angle)) / (np.sqrt(dx**2 + dy**2) + 1e-6)
    thickness = heart.wall * (1.0 + scene.wall_variation * towards)
    paint(_ellipse(x, y, cx, cy, (a + thickness) * epicardium, (b + thickness) * epicardium, scene.angle),
          scene.myocardium, MYO)
    paint(_ellipse(x, y, cx, cy, a * cavity, b * cavity, scene.angle), scene.blood, LV)

    # Papillary muscles: dark, but labelled as LV blood pool as in ACDC.
    first, second, radius = scene.papillary
    mid_cavity = (depth > 0.15 * heart.cavity_length) & (depth < 0.7 * heart.cavity_length)
    for turn in (first, second):
        px = cx + 0.55 * a * cavity * math.cos(turn)
        py = cy + 0.55 * b * cavity * math.sin(turn)
        paint(_ellipse(x, y, px, py, radius * mid_cavity, radius * mid_cavity, 0.0), scene.myocardium)

    # Smooth multiplicative bias field, then Rician noise (magnitude of a complex Gaussian signal).
    nx = np.linspace(-1, 1, ni, dtype=np.float32)[None, None, :]
    ny = np.linspace(-1, 1, nj, dtype=np.float32)[None, :, None]
    nz = np.linspace(-1, 1, nk, dtype=np.float32)[:, None, None]
    c = scene.bias.astype(np.float32)
    image *= np.exp(c[0] * nx + c[1] * ny + c[2] * nz + c[3] * nx**2 + c[4] * ny**2 + c[5] * nx * ny)
    sigma = np.float32(scene.noise)
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.sqrt(real**2 + imaginary**2) * np.float32(scene.gain)

    grid = Image(image, scene.spacing, scene.origin, scene.direction)
    return grid, grid.with_array(label)
