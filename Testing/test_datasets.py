"""Data specs: every reader behind one SPEC string, with clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import oblique_image

from IDEALTrain.errors import IdealError
from IDEALTrain.io.datasets import load_cases
from IDEALTrain.io.dicom_write import write_dicom_cine
from IDEALTrain.io.phantom import write_phantom_dataset


def test_dicom_spec_gives_every_frame_unlabelled(tmp_path):
    frames = [oblique_image().with_array(np.full((7, 40, 48), 10 * t + 5, np.int16) + np.eye(48, dtype=np.int16)[:40]) for t in range(3)]
    write_dicom_cine(frames, tmp_path / "cine")
    cases = load_cases(f"dicom:{tmp_path}")
    assert [case.name.rsplit("_", 1)[1] for case in cases] == ["frame00", "frame01", "frame02"]
    assert all(case.label is None and case.image.same_grid(frames[0], tolerance=1e-4) for case in cases)


def test_folder_spec_pairs_images_with_labels(tmp_path):
    write_phantom_dataset(tmp_path, 2, seed=3)
    cases = load_cases(f"folder:{tmp_path}", require_labels=True)
    assert [case.name for case in cases] == ["phantom_0000", "phantom_0001"]
    assert all(case.label.same_grid(case.image) for case in cases)
    (tmp_path / "labels" / "phantom_0001.nii.gz").unlink()
    assert load_cases(f"folder:{tmp_path}")[1].label is None
    with pytest.raises(IdealError, match="no matching label"):
        load_cases(f"folder:{tmp_path}", require_labels=True)


@pytest.mark.parametrize("spec,message", [("nifti:/tmp", "invalid data spec"), ("folder:/no/such/dir", "does not exist"), ("/tmp", "invalid data spec")])
def test_bad_specs(spec, message):
    with pytest.raises(IdealError, match=message):
        load_cases(spec)
