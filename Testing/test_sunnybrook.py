"""Sunnybrook ED/ES volumes: true DICOM geometry, and labels that follow the expert contours."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from IDEALTrain.errors import IdealError
from IDEALTrain.io.dicom_series import read_header, read_slices
from IDEALTrain.io.sunnybrook import (
    SunnybrookPhase,
    contour_mask,
    list_sunnybrook_patients,
    read_contour,
    read_sunnybrook_patient,
)


@pytest.fixture(scope="module")
def phases(sunnybrook_dir: Path) -> dict[str, list[SunnybrookPhase]]:
    return {p: read_sunnybrook_patient(sunnybrook_dir, p) for p in list_sunnybrook_patients(sunnybrook_dir)}


def _contour_folder(root: Path, patient: str) -> Path:
    with (root / "link.csv").open() as handle:
        return root / "contourfiles" / {r["patient_id"]: r["original_id"] for r in csv.DictReader(handle)}[patient]


def _contour(root: Path, phase: SunnybrookPhase, k: int, kind: str) -> np.ndarray | None:
    number = int(phase.files[k].stem)
    path = _contour_folder(root, phase.patient) / f"{kind}-contours" / f"IM-0001-{number:04d}-{kind}contour-manual.txt"
    return read_contour(path) if path.is_file() else None


def _labels_at(phase: SunnybrookPhase, k: int, points_xy: np.ndarray) -> np.ndarray:
    """Label values at the pixels nearest to (x = column, y = row) points of slice k."""
    cols, rows = np.round(points_xy).astype(int).T
    return phase.label.array[k, rows, cols]


def _moved(points: np.ndarray, distance: float) -> np.ndarray:
    """Vertices moved ``distance`` pixels inwards along the local contour normal (outwards if < 0)."""
    tangent = np.roll(points, -2, axis=0) - np.roll(points, 2, axis=0)
    normal = np.column_stack([-tangent[:, 1], tangent[:, 0]]) / np.linalg.norm(tangent, axis=1, keepdims=True)
    x, y = points.T
    if np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)) < 0:  # clockwise: left normal points outwards
        normal = -normal
    return points + distance * normal


def test_patients_and_phases(sunnybrook_dir: Path, phases: dict[str, list[SunnybrookPhase]]) -> None:
    assert list(phases) == ["SCD0000101", "SCD0000201", "SCD0000301", "SCD0000401", "SCD0000501"]
    for patient, (ed, es) in phases.items():
        assert (ed.patient, ed.phase, es.patient, es.phase) == (patient, "ED", patient, "ES")
        assert ed.label.array.dtype == np.uint8 and len(ed.files) == len(es.files)
        # End-systole comes earlier in the R-R interval than end-diastole, at every slice.
        assert max(read_header(f).trigger_time for f in es.files) < min(read_header(f).trigger_time for f in ed.files)
        # Every outer contour belongs to an ED image; none is drawn at ES.
        outer = _contour_folder(sunnybrook_dir, patient) / "o-contours"
        numbers = {int(p.name.split("-")[2]) for p in outer.glob("*.txt")}
        assert numbers and numbers <= {int(f.stem) for f in ed.files}
        assert set(np.unique(es.label.array)) == {0, 3} and not any(es.myocardium_slices)
        if patient == "SCD0000501":  # its outer contours are unusable copies (next test)
            assert set(np.unique(ed.label.array)) == {0, 3} and not any(ed.myocardium_slices)
        else:
            assert set(np.unique(ed.label.array)) == {0, 2, 3} and all(ed.myocardium_slices)
    # 96 contoured images in all, each used exactly once.
    used = [f for pair in phases.values() for phase in pair for f in phase.files]
    assert len(used) == len(set(used)) == 96


def test_scd0000501_outer_contours_are_copies_of_scd0000101(sunnybrook_dir: Path) -> None:
    copies = sorted((sunnybrook_dir / "contourfiles" / "SC-HF-I-6" / "o-contours").glob("*.txt"))
    assert len(copies) == 9
    for path in copies:
        assert path.read_bytes() == (sunnybrook_dir / "contourfiles" / "SC-HF-I-1" / "o-contours" / path.name).read_bytes()


def test_label_geometry_is_the_dicom_geometry(phases: dict[str, list[SunnybrookPhase]]) -> None:
    for phase in (p for pair in phases.values() for p in pair):
        assert phase.label.same_grid(phase.image)
        assert read_slices([read_header(f) for f in phase.files]).same_grid(phase.label)
        # Independently of SimpleITK: slice k's voxel (0, 0, k) sits at file k's ImagePositionPatient.
        first = pydicom.dcmread(phase.files[0], stop_before_pixels=True)
        orientation = np.array(first.ImageOrientationPatient, float)
        normal = np.cross(orientation[:3], orientation[3:])
        assert np.allclose(phase.label.direction, np.column_stack([orientation[:3], orientation[3:], normal]), atol=1e-4)
        assert np.allclose(phase.label.spacing[:2], np.array(first.PixelSpacing, float)[::-1])
        for k, path in enumerate(phase.files):
            position = np.array(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient, float)
            assert np.allclose((phase.label.index_to_physical @ [0, 0, k, 1])[:3], position, atol=0.01)


def test_labels_follow_the_contours(sunnybrook_dir: Path, phases: dict[str, list[SunnybrookPhase]]) -> None:
    rings = 0
    for phase in (p for pair in phases.values() for p in pair):
        for k in range(len(phase.files)):
            inner = _contour(sunnybrook_dir, phase, k, "i")
            assert inner is not None
            assert _labels_at(phase, k, inner.mean(axis=0, keepdims=True))[0] == 3  # centroid
            assert np.all(_labels_at(phase, k, _moved(inner, 1.5)) == 3)
            if not phase.myocardium_slices[k]:
                assert np.all(_labels_at(phase, k, _moved(inner, -1.5)) == 0)
                continue
            outer = _contour(sunnybrook_dir, phase, k, "o")
            assert outer is not None
            assert np.all(_labels_at(phase, k, _moved(outer, -1.5)) == 0)
            ring = _moved(outer, 1.5)
            # Inside the outer contour: myocardium, or blood pool where the wall is thinner than 1.5 px.
            assert np.all(np.isin(_labels_at(phase, k, ring), [2, 3]))
            # Where the wall is at least 2 px thick it is myocardium (the experts' contours cross
            # in a few places, e.g. on one ED slice of SCD0000401, hence not 100 %).
            wall = np.linalg.norm(ring[:, None] - inner[None], axis=2).min(axis=1) >= 2.0
            assert np.mean(_labels_at(phase, k, ring[wall]) == 2) > 0.97 and wall.mean() > 0.25
            rings += 1
    assert rings == 37  # ED slices with a usable outer contour: 9 + 9 + 10 + 9


def test_volumes_are_plausible(phases: dict[str, list[SunnybrookPhase]]) -> None:
    for ed, es in phases.values():
        ml = np.prod(ed.label.spacing) / 1000.0
        ed_volume, es_volume = np.sum(ed.label.array == 3) * ml, np.sum(es.label.array == 3) * ml
        assert 50 < ed_volume < 400 and 20 < es_volume < ed_volume
        assert 0.1 < (ed_volume - es_volume) / ed_volume < 0.5  # heart failure: low ejection fraction
        if any(ed.myocardium_slices):
            assert 60 < np.sum(ed.label.array == 2) * ml * 1.05 < 300  # myocardial mass, g


def test_unknown_patient(sunnybrook_dir: Path) -> None:
    with pytest.raises(IdealError, match="not in link.csv"):
        read_sunnybrook_patient(sunnybrook_dir, "SCD9999999")
    assert read_sunnybrook_patient(sunnybrook_dir, "SC-HF-I-1")[0].patient == "SCD0000101"


def test_contour_pixel_convention() -> None:
    """x is the column, y the row, integers are pixel centres; centres on the contour split evenly."""
    pytest.importorskip("skimage")
    edges = contour_mask(np.array([[0.5, 1.5], [2.5, 1.5], [2.5, 3.5], [0.5, 3.5]]), (5, 4))
    assert np.argwhere(edges).tolist() == [[2, 1], [2, 2], [3, 1], [3, 2]]  # (row, column)
    centres = contour_mask(np.array([[1.0, 1.0], [3.0, 1.0], [3.0, 3.0], [1.0, 3.0]]), (5, 5))
    assert centres.sum() == 4  # the polygon's area, not the 9 centres it touches


def test_missing_scikit_image_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage.draw", None)
    with pytest.raises(IdealError, match="pip install scikit-image"):
        contour_mask(np.array([[0.0, 0.0], [2.0, 0.0], [2.0, 2.0]]), (3, 3))


def test_contours_sit_on_the_blood_pool_edge(sunnybrook_dir: Path) -> None:
    """The loader's contour origin is the one where the contours fit their images best (not one pixel off)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from contour_alignment import best_offset, edge_strength, endocardial_contours

    shifts = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    grids = [edge_strength(image, contour, shifts) for _, image, contour in endocardial_contours(sunnybrook_dir)]
    mean = np.mean(grids, axis=0)
    assert len(grids) == 96 and best_offset(mean, shifts) == (0.0, 0.0)
    assert mean[2, 2] > 1.1 * mean[4, 4]  # the files' 1-based points, used as 0-based, fit clearly worse
