"""IDEAL pretraining: learns, resumes exactly, and initialises finetuning's encoder."""
from __future__ import annotations

import json

import pytest
import torch

from IDEALTrain.errors import IdealError, TrainingStopped
from IDEALTrain.io.datasets import Case
from IDEALTrain.io.phantom import make_phantom
from IDEALTrain.model.bundle import load_bundle, save_bundle
from IDEALTrain.model.networks import NetworkConfig, SegmentationNetwork
from IDEALTrain.model.preprocessing import Preprocessing
from IDEALTrain.training.encoder_start import load_pretrained_encoder
from IDEALTrain.training.pretraining import PretrainConfig, pretrain

NETWORK = NetworkConfig(base_channels=4, depth=3, projection_dim=16)
PLAN = Preprocessing(inplane="spacing", spacing=(4.0, 4.0))


@pytest.fixture(scope="module")
def unlabelled():
    return [Case(f"u{i}", make_phantom(50 + i)[0]) for i in range(4)]


def small_config(iterations: int, **overrides) -> PretrainConfig:
    return PretrainConfig(iterations=iterations, batch_size=4, samples_per_image=16, network=NETWORK, preprocessing=PLAN, **overrides)


def test_dense_loss_falls_and_bundle_holds_the_encoder(unlabelled, capsys, tmp_path):
    bundle = pretrain(unlabelled, small_config(40, learning_rate=3e-3), device="cpu", progress_json=True)
    losses = [json.loads(line)["loss_dense"] for line in capsys.readouterr().out.splitlines() if '"progress"' in line]
    assert len(losses) == 40
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8  # the contrastive task is being learnt
    assert bundle.kind == "pretrained-encoder" and all(name.startswith("encoder.") for name in bundle.weights)
    loaded = load_bundle(save_bundle(bundle, tmp_path / "pre"))
    assert loaded.kind == "pretrained-encoder" and loaded.training["method"] == "ideal-dense-contrastive-pretraining"
    with pytest.raises(IdealError, match="finetune it first"):
        loaded.build_network()


def test_resume_with_queue_and_global_term_is_exact(unlabelled, tmp_path):
    config = small_config(6, queue_size=48, global_weight=0.5, checkpoint_every=100)
    straight = pretrain(unlabelled, config, device="cpu")
    with pytest.raises(TrainingStopped):
        pretrain(unlabelled, config, device="cpu", checkpoint_dir=tmp_path, stop_after=lambda it: it == 4)
    resumed = pretrain(unlabelled, config, device="cpu", checkpoint_dir=tmp_path, resume=True)
    assert all(torch.equal(t, resumed.weights[n]) for n, t in straight.weights.items())


def test_finetuning_starts_from_the_pretrained_encoder(unlabelled):
    bundle = pretrain(unlabelled, small_config(2), device="cpu")
    network = SegmentationNetwork(NetworkConfig(base_channels=4, depth=3))
    load_pretrained_encoder(network, bundle)
    for name, tensor in network.encoder.state_dict().items():
        assert torch.equal(tensor, bundle.weights[f"encoder.{name}"]), name
    with pytest.raises(IdealError, match="another encoder architecture"):
        load_pretrained_encoder(SegmentationNetwork(NetworkConfig(base_channels=8, depth=3)), bundle)


def test_bad_pretraining_options(unlabelled):
    with pytest.raises(IdealError, match="no unlabelled images"):
        pretrain([], small_config(1), device="cpu")
    with pytest.raises(IdealError, match="dense-level"):
        pretrain(unlabelled, small_config(1, dense_level=5), device="cpu")
    with pytest.raises(IdealError, match="queue"):
        pretrain(unlabelled, small_config(1, same_image_negatives=True, queue_size=16), device="cpu")
    for frozen, dense_level in ((-1, -1), (3, -1), (2, 1)):
        with pytest.raises(IdealError, match="frozen-levels"):
            pretrain(unlabelled, small_config(1, frozen_levels=frozen, dense_level=dense_level), device="cpu")


def test_frozen_levels_keep_their_random_start(unlabelled):
    short, longer = (pretrain(unlabelled, small_config(n, frozen_levels=1, learning_rate=3e-3), device="cpu") for n in (1, 4))
    learned = [name for name in short.weights if name.endswith(("weight", "bias"))]
    finest = [name for name in learned if name.startswith("encoder.levels.0.")]
    assert finest and all(torch.equal(short.weights[name], longer.weights[name]) for name in finest)
    assert all(not torch.equal(short.weights[name], longer.weights[name]) for name in learned if name.startswith("encoder.levels.2.0."))
    assert longer.training["recipe"]["frozen_levels"] == 1


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_pretraining_records_encoder_norms_for_each_optimizer(unlabelled, optimizer):
    lr = 0.05 if optimizer == "sgd" else 3e-3
    bundle = pretrain(unlabelled, small_config(3, optimizer=optimizer, learning_rate=lr), device="cpu")
    norms = bundle.training["encoder_level_norms"]
    assert len(norms["initial"]) == len(norms["final"]) == NETWORK.depth
    assert norms["initial"] != norms["final"]  # the encoder learnt
    assert bundle.training["recipe"]["optimizer"] == optimizer
    with pytest.raises(IdealError, match="optimizer must be one of"):
        pretrain(unlabelled, small_config(1, optimizer="lbfgs"), device="cpu")


def test_pretraining_variants_change_the_encoder_they_learn(unlabelled):
    config = small_config(2, precision="fp32")
    base = pretrain(unlabelled, config, device="cpu")
    variants = {
        "dropout": dict(dropout=False), "key_eval": dict(key_eval=True), "extra_dense_levels": dict(extra_dense_levels=(1,)),
        "positive_radius": dict(positive_radius=1.5), "queue": dict(queue_size=32), "global": dict(global_weight=0.5),
    }
    for name, change in variants.items():
        other = pretrain(unlabelled, small_config(2, precision="fp32", **change), device="cpu")
        assert not all(torch.equal(t, other.weights[k]) for k, t in base.weights.items()), name
        assert set(other.weights) == set(base.weights), name  # the extra heads are not part of the encoder
    with pytest.raises(IdealError, match="one encoder level twice"):
        pretrain(unlabelled, small_config(1, extra_dense_levels=(2,)), device="cpu")
    with pytest.raises(IdealError, match="outside the encoder"):
        pretrain(unlabelled, small_config(1, extra_dense_levels=(7,)), device="cpu")


def test_decoder_pretraining_carries_its_blocks_into_finetuning(unlabelled, capsys, tmp_path):
    """Issue 32's fix b (Chaitanya et al.'s local loss on the decoder): the dense loss on the U-Net decoder
    after its first block learns, the bundle keeps exactly the blocks it trained, and finetuning starts them
    pretrained in the network's U-Net decoder, wherever that decoder sits, mixed like the encoder."""
    config = small_config(30, learning_rate=3e-3, decoder_blocks=1, same_image_negatives=True)
    bundle = pretrain(unlabelled, config, device="cpu", progress_json=True)
    losses = [json.loads(line)["loss_dense"] for line in capsys.readouterr().out.splitlines() if '"progress"' in line]
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6
    carried = sorted(name for name in bundle.weights if not name.startswith("encoder."))
    assert carried and all(name.startswith(("decoders.0.reduce.0.", "decoders.0.blocks.0.")) for name in carried)
    assert "decoders.0.blocks.0.0.weight" in carried and bundle.training["recipe"]["decoder_blocks"] == 1
    loaded = load_bundle(save_bundle(bundle, tmp_path / "pre"))  # the card check accepts the carried blocks
    assert set(loaded.weights) == set(bundle.weights)

    torch.manual_seed(0)
    network = SegmentationNetwork(NetworkConfig(base_channels=4, depth=3, decoders=("fpn", "unet")))
    before = {k: v.clone() for k, v in network.decoders[1].state_dict().items()}
    load_pretrained_encoder(network, loaded)
    after = network.decoders[1].state_dict()
    for name in carried:
        assert torch.equal(after[name.removeprefix("decoders.0.")], loaded.weights[name]), name
    assert torch.equal(after["blocks.1.0.weight"], before["blocks.1.0.weight"])  # not pretrained: its random start
    assert torch.equal(after["classifier.weight"], before["classifier.weight"])

    torch.manual_seed(0)
    mixed = SegmentationNetwork(NetworkConfig(base_channels=4, depth=3, decoders=("fpn", "unet")))
    load_pretrained_encoder(mixed, loaded, mix=0.5)
    expected = 0.5 * loaded.weights["decoders.0.blocks.0.0.weight"] + 0.5 * before["blocks.0.0.weight"]
    assert torch.allclose(mixed.decoders[1].state_dict()["blocks.0.0.weight"], expected)

    with pytest.raises(IdealError, match="carries pretrained unet decoder blocks"):
        load_pretrained_encoder(SegmentationNetwork(NetworkConfig(base_channels=4, depth=3, decoders=("fpn",))), loaded)
    with pytest.raises(IdealError, match="decoder-blocks must be between 1 and 2"):
        pretrain(unlabelled, small_config(1, decoder_blocks=3), device="cpu")
    with pytest.raises(IdealError, match="leave --dense-level"):
        pretrain(unlabelled, small_config(1, decoder_blocks=1, dense_level=1), device="cpu")


def test_pretrain_command_line_takes_decoder_blocks():
    from IDEALTrain.cli import build_parser

    args = build_parser().parse_args(["pretrain", "--data", "folder:x", "--iterations", "1", "--out", "o", "--decoder-blocks", "2"])
    assert args.decoder_blocks == 2
