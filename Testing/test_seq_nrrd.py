"""Slicer's .seq.nrrd cines (written by slicer-core's volume sequence storage node) read like the DICOM cine they came from."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import import_slicer_core, varied_bundle

slicer = import_slicer_core()

from IDEALSegmentLib.cine import sequence_from_images  # noqa: E402

from IDEALTrain.cli import main  # noqa: E402
from IDEALTrain.io.dicom_series import read_dicom_frames  # noqa: E402
from IDEALTrain.io.sample_data import load_sample  # noqa: E402
from IDEALTrain.io.volume_files import read_frames, read_image  # noqa: E402
from IDEALTrain.model.bundle import save_bundle  # noqa: E402


def _write_seq_nrrd(frames, path) -> None:
    """Store frames as Slicer does when it saves a cine: a sequence node through vtkMRMLVolumeSequenceStorageNode."""
    scene = slicer.vtkMRMLScene()
    sequence = sequence_from_images(scene, frames, "cine")
    storage = slicer.vtkMRMLVolumeSequenceStorageNode()
    scene.AddNode(storage)
    sequence.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.WriteData(sequence) == 1


@pytest.fixture(scope="module")
def cine(tmp_path_factory):
    """The shipped sample's DICOM cine, and the same frames saved as a Slicer .seq.nrrd."""
    folder = load_sample().dicom_dir
    frames = read_dicom_frames(folder)
    path = tmp_path_factory.mktemp("seq") / "heart.seq.nrrd"
    _write_seq_nrrd(frames, path)
    return folder, frames, path


def test_seq_nrrd_frames_equal_the_dicom_frames(cine):
    _, dicom_frames, path = cine
    frames = read_frames(path)
    assert len(frames) == len(dicom_frames) == 2
    for frame, expected in zip(frames, dicom_frames):
        assert frame.same_grid(expected, tolerance=1e-5)
        assert np.array_equal(frame.array, expected.array)
    assert np.array_equal(read_image(path, 1).array, dicom_frames[1].array)


def test_seq_nrrd_segments_frame_by_frame_like_the_dicom_cine(cine, tmp_path, capsys):
    folder, _, path = cine
    model = save_bundle(varied_bundle(), tmp_path / "model")
    run = ["segment", "--model", str(model), "--device", "cpu", "--all-frames"]
    assert main([*run, "--input", str(path), "--output", str(tmp_path / "seq.nii.gz")]) == 0
    assert main([*run, "--input", str(folder), "--output", str(tmp_path / "dicom.nii.gz")]) == 0
    for n in range(2):
        from_seq = read_image(tmp_path / f"seq_frame{n:02d}.nii.gz")
        from_dicom = read_image(tmp_path / f"dicom_frame{n:02d}.nii.gz")
        assert from_seq.same_grid(from_dicom, tolerance=1e-5)
        assert np.array_equal(from_seq.array, from_dicom.array) and from_seq.array.any()
    capsys.readouterr()
    assert main(["segment", "--model", str(model), "--device", "cpu", "--input", str(path), "--output", str(tmp_path / "x.nrrd")]) == 2
    assert "choose one with --frame N (0-1)" in capsys.readouterr().err
