"""*Add to unlabelled pool* and *Mark reviewed* with ticked structures, through the IDEALSegment panel controller."""
from __future__ import annotations

from helpers import import_slicer_core

slicer = import_slicer_core()

from IDEALSegmentLib.corrections import pool_count, read_manifest  # noqa: E402
from IDEALSegmentLib.panel import Parameters, SegmentPanelController  # noqa: E402
from IDEALSegmentLib.registry import ModelRegistry  # noqa: E402
from IDEALSegmentLib.segmentations import segmentation_from_labels  # noqa: E402
from IDEALSegmentLib.volumes import volume_from_image  # noqa: E402

from IDEALTrain.io.phantom import make_phantom_pair  # noqa: E402


def test_the_panel_adds_the_selected_image_to_the_pool_and_records_ticked_structures(tmp_path):
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLScene(scene)
    panel = SegmentPanelController(Parameters(), logic, ModelRegistry(tmp_path / "user", tmp_path / "shipped"))
    pair = make_phantom_pair(5, size=(32, 32, 4), spacing=(1.5, 1.5, 8.0))
    panel.p.inputVolume = volume_from_image(pair.ed_image, scene, "site scan")
    folder = tmp_path / "corrections"
    assert pool_count(folder) == 0
    assert panel.add_to_pool(folder) == 1 and "now holds 1" in panel.p.statusText
    panel.p.segmentation = segmentation_from_labels(pair.ed_label, panel.p.inputVolume)
    panel.mark_reviewed(folder, "dr a", structures=["LV"], overwrite=True)
    [case] = [entry for entry in read_manifest(folder) if entry["kind"] == "labeled"]
    assert list(case["reviewed"]) == ["LV"] and case["reviewed_rule"] == "chosen structures"
    assert pool_count(folder) == 1  # the reviewed scan stays in the pool once (same voxels: not added again)
