"""The web app without a browser: its security checks, the study list, and its session over the panels' controllers.

The session is driven on a real slicer-core scene with real child processes (a tiny model), as the
browser's buttons drive it; the end-to-end test (test_web_e2e.py) adds the page itself.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import import_slicer_core

slicer = import_slicer_core()

from IDEALSegmentLib.corrections import read_manifest  # noqa: E402
from IDEALSegmentLib.measurements import table_measurements  # noqa: E402
from IDEALSegmentLib.registry import ModelRegistry  # noqa: E402
from IDEALSegmentLib.segmentations import labels_from_segmentation, register_converter_rules  # noqa: E402
from test_logic_cine import responsive_bundle  # noqa: E402

from IDEALTrain.errors import IdealError  # noqa: E402
from IDEALTrain.io.phantom import make_phantom_pair  # noqa: E402
from IDEALTrain.io.volume_files import read_label, write_image  # noqa: E402
from IDEALTrain.labels import CARDIAC_LABELS  # noqa: E402
from IDEALTrain.model.bundle import save_bundle  # noqa: E402
from IDEALWeb.app import main  # noqa: E402
from IDEALWeb.security import DataFolder, OutputFolder, serve_policy  # noqa: E402
from IDEALWeb.session import WebSession  # noqa: E402
from IDEALWeb.studies import list_studies  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A models folder with one small model whose labels follow the image (so ED and ES differ)."""
    bundle = responsive_bundle()
    bundle.model_id, bundle.version = "web-test", "1.0.0"
    root = tmp_path_factory.mktemp("models")
    save_bundle(bundle, root / "user" / "web-test-1.0.0")
    (root / "shipped").mkdir()
    return root


@pytest.fixture
def folders(tmp_path):
    """A data folder with an ED/ES pair, a single volume and a 4D cine (and the output folder inside it)."""
    pair = make_phantom_pair(5, size=(48, 40, 6), spacing=(1.5, 1.5, 8.0))
    data = tmp_path / "data"
    write_image(pair.ed_image, data / "pairs" / "case1_ED.nii.gz")
    write_image(pair.es_image, data / "pairs" / "case1_ES.nii.gz")
    write_image(pair.ed_image, data / "single.nrrd")
    frames = [sitk.GetImageFromArray(((1 - w) * pair.ed_image.array + w * pair.es_image.array).astype(np.float32)) for w in (0.0, 0.5, 1.0)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(data / "cine.nii.gz"))
    return DataFolder(data), OutputFolder(data / "results"), pair


def new_session(folders, models):
    data, output, _ = folders
    register_converter_rules()
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSequencesLogic()
    logic.SetMRMLScene(scene)
    return WebSession(scene, logic, data, output, ModelRegistry(models / "user", models / "shipped"), device="cpu", reviewer="tester")


def until(session, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = session.poll()
        if getattr(events, what) or events.error:
            return events
        time.sleep(0.05)
    raise AssertionError(f"no {what} event in time")


def test_serving_beyond_this_computer_needs_an_access_token():
    assert serve_policy(None).host == "127.0.0.1"
    assert serve_policy(None).banner(8080) == "IDEALSegment web: serving http://127.0.0.1:8080/ to this computer only (loopback)"
    with pytest.raises(IdealError, match="without an access token"):
        serve_policy("0.0.0.0")
    with pytest.raises(IdealError, match="too short"):
        serve_policy("0.0.0.0", token="short")
    policy = serve_policy("0.0.0.0", 9000, token="a-long-enough-token-123")
    assert "to the network" in policy.banner() and "?secret=<access token>" in policy.banner()
    assert policy.token == "a-long-enough-token-123"  # wslink checks it on every websocket (test_web_e2e)
    assert serve_policy("localhost").token is None and serve_policy("::1").token is None


def test_the_app_refuses_to_start_on_another_host_without_a_token(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("IDEALSEGMENT_WEB_TOKEN", raising=False)
    assert main(["--data", str(tmp_path), "--output", str(tmp_path / "out"), "--host", "192.168.1.20"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "without an access token" in error and "Traceback" not in error
    assert main(["--data", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_only_files_under_the_data_folder_can_be_opened(folders, models, tmp_path):
    data, output, pair = folders
    outside = tmp_path / "secret.nii.gz"
    write_image(pair.ed_image, outside)
    (data.root / "link.nii.gz").symlink_to(outside)
    for path in ("../secret.nii.gz", str(outside), "pairs/../../secret.nii.gz", "link.nii.gz", "/etc/passwd"):
        with pytest.raises(IdealError, match="outside the data folder"):
            data.resolve(path)
    session = new_session(folders, models)
    before = session.scene.GetNumberOfNodes()
    with pytest.raises(IdealError, match="outside the data folder"):
        session.open("../secret.nii.gz")
    assert session.scene.GetNumberOfNodes() == before and session.study is None
    with pytest.raises(IdealError, match="outside the output folder"):
        output.path("..", "elsewhere.json")


def test_the_study_list_holds_pairs_volumes_and_cines_but_not_the_output_folder(folders, models):
    data, output, _ = folders
    write_image(folders[2].ed_image, output.folder("studies", "x") / "saved.nrrd")
    studies = {s.study_id: s.kind for s in list_studies(data, skip=output.root)}
    assert studies == {"sample:": "sample", "pairs/case1_ED.nii.gz": "pair", "single.nrrd": "volume", "cine.nii.gz": "volume"}
    session = new_session(folders, models)
    pair = session.open("pairs/case1_ED.nii.gz")
    assert pair.es_volume is not None and session.panel.p.esVolume is pair.es_volume and pair.frames == 1
    cine = session.open("cine.nii.gz")
    assert cine.browser is not None and cine.frames == 3 and session.panel.p.esVolume is None
    assert cine.browser.GetProxyNode(cine.sequence) is session.panel.p.inputVolume
    session.set_frame(2)
    assert cine.browser.GetSelectedItemNumber() == 2
    with pytest.raises(IdealError, match="outside the cine's 3 frames"):
        session.set_frame(3)
    assert session.scene.GetNodesByClass("vtkMRMLSequenceNode").GetNumberOfItems() == 1  # the pair was closed


def test_segment_measure_edit_save_and_review_a_pair(folders, models):
    data, output, _ = folders
    session = new_session(folders, models)
    assert session.models() == [{"value": "web-test@1.0.0", "title": session.panel.entries[0].display_name}]
    session.open("pairs/case1_ED.nii.gz")
    session.segment()
    assert session.busy
    events = until(session, "segmented")
    assert events.error is None, session.panel.p.statusText
    p = session.panel.p
    rows = session.table()
    exact = table_measurements(p.measurementsTable)
    assert {row["key"]: (float(row["exact"]) if row["exact"] else None) for row in rows} == exact
    decimals = {key: 0 if key.endswith("_frame") else 1 for key in exact}  # frame indices are whole numbers
    wrong = [(row["key"], row["shown"]) for row in rows if exact[row["key"]] is not None and row["shown"] != f"{exact[row['key']]:.{decimals[row['key']]}f}"]
    assert not wrong
    labels = labels_from_segmentation(p.segmentation, p.inputVolume, CARDIAC_LABELS).array
    counts = session.voxel_counts()
    assert counts == {info.segment_id: int((labels == info.value).sum()) for info in CARDIAC_LABELS} and sum(counts.values()) > 0
    session.showing_es = True
    assert session.shown_segmentation() is p.esSegmentation and session.voxel_counts() != counts

    first = session.save()
    second = session.save()
    assert [f.name for f in first] == ["case1_ES-001.seg.nrrd", "case1_ES-001.measurements.json"]
    assert second[0].name == "case1_ES-002.seg.nrrd" and all(f.is_file() for f in first + second)
    assert np.array_equal(read_label(first[0]).array, labels_from_segmentation(p.esSegmentation, p.esVolume, CARDIAC_LABELS).array)
    assert all(output.root in f.parents for f in first + second)

    with pytest.raises(IdealError, match="nothing reviewed"):  # nothing edited, nothing ticked
        session.mark_reviewed()
    path = session.mark_reviewed(["LV", "LV_Myocardium"])
    cases = [case for case in read_manifest(output.corrections) if case["kind"] == "labeled"]
    assert len(cases) == 1 and cases[0]["case_id"] == "case1_ES" and cases[0]["reviewer"] == "tester" and path.is_file()
    assert any(case["kind"] != "labeled" for case in read_manifest(output.corrections))  # its scan joined the pool
    session.showing_es = False
    assert session.add_to_pool() == 2  # the pool now holds the reviewed ES scan (added at Mark reviewed) and this ED one
    assert session.recompute() == {key: value for key, value in exact.items() if not key.endswith("_frame")}
    session.shutdown()


def test_a_segmentation_works_in_the_output_folder_and_a_cine_segments_whole(folders, models):
    data, output, _ = folders
    session = new_session(folders, models)
    session.open("cine.nii.gz")
    session.segment()
    assert output.scratch in session.panel.job.folder.parents  # the job's files: under the output folder
    assert until(session, "segmented").error is None, session.panel.p.statusText
    rows = {row["key"]: row for row in session.table()}
    assert {"ed_frame", "es_frame"} <= set(rows) or {"lv_ef_percent"} <= set(rows)
    session.set_frame(1)
    assert sum(session.voxel_counts().values()) > 0
    session.shutdown()


def test_a_dicom_cine_opens_as_a_sequence_split_by_phase(sunnybrook_dir, models, tmp_path):
    """A real Sunnybrook cine folder (20 phases of 12 slices) through IDEALTrain's reader: a Sequence and its browser."""
    from IDEALSegmentLib.volumes import image_from_volume

    from IDEALTrain.io.volume_files import read_frames

    folder = sunnybrook_dir / "cine" / "SCD0000101"
    session = new_session((DataFolder(folder.parent), OutputFolder(tmp_path / "out"), None), models)
    assert "SCD0000101" in [s["value"] for s in session.studies()]
    study = session.open("SCD0000101")
    frames = read_frames(folder)
    assert study.frames == len(frames) == 20 and study.browser is not None
    session.set_frame(7)
    shown = image_from_volume(study.volume)
    assert np.array_equal(shown.array, frames[7].array) and shown.same_grid(frames[7])


def test_cancel_leaves_the_scene_as_it_was(folders, models):
    session = new_session(folders, models)
    session.open("single.nrrd")
    before = session.scene.GetNumberOfNodes()
    session.segment()
    session.cancel()
    deadline = time.monotonic() + 60
    while session.panel.polling and time.monotonic() < deadline:
        session.poll()
        time.sleep(0.05)
    assert not session.busy and session.panel.p.segmentation is None
    assert session.scene.GetNumberOfNodes() == before and session.panel.p.statusText.startswith("Cancelled")
    session.shutdown()
