"""Volume files keep geometry exactly; bad files give clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import oblique_image

from IDEALTrain.errors import IdealError
from IDEALTrain.io.image import Image
from IDEALTrain.io.volume_files import read_frames, read_image, write_image
from IDEALTrain.labels import CARDIAC_LABELS


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_round_trip_keeps_geometry_and_voxels(tmp_path, suffix):
    image = oblique_image()
    path = write_image(image, tmp_path / f"volume{suffix}")
    back = read_image(path)
    assert back.same_grid(image, tolerance=1e-5)
    np.testing.assert_array_equal(back.array, image.array)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


def test_seg_nrrd_carries_slicer_segment_metadata(tmp_path):
    labels = oblique_image().with_array(np.random.default_rng(1).integers(0, 4, (7, 40, 48)).astype(np.uint8))
    path = write_image(labels, tmp_path / "case.seg.nrrd", CARDIAC_LABELS)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    assert reader.GetMetaData("Segment2_ID") == "LV"
    assert reader.GetMetaData("Segment0_LabelValue") == "1"
    assert "53085002" in reader.GetMetaData("Segment0_Tags")
    back = read_image(path)
    assert back.same_grid(labels, tolerance=1e-5)
    np.testing.assert_array_equal(back.array, labels.array)


def test_seg_nrrd_without_label_map_is_refused(tmp_path):
    with pytest.raises(IdealError, match="label map"):
        write_image(oblique_image(), tmp_path / "x.seg.nrrd")


def test_4d_file_needs_a_frame(tmp_path):
    frames = [sitk.GetImageFromArray(np.full((3, 8, 9), t, np.int16)) for t in range(4)]
    path = tmp_path / "cine.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(frames), str(path))
    assert len(read_frames(path)) == 4
    with pytest.raises(IdealError, match="4 frames.*--frame"):
        read_image(path)
    assert read_image(path, frame=2).array.max() == 2
    with pytest.raises(IdealError, match="out of range"):
        read_image(path, frame=4)


def test_2d_image_is_refused(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((8, 9), np.float32)), str(path))
    with pytest.raises(IdealError, match="2D image"):
        read_image(path)


def test_non_image_and_missing_files(tmp_path):
    bogus = tmp_path / "notes.nii.gz"
    bogus.write_text("this is not an image")
    with pytest.raises(IdealError, match="not a readable image"):
        read_image(bogus)
    with pytest.raises(IdealError, match="no such file"):
        read_image(tmp_path / "absent.nrrd")
    with pytest.raises(IdealError, match="unsupported file type"):
        read_image(tmp_path.joinpath("x.txt")) if tmp_path.joinpath("x.txt").write_text("x") else None


def test_slice_axis_found_from_geometry():
    assert Image(np.zeros((9, 64, 60)), spacing=(1.3, 1.3, 8.0)).slice_axis == 0
    assert Image(np.zeros((64, 60, 9)), spacing=(8.0, 1.3, 1.3)).slice_axis == 2
    assert Image(np.zeros((64, 9, 60)), spacing=(1.3, 10.0, 1.3)).slice_axis == 1
    # isotropic: the axis with the fewest voxels
    assert Image(np.zeros((64, 12, 60)), spacing=(1.0, 1.0, 1.0)).slice_axis == 1
