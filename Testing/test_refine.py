"""Click-to-fix refinement engine and ``idealtrain refine``: clicks honoured, exact grid, bad clicks refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import oblique_image, tiny_refinement_bundle, varied_bundle

from IDEALTrain.cli import main
from IDEALTrain.errors import IdealError
from IDEALTrain.inference.clicks import Click, clicks_document, parse_clicks, voxel_of
from IDEALTrain.inference.refine import Refiner, distance_from_clicks_mm
from IDEALTrain.inference.refine_engines import ENGINES
from IDEALTrain.io.image import Image
from IDEALTrain.io.volume_files import read_image, write_image
from IDEALTrain.model.bundle import load_bundle, save_bundle
from IDEALTrain.model.card import REFINEMENT_FOLDER


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    return save_bundle(varied_bundle(), tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def guided_bundle_path(tmp_path_factory):
    """A tiny model folder that carries a (random) refinement network in refinement/, as the shipped one does."""
    segmentation = varied_bundle()
    path = save_bundle(segmentation, tmp_path_factory.mktemp("guided") / "tiny")
    save_bundle(tiny_refinement_bundle(segmentation), path / REFINEMENT_FOLDER)
    return path


def point_of(image: Image, k: int, j: int, i: int) -> tuple[float, float, float]:
    return tuple(float(v) for v in (image.index_to_physical @ np.array([i, j, k, 1.0]))[:3])


def test_points_map_to_their_voxel_on_an_oblique_grid():
    image = oblique_image()
    for voxel in [(0, 0, 0), (3, 17, 29), (6, 39, 47)]:
        assert voxel_of(image, point_of(image, *voxel)) == voxel
    with pytest.raises(IdealError, match="outside the image") as outside:
        voxel_of(image, point_of(image, 7, 0, 0))
    assert "np.float" not in str(outside.value) and "voxel index (0.0, 0.0, 7.0)" in str(outside.value)


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_clicked_voxels_are_honoured_and_changes_stay_near_clicks(bundle_path, guided_bundle_path, engine):
    image = oblique_image()
    path = guided_bundle_path if engine == "guided" else bundle_path
    refiner = Refiner(path, device="cpu", engine=engine, radius_mm=12.0, propagate_slices=0)
    draft = refiner.predictor.predict(image).labels
    voxels = [
        ((2, 10, 12), 3, True),
        ((2, 12, 14), 1, True),
        ((4, 30, 30), int(draft.array[4, 30, 30]) or 2, False),
        ((5, 20, 40), 2, True),
        ((5, 20, 40), 2, False),
    ]  # the same voxel twice: the later click wins
    clicks = [Click(point_of(image, *v), label, positive) for v, label, positive in voxels]
    result = refiner.refine(image, draft, clicks)
    assert result.labels.same_grid(image) and result.labels.array.dtype == np.uint8
    final = {}
    for voxel, label, positive in voxels:
        final[voxel] = (label, positive)
    for voxel, (label, positive) in final.items():
        assert (result.labels.array[voxel] == label) == positive, (voxel, label, positive)
    changed = result.labels.array != draft.array
    assert result.changed_voxels == int(changed.sum()) > 0
    assert set(np.flatnonzero(changed.any(axis=(1, 2)))) <= {2, 4, 5}  # only clicked slices (no propagation)
    # in-plane reach: voxels of a clicked slice farther than the radius from its clicks keep the draft,
    # except a blob deleted whole by a negative click in its middle (it was that structure, now is not)
    far = changed & (distance_from_clicks_mm(image, clicks) > 12.0 + 1e-6)
    deleted = np.zeros_like(far)
    for (k, _, _), label, positive in voxels:
        if not positive:
            deleted[k] = (draft.array[k] == label) & (result.labels.array[k] != label)
    assert not (far & ~deleted).any()


def test_no_clicks_no_change(bundle_path):
    image = oblique_image(seed=2)
    refiner = Refiner(bundle_path, device="cpu")
    draft = image.with_array(np.random.default_rng(0).integers(0, 4, image.array.shape).astype(np.uint8))
    result = refiner.refine(image, draft, [])
    assert np.array_equal(result.labels.array, draft.array) and result.changed_voxels == 0
    assert result.labels.same_grid(image)


def test_a_positive_click_fills_the_region_it_lands_in_and_stops_at_its_edge(bundle_path):
    """A bright disk the prior misses: one click inside recovers it, the darker surround stays."""
    rng = np.random.default_rng(1)
    j, i = np.mgrid[:64, :64]
    disk = (j - 30) ** 2 + (i - 34) ** 2 <= 8**2
    array = np.repeat((np.where(disk, 800.0, 200.0) + rng.normal(0, 15, (64, 64)))[None], 3, axis=0)
    image = Image(array.astype(np.float32), spacing=(1.25, 1.25, 8.0))
    refiner = Refiner(bundle_path, device="cpu", engine="levelset", propagate_slices=0)  # on the clicked slice only
    probabilities = np.full((4, *image.array.shape), 0.02, np.float32)
    probabilities[0] = 0.94
    probabilities[3][:, disk] = 0.3  # the network half-sees it
    refiner.set_prior(image, probabilities)
    draft = image.with_array(np.zeros(image.array.shape, np.uint8))
    result = refiner.refine(image, draft, [Click(point_of(image, 1, 30, 34), 3, True)]).labels.array
    found = result[1] == 3
    assert 2 * (found & disk).sum() / (found.sum() + disk.sum()) > 0.85
    assert not result[0].any() and not result[2].any()
    # and a negative click inside removes it again
    result = refiner.refine(
        image,
        image.with_array(np.where(disk, 3, 0)[None].repeat(3, 0).astype(np.uint8)),
        [Click(point_of(image, 1, 30, 34), 3, False)],
    ).labels.array
    assert (result[1][disk] == 3).mean() < 0.15 and (result[0][disk] == 3).all()


def test_a_negative_click_deletes_the_blob_it_is_centred_in_and_trims_near_an_edge(bundle_path):
    """A spurious 45 mm blob: a click at its centre deletes all of it; a click near its edge only trims there."""
    j, i = np.mgrid[:64, :64]
    blob = (np.abs(j - 32) < 18) & (np.abs(i - 32) < 18)
    image = Image(np.repeat(np.where(blob, 700.0, 200.0)[None], 3, axis=0).astype(np.float32), (1.25, 1.25, 8.0))
    refiner = Refiner(bundle_path, device="cpu", engine="levelset", radius_mm=12.0, propagate_slices=0)
    probabilities = np.full((4, *image.array.shape), 0.02, np.float32)
    probabilities[0] = np.where(blob, 0.02, 0.94)
    probabilities[1] = np.where(blob, 0.94, 0.02)  # the network is sure of it
    refiner.set_prior(image, probabilities)
    draft = image.with_array(np.where(blob, 1, 0)[None].repeat(3, 0).astype(np.uint8))
    centre = refiner.refine(image, draft, [Click(point_of(image, 1, 32, 32), 1, False)]).labels.array
    assert not (centre[1] == 1).any() and np.array_equal(centre[[0, 2]], draft.array[[0, 2]])
    edge_click = [Click(point_of(image, 1, 32, 16), 1, False)]
    edge = refiner.refine(image, draft, edge_click).labels.array
    changed = edge != draft.array
    assert edge[1, 32, 16] == 0 and 0 < changed.sum() < blob.sum() / 2
    assert distance_from_clicks_mm(image, edge_click)[changed].max() <= 12.0 + 1e-6


def test_the_guided_engine_is_the_default_where_the_model_carries_a_refinement_network(bundle_path, guided_bundle_path):
    assert Refiner(guided_bundle_path, device="cpu").engine == "guided"
    assert Refiner(bundle_path, device="cpu").engine == "levelset"
    assert Refiner(guided_bundle_path, device="cpu", engine="levelset").engine == "levelset"
    with pytest.raises(IdealError, match="needs a refinement network"):
        Refiner(bundle_path, device="cpu", engine="guided")
    with pytest.raises(IdealError, match="not a refinement network"):
        Refiner(bundle_path, device="cpu", engine="guided", refinement=bundle_path)
    # an explicit refinement bundle works with a model folder that has none
    explicit = Refiner(bundle_path, device="cpu", refinement=guided_bundle_path / REFINEMENT_FOLDER)
    assert explicit.engine == "guided"


def test_a_refinement_network_for_other_labels_or_used_as_a_segmentation_model_is_refused(
    bundle_path, guided_bundle_path, tmp_path
):
    other = tiny_refinement_bundle(varied_bundle())
    other.labels = other.labels[:2]
    other.network = type(other.network)(**{**other.network.to_json(), "num_classes": 3})
    from IDEALTrain.model.refinement_network import RefinementNetwork

    other.weights = RefinementNetwork(other.network).state_dict()
    with pytest.raises(IdealError, match="made for labels"):
        Refiner(bundle_path, device="cpu", refinement=other)
    with pytest.raises(IdealError, match="not a segmentation model"):
        Refiner(guided_bundle_path / REFINEMENT_FOLDER, device="cpu")
    loaded = load_bundle(guided_bundle_path / REFINEMENT_FOLDER)
    assert loaded.kind == "refinement" and loaded.network.depth == 3
    with pytest.raises(IdealError, match="unknown architecture 'ideal-unet2d'"):
        type(loaded.network).from_json({"name": "ideal-unet2d"})  # a segmentation architecture in a refinement card
    loaded.weights.pop("head.bias")
    with pytest.raises(IdealError, match="1 missing"):
        loaded.check_weights()


def test_an_untrained_refinement_network_keeps_the_draft_apart_from_the_clicked_voxels(bundle_path):
    """Its last layer starts at zero: the output is the draft prior, so only the clicks themselves change labels."""
    image = oblique_image(seed=4)
    untrained = tiny_refinement_bundle(varied_bundle(), trained=False)
    refiner = Refiner(bundle_path, device="cpu", refinement=untrained, propagate_slices=0)
    draft = refiner.predictor.predict(image).labels
    voxels = [((3, 20, 20), 3, True), ((3, 25, 30), 1, True)]
    clicks = [Click(point_of(image, *v), label, positive) for v, label, positive in voxels]
    result = refiner.refine(image, draft, clicks).labels.array
    changed = np.argwhere(result != draft.array)
    assert {tuple(v) for v in changed} <= {v for v, _, _ in voxels}
    assert all(result[v] == label for v, label, _ in voxels)


def test_an_adjacent_guidance_network_edits_the_clicked_slice_and_its_neighbours_only_near_the_click(bundle_path):
    image = oblique_image(seed=5)
    refiner = Refiner(bundle_path, device="cpu", refinement=tiny_refinement_bundle(varied_bundle(), adjacent=True))
    draft = refiner.predictor.predict(image).labels
    voxels = [((3, 20, 24), 3, True), ((3, 8, 8), 1, False)]
    clicks = [Click(point_of(image, *v), label, positive) for v, label, positive in voxels]
    result = refiner.refine(image, draft, clicks).labels.array
    assert all((result[v] == label) == positive for v, label, positive in voxels)
    changed = result != draft.array
    assert changed[[2, 4]].any() and not changed[[0, 1, 5, 6]].any()  # the neighbours, nothing beyond
    assert distance_from_clicks_mm(image, clicks)[changed].max() <= refiner.radius_mm + 1e-6  # within reach in 3D


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"clicks": [{"point": [0, 0], "label": 1}]}, "three finite numbers"),
        ({"clicks": [{"point": [0, 0, "x"], "label": 1}]}, "three finite numbers"),
        ({"clicks": [{"point": [0, 0, 0], "label": "LV"}]}, "integer label"),
        ({"clicks": [{"point": [0, 0, 0], "label": 1, "positive": "yes"}]}, "true or false"),
        ({"points": []}, "JSON object"),
        ({"space": "voxel", "clicks": []}, "'space' must be one of lps, ras, ijk"),
    ],
)
def test_malformed_clicks_are_refused(document, message):
    with pytest.raises(IdealError, match=message):
        parse_clicks(document)


def test_bad_clicks_and_drafts_are_refused(bundle_path):
    image = oblique_image()
    refiner = Refiner(bundle_path, device="cpu")
    draft = image.with_array(np.zeros(image.array.shape, np.uint8))
    with pytest.raises(IdealError, match="outside the image"):
        refiner.refine(image, draft, [Click((1e4, 0.0, 0.0), 3, True)])
    with pytest.raises(IdealError, match="unknown label 7"):
        refiner.refine(image, draft, [Click(point_of(image, 1, 1, 1), 7, True)])
    shifted = Image(draft.array, draft.spacing, (0.0, 0.0, 0.0), draft.direction)
    with pytest.raises(IdealError, match="another grid"):
        refiner.refine(image, shifted, [Click(point_of(image, 1, 1, 1), 3, True)])


def test_cli_refine_contract(bundle_path, tmp_path, capsys):
    image = oblique_image(shape=(5, 32, 36))
    write_image(image, tmp_path / "image.nrrd")
    draft = image.with_array(np.zeros(image.array.shape, np.uint8))
    write_image(draft, tmp_path / "draft.nrrd")
    clicks = [Click(point_of(image, 2, 16, 18), 3, True), Click(point_of(image, 3, 5, 5), 1, False)]
    (tmp_path / "clicks.json").write_text(json.dumps(clicks_document(clicks)))
    args = [
        "refine",
        "--model",
        str(bundle_path),
        "--input",
        str(tmp_path / "image.nrrd"),
        "--draft",
        str(tmp_path / "draft.nrrd"),
        "--clicks",
        str(tmp_path / "clicks.json"),
        "--device",
        "cpu",
    ]
    out = tmp_path / "refined.nii.gz"
    assert main([*args, "--output", str(out)]) == 0
    refined = read_image(out)
    assert refined.same_grid(image) and refined.array[2, 16, 18] == 3
    before = out.read_bytes()
    capsys.readouterr()
    assert main([*args, "--output", str(out)]) == 2  # no overwrite without --overwrite
    assert out.read_bytes() == before and "exists" in capsys.readouterr().err
    for bad, message in [
        ({"clicks": [{"point": [1e4, 0, 0], "label": 3, "positive": True}]}, "outside the image"),
        ({"clicks": [{"point": list(clicks[0].point), "label": 9, "positive": True}]}, "unknown label"),
    ]:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        bad_args = [a if a != str(tmp_path / "clicks.json") else str(tmp_path / "bad.json") for a in args]
        assert main([*bad_args, "--output", str(tmp_path / "bad.nrrd")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "bad.nrrd").exists()
    # The same clicks as voxel indices (i, j, k) or RAS mm give the same refined labels.
    ras = [{"point": [-c.point[0], -c.point[1], c.point[2]], "label": c.label, "positive": c.positive} for c in clicks]
    for name, document in [
        ("ijk", {"space": "ijk", "clicks": [{"point": [18, 16, 2], "label": 3}, {"point": [5, 5, 3], "label": 1, "positive": False}]}),
        ("ras", {"space": "ras", "clicks": ras}),
    ]:
        (tmp_path / f"{name}.json").write_text(json.dumps(document))
        spaced = [a if a != str(tmp_path / "clicks.json") else str(tmp_path / f"{name}.json") for a in args]
        assert main([*spaced, "--output", str(tmp_path / f"{name}.nrrd")]) == 0
        assert np.array_equal(read_image(tmp_path / f"{name}.nrrd").array, refined.array), name
    (tmp_path / "far.json").write_text(json.dumps({"space": "ijk", "clicks": [{"point": [36, 0, 0], "label": 3}]}))
    far = [a if a != str(tmp_path / "clicks.json") else str(tmp_path / "far.json") for a in args]
    assert main([*far, "--output", str(tmp_path / "bad.nrrd")]) == 2
    assert "outside the image" in capsys.readouterr().err
    # a cine without --frame: the error names --frame only (refine has no --all-frames)
    import SimpleITK as sitk

    sitk.WriteImage(sitk.JoinSeries([image.to_sitk(), image.to_sitk()]), str(tmp_path / "cine.nii.gz"))
    cine = [a if a != str(tmp_path / "image.nrrd") else str(tmp_path / "cine.nii.gz") for a in args]
    assert main([*cine, "--output", str(tmp_path / "bad.nrrd")]) == 2
    err = capsys.readouterr().err
    assert "choose one with --frame N (0-1)" in err and "--all-frames" not in err
    write_image(Image(draft.array[:, :, :-1]), tmp_path / "other.nrrd")
    other_args = [a if a != str(tmp_path / "draft.nrrd") else str(tmp_path / "other.nrrd") for a in args]
    assert main([*other_args, "--output", str(tmp_path / "bad.nrrd")]) == 2
    assert "another grid" in capsys.readouterr().err


def test_simulated_clicks_fix_the_shipped_models_worst_acdc_volume(acdc_dir):
    """Real data, real model: three simulated clicks per structure raise Dice on ACDC patient030_frame02 (RV 0.48)."""
    import sys
    from pathlib import Path

    from IDEALTrain.io.ssl4mis import list_cases, read_case

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from interactive import DEFAULT_MODEL, dice, next_click

    case = next(c for c in list_cases(acdc_dir, "val.list") if c.name == "patient030_frame02")
    image, reference = read_case(case)
    refiner = Refiner(DEFAULT_MODEL, device="cpu")
    draft = refiner.predictor.predict(image).labels
    labels, clicks = draft.array, []
    for _ in range(3):
        for structure in (1, 2, 3):
            (k, j, i), positive = next_click(labels, reference.array, structure, image.spacing[::-1])
            clicks.append(Click(point_of(image, k, j, i), structure, positive))
            labels = refiner.refine(image, draft, clicks).labels.array
            assert (labels[k, j, i] == structure) == positive
    before = np.mean([dice(draft.array, reference.array, s) for s in (1, 2, 3)])
    after = np.mean([dice(labels, reference.array, s) for s in (1, 2, 3)])
    assert after > before + 0.05, (before, after)
    far = (labels != draft.array) & (distance_from_clicks_mm(image, clicks) > 20.0)
    negative = {c.label for c in clicks if not c.positive}  # only whole deleted blobs may reach farther
    assert np.isin(draft.array[far], list(negative)).all() and (labels[far] != draft.array[far]).all()


@pytest.mark.parametrize("entry", ["file", "loop", "pickle"])
def test_a_refinement_entry_that_is_no_network_is_an_error_not_a_silent_level_set(tmp_path, entry):
    """A refinement entry that was a file or a symlink loop silently fell back to level set."""
    segmentation = varied_bundle()
    path = save_bundle(segmentation, tmp_path / "model")
    if entry == "file":
        (path / REFINEMENT_FOLDER).write_text("not a network")
    elif entry == "loop":
        (path / REFINEMENT_FOLDER).symlink_to(path / REFINEMENT_FOLDER)
    else:
        (path / REFINEMENT_FOLDER).mkdir()
        (path / REFINEMENT_FOLDER / "model.pt").write_bytes(b"\x80\x04\x95 a pickle")
    message = {"file": "is not a folder", "loop": "looping symbolic link", "pickle": "pickle"}[entry]
    for engine in ("auto", "guided"):
        with pytest.raises(IdealError, match=message):
            Refiner(path, device="cpu", engine=engine)
    assert Refiner(path, device="cpu", engine="levelset").engine == "levelset"  # asked for level set: no network read


def test_the_warm_refine_cache_follows_the_verified_checksum_not_the_folder_time(guided_bundle_path, tmp_path, capsys):
    """The worker kept a refinement/ network replaced or damaged in place (same folder time) in memory."""
    import os
    import shutil

    from IDEALTrain.cli import refine as refine_cli

    model = tmp_path / "model"
    shutil.copytree(guided_bundle_path, model)
    image = oblique_image(shape=(5, 32, 36))
    write_image(image, tmp_path / "image.nrrd")
    write_image(image.with_array(np.zeros(image.array.shape, np.uint8)), tmp_path / "draft.nrrd")
    (tmp_path / "clicks.json").write_text(json.dumps(clicks_document([Click(point_of(image, 2, 16, 18), 3, True)])))
    args = ["refine", "--model", str(model), "--input", str(tmp_path / "image.nrrd"), "--draft", str(tmp_path / "draft.nrrd"),
            "--clicks", str(tmp_path / "clicks.json"), "--device", "cpu", "--output", str(tmp_path / "out.nrrd"), "--overwrite"]
    assert main(args) == 0
    first = refine_cli._last["refiner"]
    assert main(args) == 0 and refine_cli._last["refiner"] is first  # unchanged: the warm refiner is reused
    folder_time = os.stat(model).st_mtime_ns
    other = save_bundle(tiny_refinement_bundle(varied_bundle(), seed=7), tmp_path / "other")
    for name in ("card.json", "model.safetensors"):  # replaced in place: same names, same model folder
        (model / REFINEMENT_FOLDER / name).write_bytes((other / name).read_bytes())
    assert os.stat(model).st_mtime_ns == folder_time
    assert main(args) == 0 and refine_cli._last["refiner"] is not first  # reloaded
    weights = model / REFINEMENT_FOLDER / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # damaged in place
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "checksum" in err and len(err.splitlines()) == 1
