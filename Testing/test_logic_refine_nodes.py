"""The Refine section's scene nodes on slicer-core: the hidden draft survives a .mrml + files save, and a point put
on the clicks list by the Markups toolbar (no structure, no sign) is removed instead of breaking later refines."""
from __future__ import annotations

import numpy as np
from helpers import import_slicer_core, oblique_image

slicer = import_slicer_core()

from IDEALSegmentLib.refinement import DRAFT_ATTRIBUTE, RefineController  # noqa: E402
from IDEALSegmentLib.segmentations import segmentation_from_labels  # noqa: E402
from IDEALSegmentLib.volumes import image_from_volume, volume_from_image  # noqa: E402


def scene_with_segmentation():
    scene = slicer.vtkMRMLScene()
    image = oblique_image(shape=(3, 16, 18))
    volume = volume_from_image(image, scene, "cine")
    labels = np.zeros(image.array.shape, np.uint8)
    labels[1, 4:10, 5:11] = 3
    return scene, volume, segmentation_from_labels(image.with_array(labels), volume), labels


def test_the_hidden_draft_is_saved_with_a_mrml_and_files_scene(tmp_path):
    scene, volume, segmentation, labels = scene_with_segmentation()
    controller = RefineController()
    try:
        controller.start_placing(volume, segmentation, "unused-model", "cpu", 3, True)  # creates the clicks and the draft
        draft = controller.session.draft
    finally:
        controller.close()
    storage = draft.GetStorageNode()
    assert storage is not None, "the draft has no storage node: a .mrml + files save drops it and undo fails after reload"
    storage.SetFileName(str(tmp_path / "draft.nrrd"))
    assert storage.WriteData(draft)
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()

    reopened = slicer.vtkMRMLScene()
    reopened.SetURL(str(tmp_path / "scene.mrml"))
    assert reopened.Connect()
    drafts = [reopened.GetNthNodeByClass(n, "vtkMRMLLabelMapVolumeNode")
              for n in range(reopened.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode"))]
    (loaded,) = [node for node in drafts if node.GetAttribute(DRAFT_ATTRIBUTE) == segmentation.GetID()]
    assert np.array_equal(image_from_volume(loaded).array, labels)


def test_a_point_placed_with_the_markups_toolbar_is_removed():
    scene, volume, segmentation, _ = scene_with_segmentation()  # noqa: F841  (the scene must stay alive)
    controller = RefineController()
    try:
        markups = controller.start_placing(volume, segmentation, "unused-model", "cpu", 3, True)
        controller.placing = None  # the Add button's placement is over; the toolbar places on the active list
        index = markups.AddControlPointWorld(1.0, 2.0, 3.0)
        controller.point_placed(index)
        assert markups.GetNumberOfControlPoints() == 0
        assert controller.session.clicks() == []  # raised "click 1 ... has no label: remove it" before, at every refine
        assert "Add positive" in controller.state(volume, segmentation, "unused-model")[2]
    finally:
        controller.close()
