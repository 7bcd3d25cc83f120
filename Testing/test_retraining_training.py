"""Retraining on corrections (issue 20): forgetting protection on a small case, and the bundle carried over.

Real torch training of a tiny network on phantoms: an "old" model first learns every structure, then
is retrained on a case where only the LV was reviewed (its RV erased, as an uncorrected export would
leave it if nobody had looked).
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import tiny_bundle, tiny_refinement_bundle

from IDEALTrain.cli import main as idealtrain
from IDEALTrain.errors import IdealError
from IDEALTrain.evaluation.metrics import dice
from IDEALTrain.inference.predictor import Predictor
from IDEALTrain.inference.refine import Refiner
from IDEALTrain.io.datasets import Case
from IDEALTrain.io.phantom import make_phantom
from IDEALTrain.io.volume_files import write_image
from IDEALTrain.model.bundle import load_bundle, read_card, save_bundle
from IDEALTrain.model.card import REFINEMENT_FOLDER
from IDEALTrain.model.postprocessing import Postprocessing
from IDEALTrain.training.augment import Augmentation
from IDEALTrain.training.finetune import TrainConfig, train_segmentation
from IDEALTrain.training.partial_labels import reviewed_labels

SIZE = dict(size=(32, 32, 3), spacing=(2.0, 2.0, 8.0))
NO_AUGMENTATION = Augmentation(rotation_degrees=0.0, scale_range=(1.0, 1.0), flip=False, gamma_range=(1.0, 1.0),
                               contrast_range=(1.0, 1.0), brightness=0.0, noise_std=0.0)


@pytest.fixture(scope="module")
def old_model():
    """A tiny model trained on every structure of a few phantoms (the shipped model of this small case)."""
    torch.manual_seed(0)
    start = tiny_bundle(0)
    cases = [Case(f"old{seed}", *make_phantom(seed, **SIZE)) for seed in range(4)]
    config = TrainConfig(iterations=150, batch_size=6, learning_rate=0.1, network=start.network,
                         preprocessing=start.preprocessing, augmentation=NO_AUGMENTATION)
    bundle = train_segmentation(cases, config, device="cpu")
    bundle.model_id, bundle.version = "tiny-test", "1.0.0"
    return bundle, cases


def rv_agreement(bundle, old, cases) -> float:
    """Mean Dice between this model's and the old model's RV on the old model's data (1: nothing forgotten)."""
    new_p, old_p = Predictor(bundle, device="cpu"), Predictor(old, device="cpu")
    return float(np.mean([dice(new_p.predict(c.image).labels.array == 1, old_p.predict(c.image).labels.array == 1) for c in cases]))


def test_forgetting_protection_keeps_the_unreviewed_structure(old_model):
    old, old_cases = old_model
    image, label = make_phantom(11, **SIZE)
    erased = label.array.copy()
    erased[erased == 1] = 0  # the export's RV is wrong (missing) and nobody reviewed it
    lv_slices = [k for k in range(3) if (label.array[k] == 3).any()]
    partial = label.with_array(reviewed_labels(erased, {3: lv_slices}, 0, 4))
    base = TrainConfig(iterations=30, batch_size=3, learning_rate=0.05, network=old.network, preprocessing=old.preprocessing,
                       augmentation=NO_AUGMENTATION)
    naive = train_segmentation([Case("new", image, label.with_array(erased))], base, initial=old, device="cpu")
    protected_config = replace(base, distill_weight=1.0, frozen_levels=2)
    protected = train_segmentation([Case("new", image, partial)], protected_config, initial=old, device="cpu")
    naive_agreement, protected_agreement = rv_agreement(naive, old, old_cases), rv_agreement(protected, old, old_cases)
    assert rv_agreement(old, old, old_cases) == 1.0
    assert naive_agreement < 0.5  # trained on its own unreviewed mistakes, the RV is forgotten
    assert protected_agreement > 0.9 and protected_agreement > naive_agreement + 0.4
    # Frozen levels learn nothing, batch-norm statistics included.
    frozen = [name for name in old.weights if name.startswith(("encoder.levels.0.", "encoder.levels.1."))]
    assert frozen and all(torch.equal(protected.weights[name], old.weights[name]) for name in frozen)
    assert not all(torch.equal(protected.weights[name], old.weights[name]) for name in old.weights if name.startswith("decoders."))
    assert protected.training["recipe"]["distill_weight"] == 1.0 and protected.training["recipe"]["frozen_levels"] == 2


def test_keep_old_mixes_the_starting_and_the_trained_weights(old_model):
    old, cases = old_model
    base = TrainConfig(iterations=5, batch_size=2, learning_rate=0.05, network=old.network, preprocessing=old.preprocessing,
                       augmentation=NO_AUGMENTATION, seed=3)
    trained = train_segmentation(cases[:1], base, initial=old, device="cpu")
    mixed = train_segmentation(cases[:1], replace(base, keep_old=0.25), initial=old, device="cpu")
    changed = 0
    for name, value in old.weights.items():
        if value.is_floating_point():  # same seed, same run: the mix is exactly 1/4 old + 3/4 trained
            assert torch.allclose(mixed.weights[name], 0.25 * value + 0.75 * trained.weights[name], atol=1e-5), name
            changed += not torch.equal(trained.weights[name], value)
        else:
            assert torch.equal(mixed.weights[name], trained.weights[name])
    assert changed > 10 and mixed.training["recipe"]["keep_old"] == 0.25
    with pytest.raises(Exception, match="keep-old"):
        train_segmentation(cases[:1], replace(base, keep_old=1.0), initial=old, device="cpu")
    with pytest.raises(Exception, match="starting model"):
        train_segmentation(cases[:1], replace(base, keep_old=0.5), device="cpu")


def test_distillation_needs_a_model_to_distil_from(old_model):
    old, cases = old_model
    config = TrainConfig(iterations=2, batch_size=2, network=old.network, preprocessing=old.preprocessing, distill_weight=1.0)
    with pytest.raises(Exception, match="distil"):
        train_segmentation(cases[:1], config, device="cpu")


def test_init_from_carries_the_bundle_over(old_model, tmp_path):
    """Licence, description, float16 storage, augmentation, preprocessing, postprocessing and the model's
    refinement network survive a retraining."""
    old, _ = old_model
    old.licence, old.description = "CC-BY-NC-SA-4.0", "the shipped model"
    old.postprocessing = Postprocessing(largest_heart_component=True)
    wide = Augmentation(rotation_degrees=180.0, scale_range=(0.7, 1.4))
    old.training = {"recipe": {"augmentation": wide.to_json()}}
    path = save_bundle(old, tmp_path / "old", half_precision=True)
    save_bundle(tiny_refinement_bundle(old), path / REFINEMENT_FOLDER)
    data = tmp_path / "data"
    image, label = make_phantom(5, **SIZE)
    write_image(image, data / "images" / "c.nii.gz")
    write_image(label.with_array(reviewed_labels(label.array, {3: [1]}, 0, 4)), data / "labels" / "c.nii.gz")
    provenance = tmp_path / "corrections.json"
    provenance.write_text(json.dumps({"cases": [{"case_id": "c", "reviewer": "dr a", "structures": ["LV"]}]}))
    out = tmp_path / "new"
    code = idealtrain([
        "finetune", "--labeled", f"folder:{data}", "--supervised-only", "--init-from", str(path), "--iterations", "2",
        "--batch-size", "2", "--crop", "16", "--frozen-levels", "1", "--distill", "0.5", "--device", "cpu",
        "--out", str(out), "--provenance", str(provenance), "--version", "1.0.1",
    ])
    assert code in (0, None)
    card, before = read_card(out), read_card(path)
    assert card["licence"] == "CC-BY-NC-SA-4.0" and card["description"] == "the shipped model"
    assert card["weights"]["dtype"] == "float16"
    assert card["training"]["recipe"]["augmentation"] == json.loads(json.dumps(wide.to_json()))
    assert card["preprocessing"] == before["preprocessing"] and card["postprocessing"] == before["postprocessing"]
    assert card["training"]["corrections"]["cases"][0]["reviewer"] == "dr a"
    assert card["training"]["recipe"]["crop_size"] == 16 and load_bundle(out).network == old.network
    assert read_card(out / REFINEMENT_FOLDER) == read_card(path / REFINEMENT_FOLDER)
    assert card["training"]["refinement_network"] == f"carried over from {old.model_id} {old.version}"
    assert Refiner(out, device="cpu").engine == "guided"  # click-to-fix keeps its network after a retraining
    with pytest.raises(IdealError, match="cannot hold"):
        save_bundle(old, tmp_path / "new.zip", companions_from=path)


@pytest.mark.parametrize(("damage", "message"), [("pickle", "pickle-based file model.pt"), ("link", "symbolic link")])
def test_init_from_refuses_an_unsafe_refinement_network_before_training(old_model, tmp_path, capsys, damage, message):
    """finetune --init-from copied refinement/ unchecked (a pickle, a link to a file outside); it is verified
    now, before a single iteration, and nothing is written."""
    old, _ = old_model
    path = save_bundle(old, tmp_path / "old")
    save_bundle(tiny_refinement_bundle(old), path / REFINEMENT_FOLDER)
    if damage == "pickle":
        (path / REFINEMENT_FOLDER / "model.pt").write_bytes(b"\x80\x04\x95 a pickle")
    else:
        (tmp_path / "passwd").write_text("root:x:0:0\n")
        (path / REFINEMENT_FOLDER / "notes").symlink_to(tmp_path / "passwd")
    code = idealtrain([
        "finetune", "--labeled", f"folder:{tmp_path / 'no-data-needed'}", "--supervised-only", "--init-from", str(path),
        "--iterations", "1", "--device", "cpu", "--out", str(tmp_path / "new"),
    ])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "remove" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "new").exists()
