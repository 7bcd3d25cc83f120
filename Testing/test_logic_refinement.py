"""Click to fix in the Slicer Logic on slicer-core: clicks as markups, refinement in the worker, undo, saved clicks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import import_slicer_core, oblique_image, tiny_refinement_bundle, varied_bundle

slicer = import_slicer_core()

from IDEALSegmentLib.refinement import CLICKS_ATTRIBUTE, RefinementSession  # noqa: E402
from IDEALSegmentLib.segmentations import labels_from_segmentation, segmentation_from_labels  # noqa: E402
from IDEALSegmentLib.volumes import volume_from_image  # noqa: E402

from IDEALTrain.errors import IdealError  # noqa: E402
from IDEALTrain.model.bundle import save_bundle  # noqa: E402


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    return save_bundle(varied_bundle(), tmp_path_factory.mktemp("bundle") / "tiny")


def ras_of(image, k: int, j: int, i: int) -> list[float]:
    lps = (image.index_to_physical @ np.array([i, j, k, 1.0]))[:3]
    return [-lps[0], -lps[1], lps[2]]


def test_refine_undo_and_clicks_saved_with_the_scene(bundle_path, tmp_path):
    scene = slicer.vtkMRMLScene()
    image = oblique_image(shape=(5, 32, 36))
    volume = volume_from_image(image, scene, "cine")
    draft = np.zeros(image.array.shape, np.uint8)
    draft[2, 10:20, 10:20] = 3
    segmentation = segmentation_from_labels(image.with_array(draft), volume)
    session = RefinementSession(volume, segmentation, bundle_path, device="cpu")
    try:
        session.add_click(ras_of(image, 2, 25, 25), 3, True)  # LV where the draft has none
        with pytest.raises(IdealError, match="still being refined"):
            session.add_click(ras_of(image, 2, 5, 5), 1, True)
        assert "refined with 1 click" in session.wait()
        first = labels_from_segmentation(segmentation, volume).array
        assert first[2, 25, 25] == 3 and np.array_equal(first[[0, 1, 3, 4]], draft[[0, 1, 3, 4]])

        session.add_click(ras_of(image, 2, 15, 15), 3, False)  # not LV inside the draft's square
        session.wait()
        second = labels_from_segmentation(segmentation, volume).array
        assert second[2, 15, 15] != 3 and second[2, 25, 25] == 3

        session.undo_last_click()  # instant: back to the labels after the first click
        assert np.array_equal(labels_from_segmentation(segmentation, volume).array, first)
        assert session.markups.GetNumberOfControlPoints() == 1
        session.undo_last_click()
        assert np.array_equal(labels_from_segmentation(segmentation, volume).array, draft)
        with pytest.raises(IdealError, match="no click to undo"):
            session.undo_last_click()

        session.add_click(ras_of(image, 3, 8, 9), 2, True)
        session.wait()
        # the refined segmentation is what Mark reviewed exports, like any correction
        from IDEALSegmentLib.corrections import export_correction

        from IDEALTrain.io.volume_files import read_label

        exported = read_label(export_correction(tmp_path / "corrections", volume, segmentation, reviewer="dr.a"))
        assert np.array_equal(exported.array, labels_from_segmentation(segmentation, volume).array)
        assert exported.array[3, 8, 9] == 2
    finally:
        session.close()
    # the clicks live in the scene as a markups point list tied to the segmentation
    markups = [
        scene.GetNthNodeByClass(n, "vtkMRMLMarkupsFiducialNode")
        for n in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode"))
    ]
    assert [m.GetAttribute(CLICKS_ATTRIBUTE) for m in markups] == [segmentation.GetID()]
    assert json.loads(markups[0].GetNthControlPointDescription(0)) == {"label": 2, "positive": True}

    # a new session on the same scene (as after reopening it) finds the clicks and the draft, and can undo
    resumed = RefinementSession(volume, segmentation, bundle_path, device="cpu")
    try:
        assert len(resumed.clicks()) == 1 and resumed.clicks()[0].label == 2
        resumed.undo_last_click()  # no in-memory history: refined again from the stored draft
        resumed.wait()
        assert np.array_equal(labels_from_segmentation(segmentation, volume).array, draft)
    finally:
        resumed.close()


def test_worker_errors_reach_the_panel_as_one_line(bundle_path):
    scene = slicer.vtkMRMLScene()
    image = oblique_image(shape=(4, 24, 24))
    volume = volume_from_image(image, scene, "v")
    segmentation = segmentation_from_labels(image.with_array(np.zeros(image.array.shape, np.uint8)), volume)
    session = RefinementSession(volume, segmentation, bundle_path.parent / "missing-model", device="cpu")
    try:
        with pytest.raises(IdealError, match="unknown structure"):
            session.add_click(ras_of(image, 1, 3, 3), 9, True)
        assert session.clicks() == []  # refused before any point was added
        session.add_click(ras_of(image, 1, 3, 3), 3, True)
        with pytest.raises(IdealError, match="refinement failed") as failure:
            session.wait()
        assert "\n" not in str(failure.value) and not session.busy
    finally:
        session.close()


def test_batch_clicks_file_matches_idealtrain_refine(bundle_path, tmp_path):
    """batch.py --clicks refines a case in place exactly as ``idealtrain refine`` does with the same clicks."""
    import subprocess

    import SimpleITK as sitk

    from IDEALTrain.cli import main as idealtrain
    from IDEALTrain.inference.clicks import Click, clicks_document
    from IDEALTrain.io.phantom import make_phantom_pair
    from IDEALTrain.io.volume_files import write_image

    (tmp_path / "in").mkdir()
    image = make_phantom_pair(1, size=(48, 40, 6)).ed_image
    write_image(image, tmp_path / "in" / "heart.nii.gz")
    (tmp_path / "clicks").mkdir()
    lps = [image.index_to_physical @ np.array([i, j, k, 1.0]) for k, j, i in [(2, 20, 24), (3, 10, 10)]]
    clicks = [Click(tuple(lps[0][:3]), 3, True), Click(tuple(lps[1][:3]), 1, True)]
    (tmp_path / "clicks" / "heart.clicks.json").write_text(json.dumps(clicks_document(clicks)))
    batch = Path(__file__).resolve().parents[1] / "IDEALSegment" / "IDEALSegmentBatch" / "batch.py"
    run = subprocess.run(
        [
            sys.executable,
            str(batch),
            "--model",
            str(bundle_path),
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            "--clicks",
            str(tmp_path / "clicks"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (
        idealtrain(
            [
                "segment",
                "--model",
                str(bundle_path),
                "--input",
                str(tmp_path / "in" / "heart.nii.gz"),
                "--output",
                str(tmp_path / "draft.nrrd"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (
        idealtrain(
            [
                "refine",
                "--model",
                str(bundle_path),
                "--input",
                str(tmp_path / "in" / "heart.nii.gz"),
                "--draft",
                str(tmp_path / "draft.nrrd"),
                "--clicks",
                str(tmp_path / "clicks" / "heart.clicks.json"),
                "--output",
                str(tmp_path / "refined.nrrd"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "heart.seg.nrrd")))
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "refined.nrrd")))
    draft = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "draft.nrrd")))
    assert np.array_equal(ours, theirs) and not np.array_equal(ours, draft)
    assert ours[2, 20, 24] == 3 and ours[3, 10, 10] == 1


def test_refine_controller_places_points_and_tracks_state(bundle_path):
    """The Refine section's decisions: enabled buttons, a placed point becomes a click, undo through the panel."""
    from IDEALSegmentLib.refinement import RefineController

    scene = slicer.vtkMRMLScene()
    image = oblique_image(shape=(4, 28, 30))
    volume = volume_from_image(image, scene, "v")
    draft = np.zeros(image.array.shape, np.uint8)
    segmentation = segmentation_from_labels(image.with_array(draft), volume)
    controller = RefineController()
    assert [name for _, name in controller.structures()] == [
        "Right ventricle",
        "Left ventricle myocardium",
        "Left ventricle blood pool",
    ]
    assert controller.state(volume, None, bundle_path)[:2] == (False, False)
    assert controller.state(volume, segmentation, bundle_path)[:2] == (True, False)
    try:
        markups = controller.start_placing(volume, segmentation, bundle_path, "cpu", 3, True)
        index = markups.AddControlPointWorld(*ras_of(image, 2, 14, 15))  # what the user's click in a view does
        controller.point_placed(index)
        assert controller.state(volume, segmentation, bundle_path)[:2] == (False, False)  # busy
        controller.session.wait()
        assert labels_from_segmentation(segmentation, volume).array[2, 14, 15] == 3
        add, undo, status = controller.state(volume, segmentation, bundle_path)
        assert add and undo and "refined with 1 click" in status and "(level set)" in status  # no network here
        controller.undo(volume, segmentation, bundle_path, "cpu")
        assert np.array_equal(labels_from_segmentation(segmentation, volume).array, draft)
        assert controller.state(volume, segmentation, bundle_path)[:2] == (True, False)
    finally:
        controller.close()


def test_the_engine_selector_reaches_the_worker(tmp_path):
    """A model folder with a correction network refines with it by default; choosing level set takes effect."""
    from IDEALSegmentLib.refinement import RefineController

    from IDEALTrain.model.card import REFINEMENT_FOLDER

    segmentation_bundle = varied_bundle()
    model = save_bundle(segmentation_bundle, tmp_path / "tiny")
    save_bundle(tiny_refinement_bundle(segmentation_bundle), model / REFINEMENT_FOLDER)
    scene = slicer.vtkMRMLScene()
    image = oblique_image(shape=(4, 28, 30))
    volume = volume_from_image(image, scene, "v")
    segmentation = segmentation_from_labels(image.with_array(np.zeros(image.array.shape, np.uint8)), volume)
    controller = RefineController()
    assert controller.engines()[0][0] == "auto" and controller.engine == "auto"
    with pytest.raises(IdealError, match="unknown refinement engine"):
        controller.choose_engine("magic")
    try:
        for engine, name, clicks in (("auto", "correction network", 1), ("levelset", "level set", 2)):
            controller.choose_engine(engine)
            markups = controller.start_placing(volume, segmentation, model, "cpu", 3, True)
            controller.point_placed(markups.AddControlPointWorld(*ras_of(image, 2, 10 + 4 * clicks, 15)))
            status = controller.session.wait()
            assert f"refined with {clicks} click(s)" in status and f"({name})" in status, status
    finally:
        controller.close()


def test_a_click_outside_the_image_is_refused_and_never_joins_the_list(bundle_path):
    """A click outside the image stayed in the click list, so every later click failed until Undo."""
    from IDEALSegmentLib.refinement import RefineController

    scene = slicer.vtkMRMLScene()
    image = oblique_image(shape=(4, 28, 30))
    volume = volume_from_image(image, scene, "v")
    segmentation = segmentation_from_labels(image.with_array(np.zeros(image.array.shape, np.uint8)), volume)
    controller = RefineController()
    outside = ras_of(image, 2, 14, 300)
    try:
        markups = controller.start_placing(volume, segmentation, bundle_path, "cpu", 3, True)
        index = markups.AddControlPointWorld(*outside)  # the user clicked beside the image in a view
        with pytest.raises(IdealError, match="outside the image"):
            controller.point_placed(index)
        session = controller.session
        assert markups.GetNumberOfControlPoints() == 0 and not session.busy and session.undo_stack == []
        with pytest.raises(IdealError, match="outside the image"):
            session.add_click(outside, 3, False)
        assert session.clicks() == [] and not session.busy
        session.add_click(ras_of(image, 2, 14, 15), 3, True)  # the next click works
        assert "refined with 1 click" in session.wait()
        assert labels_from_segmentation(segmentation, volume).array[2, 14, 15] == 3
    finally:
        controller.close()
