"""The shipped sample in a real MRML scene (slicer-core): ED/ES volumes with the DICOM files' own geometry."""
from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pydicom
import pytest
from helpers import import_slicer_core  # noqa: E402

slicer = import_slicer_core()

from IDEALSegmentLib.sample_data import (  # noqa: E402
    EXPERT_ATTRIBUTE,
    SAMPLE_CATEGORY,
    load_sample_volumes,
    sample_data_source,
)
from IDEALSegmentLib.volumes import image_from_volume, world_ijk_to_ras  # noqa: E402

from IDEALTrain.io.sample_data import load_sample, read_sample_phase  # noqa: E402

# The keyword parameters of SampleData.SampleDataLogic.registerCustomSampleDataSource (Slicer 5.10,
# Modules/Scripted/SampleData/SampleData.py); Sample Data itself does not run on slicer-core. There is no
# sampleDescription: the button shows the sampleName.
REGISTER_PARAMETERS = {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader", "thumbnailFileName",
                       "loadFileTypes", "loadFiles", "loadFileProperties", "checksums", "loadFileType"}


def test_the_sample_data_source_names_existing_files_in_equal_lists():
    source = sample_data_source()
    assert set(source) <= REGISTER_PARAMETERS - {"loadFileType"} and "customDownloader" not in source  # loadFileType: deprecated
    assert source["sampleName"] == "Cine MRI ED/ES (Sunnybrook)"  # the button's text (was "IDEALSegmentCardiacCine")
    assert source["category"] == SAMPLE_CATEGORY == "Cardiac MRI (IDEALSegment)"
    lists = ("uris", "fileNames", "nodeNames", "loadFiles", "loadFileTypes")
    assert {len(source[key]) for key in lists} == {2}
    assert source["nodeNames"] == ["SCD0000101_ED", "SCD0000101_ES"] and source["loadFiles"] == [False, False]
    assert all(Path(urlparse(uri).path).is_file() for uri in source["uris"])
    assert Path(source["thumbnailFileName"]).is_file()


def test_loading_the_sample_gives_ed_and_es_volumes_on_the_dicom_geometry():
    scene = slicer.vtkMRMLScene()
    sample = load_sample()
    nodes = load_sample_volumes(scene)
    assert list(nodes) == ["ED", "ES"]
    for phase, node in nodes.items():
        assert node.GetName() == f"SCD0000101_{phase}" and node.IsA("vtkMRMLScalarVolumeNode")
        assert json.loads(node.GetAttribute(EXPERT_ATTRIBUTE)) == sample.expert
        image = image_from_volume(node)
        reference = read_sample_phase(sample, phase)
        assert image.same_grid(reference, tolerance=1e-4) and np.array_equal(image.array, reference.array)
        # Independent of IDEALTrain's reader: every slice's first voxel lies at a DICOM ImagePositionPatient (LPS -> RAS).
        ijk_to_ras = world_ijk_to_ras(node)
        corners = ijk_to_ras @ np.array([[0, 0, k, 1] for k in range(image.array.shape[0])]).T
        positions = [np.array(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient, float) * (-1, -1, 1)
                     for path in sample.phase_files[phase]]
        for corner in corners[:3].T:
            assert min(np.linalg.norm(corner - p) for p in positions) < 1e-3
        row_direction = np.array(pydicom.dcmread(sample.phase_files[phase][0], stop_before_pixels=True).ImageOrientationPatient[:3], float)
        assert np.allclose(ijk_to_ras[:3, 0] / np.linalg.norm(ijk_to_ras[:3, 0]), row_direction * (-1, -1, 1), atol=1e-4)
    # Loading twice adds new nodes with unique names: it never replaces what is in the scene.
    again = load_sample_volumes(scene)
    assert again["ED"].GetName() != nodes["ED"].GetName() and scene.GetNodeByID(nodes["ED"].GetID()) is nodes["ED"]


def test_an_incomplete_sample_is_an_error_before_any_node_is_added(tmp_path):
    import shutil

    from IDEALTrain.errors import IdealError

    shutil.copytree(load_sample().root, tmp_path / "sample")
    (tmp_path / "sample" / "dicoms" / "SCD0000101" / "48.dcm").unlink()
    scene = slicer.vtkMRMLScene()
    before = scene.GetNumberOfNodes()
    with pytest.raises(IdealError, match="incomplete"):
        load_sample_volumes(scene, tmp_path / "sample")
    assert scene.GetNumberOfNodes() == before
