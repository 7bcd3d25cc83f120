"""The modules' self-test scenario, headless on slicer-core: everything but the widget wiring.

IDEALSegmentTest and IDEALTrainerTest run the same function inside Slicer's --testing mode.
"""
from __future__ import annotations

from pathlib import Path

from helpers import import_slicer_core

slicer = import_slicer_core()

from IDEALSegmentLib.selftest import SelftestFailure, run_selftest_scenario  # noqa: E402

from IDEALTrain.labels import CARDIAC_LABELS  # noqa: E402


def test_selftest_scenario_runs_end_to_end(tmp_path):
    scene = slicer.vtkMRMLScene()
    messages = []
    report = run_selftest_scenario(scene, tmp_path / "work", progress=messages.append)

    assert report["segment_ids"] == ["RV", "LV_Myocardium", "LV"]
    assert report["segment_names"] == [label.name for label in CARDIAC_LABELS]
    assert report["device"] == "cpu"
    assert Path(report["correction"]).is_file()
    assert report["training_returncode"] == 0 and report["training_events"] > 0
    assert report["registered_source"] == "user"
    assert report["registered_versions"] == [report["registered_version"], report["drafting_version"]]
    assert report["loaded_model"] == f"{report['registered_id']} {report['registered_version']}"
    assert messages[0] == "Drafting model" and "Registering and loading the new model" in messages
    # The scene holds what a clinician would see: the phantom, its segmentation by the drafting and
    # by the new model, their uncertainty volumes and the unlabelled pool volume (nothing from the
    # cancelled runs).
    volumes = [n.GetName() for n in scene.GetNodesByClass("vtkMRMLScalarVolumeNode")]
    assert len(volumes) == 4, volumes
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2
    assert not list((tmp_path / "work").glob("IDEALSegment-*"))  # every hand-off folder is gone


def test_selftest_failures_are_explicit_assertion_errors():
    assert issubclass(SelftestFailure, AssertionError)
