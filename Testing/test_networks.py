"""The network family: shapes, configuration round trip, and the dense projection head."""
from __future__ import annotations

import pytest
import torch

from IDEALTrain.errors import IdealError
from IDEALTrain.model.networks import DenseProjectionHead, NetworkConfig, SegmentationNetwork, StreamPerturbation


def test_default_matches_the_ssl4mis_unet():
    config = NetworkConfig()
    assert config.channels == [16, 32, 64, 128, 256] and config.dropout == (0.05, 0.1, 0.2, 0.3, 0.5)
    assert config.size_multiple == 16


@pytest.mark.parametrize("decoders", [("unet",), ("fpn",), ("unet", "fpn")])
def test_each_decoder_gives_full_resolution_logits(decoders):
    config = NetworkConfig(base_channels=4, depth=4, decoders=decoders)
    network = SegmentationNetwork(config).eval()
    logits = network(torch.rand(2, 1, 48, 64))
    assert [tuple(stream.shape) for stream in logits] == [(2, 4, 48, 64)] * len(decoders)


def test_the_two_decoders_are_different_architectures():
    network = SegmentationNetwork(NetworkConfig())
    first, second = network.decoders
    assert type(first) is not type(second)
    assert sum(p.numel() for p in first.parameters()) != sum(p.numel() for p in second.parameters())


def test_projection_head_is_dense_and_normalised():
    config = NetworkConfig(base_channels=4, depth=3)
    features = SegmentationNetwork(config).encoder(torch.rand(2, 1, 32, 32))
    head = DenseProjectionHead(config.channels[-1], out_channels=16)
    embedding = head(features[-1])
    assert embedding.shape == (2, 16, 8, 8)
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(2, 8, 8))
    assert all(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in head.modules() if isinstance(m, torch.nn.Conv2d))


def test_config_json_round_trip_and_errors():
    config = NetworkConfig(base_channels=8, depth=4, decoders=("fpn", "unet"))
    assert NetworkConfig.from_json(config.to_json()) == config
    with pytest.raises(IdealError, match="unknown decoder"):
        NetworkConfig(decoders=("transformer",))
    with pytest.raises(IdealError, match="unknown architecture field"):
        NetworkConfig.from_json({**config.to_json(), "attention": True})
    with pytest.raises(IdealError, match="one value per level"):
        NetworkConfig(depth=3, dropout=(0.1, 0.2))


@pytest.mark.parametrize("kind", ["dropout", "noise"])
def test_stream_perturbation_gives_each_decoder_its_own_features_in_training_only(kind):
    torch.manual_seed(0)
    network = SegmentationNetwork(NetworkConfig(base_channels=4, depth=3, decoders=("unet", "unet"), dropout=(0.0,) * 3))
    network.decoders[1].load_state_dict(network.decoders[0].state_dict())  # identical decoders: only the features differ
    plain_state = {k: v.clone() for k, v in network.state_dict().items()}
    x = torch.rand(2, 1, 32, 32)
    network.perturbation = StreamPerturbation(kind, 0.5)
    network.eval()
    assert torch.equal(*network(x))  # eval mode: no perturbation
    network.train()
    first, second = network(x)
    assert not torch.allclose(first, second)  # each decoder drew its own perturbation
    assert network.state_dict().keys() == plain_state.keys()  # no weights: bundles are unchanged


def test_stream_perturbation_refuses_bad_settings():
    with pytest.raises(IdealError, match="must be one of"):
        StreamPerturbation("gaussian", 0.5)
    with pytest.raises(IdealError, match="strength"):
        StreamPerturbation("dropout", 1.0)
