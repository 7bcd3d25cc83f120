"""DICOM series: exact geometry round trips, cine frame grouping, and clear errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from IDEALTrain.errors import IdealError
from IDEALTrain.io.dicom_series import list_series, read_dicom, read_dicom_frames
from IDEALTrain.io.dicom_write import write_dicom_cine, write_dicom_series
from IDEALTrain.io.image import Image


def _rotation() -> np.ndarray:
    """A fixed oblique, right-handed rotation (no axis aligned with LPS)."""
    q, _ = np.linalg.qr(np.array([[0.9, -0.3, 0.2], [0.35, 0.8, -0.4], [-0.1, 0.45, 0.85]]))
    return q if np.linalg.det(q) > 0 else -q


def _oblique(slices: int = 5, offset: int = 0) -> Image:
    """Anisotropic, non-zero-origin, oblique volume with distinct integer voxels."""
    array = (np.arange(slices * 6 * 7).reshape(slices, 6, 7) * 13 - 200 + offset).astype(np.int16)
    return Image(array, spacing=(0.7, 1.3, 8.0), origin=(-12.5, 33.25, 101.0), direction=_rotation())


def test_oblique_volume_round_trip(tmp_path: Path) -> None:
    image = _oblique()
    files = write_dicom_series(image, tmp_path)
    back = read_dicom(tmp_path)
    assert back.same_grid(image)
    assert np.array_equal(back.array, image.array)
    # The headers themselves say what the grid says (slice k at index (0, 0, k)).
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        assert ds.Modality == "MR" and ds.BitsAllocated == 16
        expected = (image.index_to_physical @ [0, 0, k, 1])[:3]
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], expected, atol=1e-4)
        assert np.allclose([float(v) for v in ds.ImageOrientationPatient], image.direction[:, :2].T.ravel(), atol=1e-6)
        assert np.allclose([float(v) for v in ds.PixelSpacing], [1.3, 0.7])  # (row, column) spacing
        assert float(ds.SliceThickness) == pytest.approx(8.0)


def test_float_voxels_are_rescaled_within_half_a_step(tmp_path: Path) -> None:
    values = np.random.default_rng(0).uniform(-0.5, 2.0, (3, 4, 5))
    image = Image(values, spacing=(1.5, 1.5, 6.0), origin=(3.0, -2.0, 1.0))
    files = write_dicom_series(image, tmp_path)
    assert pydicom.dcmread(files[0]).SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"  # classic MR, per-file geometry
    back = read_dicom(tmp_path)
    step = (values.max() - values.min()) / 65534
    assert back.same_grid(image)
    assert np.abs(back.array - values).max() <= step / 2 * 1.01


def _shuffled_cine(folder: Path, frames: list[Image], **kwargs) -> list[Path]:
    """Write a cine series, then rename its files in a random (seeded) order."""
    files = write_dicom_cine(frames, folder / "tmp", **kwargs)
    order = np.random.default_rng(1).permutation(len(files))
    renamed = []
    for name, index in enumerate(order):
        target = folder / f"{name:03d}_{np.random.default_rng(name).integers(1000)}.dcm"
        files[index].rename(target)
        renamed.append(target)
    (folder / "tmp").rmdir()
    return renamed


def test_cine_frames_in_order_despite_jitter_and_shuffled_files(tmp_path: Path) -> None:
    frames = [_oblique(slices=3, offset=1000 * n) for n in range(4)]
    files = _shuffled_cine(tmp_path, frames, trigger_times=[10, 45, 80, 115], jitter_ms=8.0)
    times = {round(float(pydicom.dcmread(f).TriggerTime), 3) for f in files}
    assert len(times) > 4  # the same phase has different trigger times at different positions
    read = read_dicom_frames(tmp_path)
    assert len(read) == 4
    for got, expected in zip(read, frames):
        assert got.same_grid(expected)
        assert np.array_equal(got.array, expected.array)


def test_cine_order_falls_back_to_instance_number(tmp_path: Path) -> None:
    frames = [_oblique(slices=3, offset=1000 * n) for n in range(3)]
    for path in _shuffled_cine(tmp_path, frames):
        ds = pydicom.dcmread(path)
        del ds.TriggerTime
        ds.save_as(path)
    read = read_dicom_frames(tmp_path)
    assert [np.array_equal(g.array, e.array) for g, e in zip(read, frames)] == [True] * 3


def test_trigger_time_wins_over_instance_number(tmp_path: Path) -> None:
    frames = [_oblique(slices=3, offset=1000 * n) for n in range(3)]
    for path in _shuffled_cine(tmp_path, frames):
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = 1000 - int(ds.InstanceNumber)  # reversed: only trigger time is right
        ds.save_as(path)
    read = read_dicom_frames(tmp_path)
    assert [np.array_equal(g.array, e.array) for g, e in zip(read, frames)] == [True] * 3


def test_frame_selection(tmp_path: Path) -> None:
    frames = [_oblique(slices=3, offset=1000 * n) for n in range(4)]
    write_dicom_cine(frames, tmp_path)
    assert np.array_equal(read_dicom(tmp_path, frame=2).array, frames[2].array)
    with pytest.raises(IdealError, match=r"cine with 4 frames: choose one with --frame N \(0-3\)"):
        read_dicom(tmp_path)
    with pytest.raises(IdealError, match="frame 4 is out of range"):
        read_dicom(tmp_path, frame=4)
    with pytest.raises(IdealError, match="out of range"):
        read_dicom(tmp_path, frame=-1)


def test_non_cine_series_is_one_frame(tmp_path: Path) -> None:
    write_dicom_series(_oblique(), tmp_path)
    assert len(read_dicom_frames(tmp_path)) == 1
    assert read_dicom(tmp_path, frame=0).same_grid(_oblique())


def test_two_series_need_a_uid(tmp_path: Path) -> None:
    write_dicom_series(_oblique(), tmp_path / "a", series_uid="1.2.3.4", description="short axis", patient_id="P7")
    write_dicom_cine([_oblique(slices=3), _oblique(slices=3, offset=1)], tmp_path / "b" / "cine", series_uid="1.2.3.5",
                     description="localizer", patient_id="P8")
    infos = list_series(tmp_path)
    assert [(s.uid, s.description, s.file_count, s.folder, s.patient_id, s.frames) for s in infos] == [
        ("1.2.3.4", "short axis", 5, tmp_path / "a", "P7", 1),
        ("1.2.3.5", "localizer", 6, tmp_path / "b" / "cine", "P8", 2),
    ]
    with pytest.raises(IdealError) as error:
        read_dicom(tmp_path)
    message = str(error.value)
    assert "--series" in message and "\n" not in message
    for text in ("1.2.3.4 'short axis' patient P7, 1 frame(s) x 5 slice(s), in a",
                 "1.2.3.5 'localizer' patient P8, 2 frame(s) x 3 slice(s), in b/cine"):
        assert text in message
    assert read_dicom(tmp_path, series_uid="1.2.3.5", frame=1).array.shape == (3, 6, 7)
    with pytest.raises(IdealError, match="1.2.3.9 not found"):
        read_dicom(tmp_path, series_uid="1.2.3.9")


def test_the_same_instance_stored_twice_is_read_once(tmp_path: Path) -> None:
    """A folder holding a copy of a DICOM image (same SOPInstanceUID) reads as the series, not as a broken stack."""
    import shutil

    image = _oblique()
    files = write_dicom_series(image, tmp_path / "series")
    shutil.copytree(tmp_path / "series", tmp_path / "copy")  # the whole export twice
    shutil.copy(files[2], tmp_path / "series" / "again.dcm")  # and one image a third time
    back = read_dicom(tmp_path)
    assert back.same_grid(image) and np.array_equal(back.array, image.array)
    assert [s.file_count for s in list_series(tmp_path)] == [5]


def test_missing_empty_and_non_dicom_folders(tmp_path: Path) -> None:
    with pytest.raises(IdealError, match="not found"):
        read_dicom(tmp_path / "nowhere")
    with pytest.raises(IdealError, match="no DICOM images found"):
        read_dicom(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "fake.dcm").write_bytes(b"\0" * 300)
    with pytest.raises(IdealError, match="no DICOM images found"):
        list_series(tmp_path)


def test_single_2d_image_is_not_a_volume(tmp_path: Path) -> None:
    write_dicom_series(_oblique(slices=1), tmp_path)
    with pytest.raises(IdealError, match="single 2D image"):
        read_dicom(tmp_path)


def test_missing_slice_is_an_error(tmp_path: Path) -> None:
    files = write_dicom_series(_oblique(), tmp_path)
    files[2].unlink()
    with pytest.raises(IdealError, match="irregular slice spacing"):
        read_dicom(tmp_path)


def test_tiny_spacing_jitter_is_accepted_silently(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    image = Image(np.zeros((5, 4, 3), np.int16), spacing=(1.0, 1.0, 8.0))
    files = write_dicom_series(image, tmp_path)
    ds = pydicom.dcmread(files[2])
    ds.ImagePositionPatient = [0.0, 0.0, 16.002]  # like Sunnybrook's 0.001 mm scanner rounding
    ds.save_as(files[2])
    back = read_dicom(tmp_path)
    assert back.spacing[2] == pytest.approx(8.0)
    assert "nonuniformity" not in capfd.readouterr().err.lower()


def test_positions_with_different_frame_counts(tmp_path: Path) -> None:
    frames = [_oblique(slices=3, offset=1000 * n) for n in range(3)]
    files = write_dicom_cine(frames, tmp_path)
    files[0].unlink()
    with pytest.raises(IdealError, match="between 2 and 3 images per slice position"):
        read_dicom_frames(tmp_path)
