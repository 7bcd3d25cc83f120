"""Supervised training learns, checkpoints atomically and resumes exactly."""
from __future__ import annotations

import pytest
import torch

from IDEALTrain.checkpoint import load_checkpoint
from IDEALTrain.datasets import Case
from IDEALTrain.errors import IdealError, TrainingStopped
from IDEALTrain.metrics import CLASS_NAMES, mean_scores, score
from IDEALTrain.networks import NetworkConfig
from IDEALTrain.phantom import make_phantom
from IDEALTrain.predictor import Predictor
from IDEALTrain.preprocessing import Preprocessing
from IDEALTrain.training import TrainConfig, train_supervised

def small_config(iterations: int, **overrides) -> TrainConfig:
    network = NetworkConfig(base_channels=8, depth=4, dropout=(0.0, 0.0, 0.0, 0.0))
    plan = Preprocessing(inplane="spacing", spacing=(3.0, 3.0))
    return TrainConfig(iterations=iterations, batch_size=8, learning_rate=0.05, network=network, preprocessing=plan, **overrides)


@pytest.fixture(scope="module")
def phantoms():
    return [Case(f"train{i}", *make_phantom(i)) for i in range(8)], [Case(f"test{i}", *make_phantom(1000 + i)) for i in range(2)]


def test_short_supervised_run_learns(phantoms):
    train, held_out = phantoms
    bundle = train_supervised(train, small_config(200, validate_every=100), val_cases=held_out[:1], device="cpu")
    predictor = Predictor(bundle, device="cpu")
    result = mean_scores([score(predictor.predict(case.image).labels, case.label) for case in held_out[1:]])
    # Chance level for these thin structures is a Dice near 0; a learning network is far above.
    assert result["mean"]["dice"] > 0.6, result
    assert all(result["classes"][name]["dice"] > 0.4 for name in CLASS_NAMES.values()), result
    assert bundle.training["selected_iteration"] in (100, 200)
    assert bundle.validation["mean"]["dice"] > 0.5


def test_same_seed_same_weights_and_exact_resume(phantoms, tmp_path):
    train = phantoms[0][:3]
    config = small_config(6, checkpoint_every=3)
    uninterrupted = train_supervised(train, config, device="cpu")
    with pytest.raises(TrainingStopped, match="stopped at iteration 4"):
        train_supervised(train, config, device="cpu", checkpoint_dir=tmp_path, stop_after=lambda it: it == 4)
    assert load_checkpoint(tmp_path).iteration == 4
    resumed = train_supervised(train, config, device="cpu", checkpoint_dir=tmp_path, resume=True)
    for name, tensor in uninterrupted.weights.items():
        assert torch.equal(tensor, resumed.weights[name]), name
    again = train_supervised(train, config, device="cpu")
    assert all(torch.equal(again.weights[n], t) for n, t in uninterrupted.weights.items())
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]  # no temporary files left


def test_resume_refuses_a_different_run(phantoms, tmp_path):
    train = phantoms[0][:2]
    train_supervised(train, small_config(2, checkpoint_every=2), device="cpu", checkpoint_dir=tmp_path)
    with pytest.raises(IdealError, match="other settings"):
        train_supervised(train, small_config(4, checkpoint_every=2), device="cpu", checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(IdealError, match="no checkpoint"):
        train_supervised(train, small_config(2), device="cpu", checkpoint_dir=tmp_path / "empty", resume=True)


def test_unlabelled_case_is_refused(phantoms):
    image, _ = make_phantom(5)
    with pytest.raises(IdealError, match="no label"):
        train_supervised([Case("x", image, None)], small_config(1), device="cpu")
