"""Training of the click-conditioned correction network: simulated clicks, harder drafts, the training
data, a tiny reproducible run, the refinement bundle the Refiner finds, and ``idealtrain train-refiner``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import varied_bundle

from IDEALTrain.cli import main
from IDEALTrain.errors import IdealError
from IDEALTrain.inference.predictor import Predictor
from IDEALTrain.inference.refine import Click, Refiner
from IDEALTrain.io.phantom import make_phantom
from IDEALTrain.io.ssl4mis import list_cases, write_ssl4mis_volume
from IDEALTrain.model.bundle import load_bundle, read_card, save_bundle
from IDEALTrain.model.card import REFINEMENT_FOLDER
from IDEALTrain.model.refinement_network import RefinementConfig, RefinementNetwork
from IDEALTrain.training.refinement_samples import (
    adjacent_slices,
    corrupt,
    disk,
    make_adjacent_sample,
    make_sample,
    simulate_clicks,
)
from IDEALTrain.training.refinement_training import (
    prepare_refinement_data,
    refinement_bundle,
    train_refinement,
    training_summary,
)

TINY = RefinementConfig(base_channels=4, depth=2)
SHAPE = (64, 64)


def heart() -> np.ndarray:
    """A synthetic ACDC slice: LV disk (3), myocardial ring (2), RV (1) beside it."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[disk(SHAPE, (32, 50), 10)] = 1
    labels[disk(SHAPE, (32, 30), 12)] = 2
    labels[disk(SHAPE, (32, 30), 8)] = 3
    return labels


def phantoms(count: int = 2):
    return [make_phantom(seed, size=(64, 64, 4), spacing=(2.0, 2.0, 8.0)) for seed in range(count)]


@pytest.fixture(scope="module")
def segmentation_path(tmp_path_factory):
    return save_bundle(varied_bundle(), tmp_path_factory.mktemp("segmentation") / "tiny")


@pytest.fixture(scope="module")
def data(segmentation_path):
    return prepare_refinement_data(Predictor(segmentation_path, "cpu"), phantoms(), stored_px=48)


@pytest.fixture(scope="module")
def trained(data):
    return train_refinement(data, TINY, iterations=60, batch=8, lr=1e-2, seed=0, device="cpu", crop_px=32)


def test_a_training_click_lands_in_the_missed_region_then_in_the_false_one():
    reference = np.zeros(SHAPE, np.uint8)
    reference[disk(SHAPE, (32, 32), 10)] = 3
    missed = reference.astype(bool).copy()
    missed[:, :32] = False  # the draft lost the LV's right half ...
    false = disk(SHAPE, (10, 10), 5)  # ... and sees a false LV in the corner
    draft = np.where(missed, 0, reference).astype(np.uint8)
    draft[false] = 3
    for seed in range(20):
        rng = np.random.default_rng(seed)
        clicks = simulate_clicks(draft, reference, rng, count=2, random_chance=0.0)
        assert [(c.label, c.positive) for c in clicks] == [(3, True), (3, False)]
        assert missed[clicks[0].voxel] and false[clicks[1].voxel]
    only_false = np.where(false, 3, reference).astype(np.uint8)
    for seed in range(10):
        (click,) = simulate_clicks(only_false, reference, np.random.default_rng(seed), count=1, random_chance=0.0)
        assert not click.positive and false[click.voxel]
    # nothing wrong: a confirming positive click inside a structure
    (click,) = simulate_clicks(reference, reference, np.random.default_rng(0), count=1)
    assert click.positive and reference[click.voxel] == click.label


def test_corruption_makes_a_different_draft_of_the_same_classes():
    reference = heart()
    drafts = [corrupt(reference, np.random.default_rng(seed)) for seed in range(40)]
    changed = [int((d != reference).sum()) for d in drafts]
    assert sum(n > 0 for n in changed) >= 36  # a blob over its own class or a zero shift may change nothing
    assert np.median(changed) >= 20
    assert all(d.dtype == np.uint8 and d.shape == SHAPE and d.max() <= 3 for d in drafts)
    assert (reference == heart()).all()  # the input is left alone


def test_training_data_are_crops_around_the_heart(segmentation_path, data):
    assert {k: (v.shape, v.dtype) for k, v in data.items()} == {
        "image": ((8, 48, 48), np.float16),
        "prior": ((8, 4, 48, 48), np.float16),
        "draft": ((8, 48, 48), np.uint8),
        "label": ((8, 48, 48), np.uint8),
        "volume": ((8,), np.int32),
        "position": ((8,), np.int32),
        "corner": ((8, 2), np.int32),
    }
    assert data["volume"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and data["position"].tolist() == [0, 1, 2, 3] * 2
    assert adjacent_slices(data)[:4] == [[1], [0, 2], [1, 3], [2]] and adjacent_slices(data)[4] == [5]
    assert np.allclose(data["prior"].astype(np.float32).sum(axis=1), 1.0, atol=1e-2)
    assert 0.0 <= data["image"].min() and data["image"].max() <= 1.0
    image, label = phantoms(1)[0]
    assert sum(int((s > 0).sum()) for s in data["label"][:4]) == int((label.array > 0).sum())  # all the heart kept
    wide = prepare_refinement_data(Predictor(segmentation_path, "cpu"), [(image, label)], stored_px=96)
    outside = np.ones((96, 96), bool)
    outside[16:80, 16:80] = False  # a 64 px slice in a 96 px crop: padding somewhere around it
    padded = outside & (wide["image"].sum(axis=0) == 0) & (wide["prior"][:, 0].min(axis=0) == 1)
    assert padded.any()  # the prior outside the slice is certain background


def test_validation_volumes_are_refused(tmp_path, segmentation_path):
    image, label = phantoms(1)[0]
    write_ssl4mis_volume(tmp_path / "data" / "slices" / "patient001_frame01_slice_1.h5", image, label)
    (tmp_path / "train_slices.list").write_text("patient001_frame01_slice_1\n")
    (tmp_path / "val.list").write_text("patient001_frame01\n")
    with pytest.raises(IdealError, match="val.list"):
        prepare_refinement_data(Predictor(segmentation_path, "cpu"), list_cases(tmp_path, "train_slices.list"))


def _held_out_loss(data, weights=None) -> float:
    rng = np.random.default_rng(123)
    samples = [make_sample(data, n % len(data["image"]), rng, TINY, 32) for n in range(16)]
    image, prior, guide, reference, weight = (torch.from_numpy(np.stack(part)) for part in zip(*samples))
    network = RefinementNetwork(TINY)
    if weights is not None:
        network.load_state_dict(weights)
    with torch.no_grad():
        logits = network.eval()(image, prior, guide)
    return float((F.cross_entropy(logits, reference, reduction="none") * weight).sum() / weight.sum())


def test_a_tiny_run_lowers_the_loss_and_repeats_exactly(data, trained):
    weights, log = trained
    assert log["iterations"] == len(log["loss"]) == 60 and log["slices"] == 8 and log["crop_px"] == 32
    untrained = _held_out_loss(data)  # a zero head: the draft prior itself
    assert _held_out_loss(data, weights) < 0.9 * untrained
    again = [train_refinement(data, TINY, iterations=3, batch=4, seed=5, device="cpu", crop_px=32) for _ in range(2)]
    assert again[0][1]["loss"] == again[1][1]["loss"]
    assert all(torch.equal(again[0][0][name], again[1][0][name]) for name in again[0][0])
    with pytest.raises(IdealError, match="one of them"):
        train_refinement(data, TINY, iterations=3, minutes=1.0)


def test_the_bundle_round_trips_and_becomes_the_models_default_engine(tmp_path, data, trained):
    weights, log = trained
    segmentation = varied_bundle()
    segmentation.licence = "CC-BY-NC-SA-4.0"
    bundle = refinement_bundle(weights, segmentation, training_summary(log) | {"data": "phantoms"}, TINY)
    assert bundle.network == TINY  # read off the weights
    model = save_bundle(segmentation, tmp_path / "model")
    save_bundle(bundle, model / REFINEMENT_FOLDER, half_precision=True)
    loaded = load_bundle(model / REFINEMENT_FOLDER)
    assert (loaded.kind, loaded.model_id, loaded.version) == ("refinement", "tiny-test-refinement", "1.0.0")
    assert loaded.labels == segmentation.labels and loaded.preprocessing == segmentation.preprocessing
    assert loaded.licence == "CC-BY-NC-SA-4.0" and "tiny-test 0.0.1" in loaded.description
    assert loaded.training["segmentation_model"] == {"id": "tiny-test", "version": "0.0.1"}
    assert {"iterations", "batch", "lr", "seed", "slices", "seconds", "data"} <= set(loaded.training)
    assert all(torch.allclose(loaded.weights[k].float(), weights[k].float(), atol=1e-2, rtol=1e-2) for k in weights)
    refiner = Refiner(model, device="cpu", propagate_slices=0)
    assert refiner.engine == "guided"
    image, _ = phantoms(1)[0]
    draft = refiner.predictor.predict(image).labels
    point = tuple(float(v) for v in (image.index_to_physical @ np.array([32, 32, 1, 1.0]))[:3])
    assert refiner.refine(image, draft, [Click(point, 3, True)]).labels.array[1, 32, 32] == 3
    with pytest.raises(IdealError, match="not a segmentation model"):
        refinement_bundle(weights, loaded, {}, TINY)


def _one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_the_cli_trains_a_refiner_and_refuses_what_it_must(tmp_path, segmentation_path, capsys):
    for n, (image, label) in enumerate(phantoms()):
        write_ssl4mis_volume(tmp_path / "acdc" / "data" / f"patient00{n}_frame01.h5", image, label)
    (tmp_path / "acdc" / "train.list").write_text("patient000_frame01\npatient001_frame01\n")
    (tmp_path / "acdc" / "val.list").write_text("patient009_frame01\n")
    out = tmp_path / "refinement"
    args = ["train-refiner", "--model", str(segmentation_path), "--data", str(tmp_path / "acdc"), "--list", "train.list",
            "--out", str(out), "--iterations", "2", "--batch", "2", "--device", "cpu"]
    assert main(args) == 0
    capsys.readouterr()
    card = read_card(out)
    assert card["kind"] == "refinement" and card["weights"]["dtype"] == "float16"
    assert card["training"]["iterations"] == 2 and card["training"]["slices"] == 8
    assert card["training"]["data"] == str(tmp_path / "acdc") and card["training"]["list"] == "train.list"
    assert card["architecture"]["adjacent_guidance"]  # the shipped recipe by default
    flat = tmp_path / "flat"
    assert main([*args[:7], "--out", str(flat), "--iterations", "1", "--batch", "2", "--device", "cpu", "--single-slice"]) == 0
    assert not read_card(flat)["architecture"]["adjacent_guidance"]
    capsys.readouterr()

    assert main(args) == 2  # the output exists
    assert "already exists" in _one_line(capsys)
    data = ["--data", str(tmp_path / "acdc"), "--list", "train.list", "--iterations", "1"]
    assert main(["train-refiner", "--model", str(out), *data, "--out", str(tmp_path / "x")]) == 2
    line = _one_line(capsys)
    assert "refinement bundle" in line and "--model" in line
    (tmp_path / "acdc" / "val.list").write_text("patient001_frame01\n")
    assert main(["train-refiner", "--model", str(segmentation_path), *data, "--out", str(tmp_path / "y")]) == 2
    assert "val.list" in _one_line(capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_an_adjacent_sample_carries_the_neighbours_clicks_into_this_slices_frame(data):
    """2.5D training: clicks placed on the next slice's errors arrive, shifted by the crops' offset, as the
    adjacent guidance maps of this slice; its own maps hold only its own (occasional) click."""
    config = RefinementConfig(base_channels=4, depth=2, adjacent_guidance=True)
    assert config.input_channels == 1 + 4 + 12
    for seed in range(6):
        rng = np.random.default_rng(seed)
        image, prior, guide, reference, weight = make_adjacent_sample(data, 1, 2, rng, config, 32)
        assert image.shape == (1, 32, 32) and prior.shape == (4, 32, 32) and guide.shape == (12, 32, 32)
        assert reference.shape == weight.shape == (32, 32) and reference.max() <= 3
        assert guide[6:].max() > 0.5  # the neighbour's click, in the adjacent maps
        assert weight.max() > 1.0  # the loss weighs its reach
        assert np.allclose(prior.sum(axis=0), 1.0, atol=1e-2)


def test_a_2d_network_warm_starts_an_adjacent_guidance_network_unchanged():
    """Widened with zero weights for the adjacent maps, the 2.5D network computes what the 2D one did."""
    from IDEALTrain.model.refinement_network import widen_for_adjacent_guidance

    flat = RefinementNetwork(TINY).eval()
    torch.nn.init.normal_(flat.head.weight)
    wide_config = RefinementConfig(**{**TINY.to_json(), "adjacent_guidance": True})
    wide = RefinementNetwork(wide_config).eval()
    wide.load_state_dict(widen_for_adjacent_guidance(flat.state_dict(), wide_config))
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.random((1, 1, 32, 32), dtype=np.float32))
    prior = torch.softmax(torch.from_numpy(rng.normal(size=(1, 4, 32, 32)).astype(np.float32)), 1)
    guide = torch.from_numpy(rng.random((1, 6, 32, 32), dtype=np.float32))
    with torch.no_grad():
        expected = flat(image, prior, guide)
        widened = wide(image, prior, torch.cat([guide, torch.zeros_like(guide)], 1))
        assert torch.allclose(widened, expected, atol=1e-5)
    with pytest.raises(IdealError, match="cannot widen"):
        widen_for_adjacent_guidance(flat.state_dict(), RefinementConfig(**{**TINY.to_json(), "num_classes": 5}))
