"""Small builders shared by the tests: oblique, anisotropic, non-zero-origin volumes and tiny bundles."""
from __future__ import annotations

import numpy as np

from IDEALTrain.io.image import Image
from IDEALTrain.model.bundle import Bundle
from IDEALTrain.model.networks import NetworkConfig, SegmentationNetwork
from IDEALTrain.model.preprocessing import Preprocessing
from IDEALTrain.model.refinement_network import RefinementConfig, RefinementNetwork


def oblique_direction(seed: int = 3) -> np.ndarray:
    """A proper rotation matrix that is clearly not axis-aligned."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def oblique_image(shape=(7, 40, 48), dtype=np.float32, seed: int = 0) -> Image:
    """Random voxels on an oblique, anisotropic grid with a non-zero origin."""
    rng = np.random.default_rng(seed)
    array = (rng.random(shape) * 1000).astype(dtype)
    return Image(array, spacing=(1.37, 1.21, 8.5), origin=(-112.5, 37.25, 201.0), direction=oblique_direction(seed + 3))


def tiny_bundle(seed: int = 0, decoders=("unet", "fpn"), inplane: str = "spacing") -> Bundle:
    """An untrained small network wrapped as a bundle (fast to save, load and run)."""
    import torch

    torch.manual_seed(seed)
    config = NetworkConfig(base_channels=4, depth=3, dropout=(0.0, 0.0, 0.0), decoders=decoders, fpn_channels=8)
    network = SegmentationNetwork(config)
    plan = Preprocessing(inplane=inplane, size=(32, 32), spacing=(2.0, 2.0))
    return Bundle(config, plan, network.state_dict(), model_id="tiny-test", version="0.0.1")


def varied_bundle(seed: int = 0) -> Bundle:
    """A tiny untrained bundle whose conv weights are scaled up, so every class and real decoder
    disagreement appear (an unscaled one predicts one class everywhere)."""
    bundle = tiny_bundle(seed)
    bundle.weights = {k: v * 4 if k.endswith("weight") and v.ndim == 4 else v for k, v in bundle.weights.items()}
    return bundle


def tiny_refinement_bundle(segmentation: Bundle, seed: int = 0, trained: bool = True, adjacent: bool = False) -> Bundle:
    """A small refinement network for ``segmentation``'s labels; ``trained``: a random non-zero head (an
    untrained one returns the draft prior unchanged); ``adjacent``: with adjacent-slice guidance."""
    import torch

    torch.manual_seed(seed)
    config = RefinementConfig(base_channels=4, depth=3, context_px=8, adjacent_guidance=adjacent)
    network = RefinementNetwork(config)
    if trained:
        torch.nn.init.normal_(network.head.weight, std=2.0)
    return Bundle(
        config,
        segmentation.preprocessing,
        network.state_dict(),
        labels=segmentation.labels,
        model_id=f"{segmentation.model_id}-refinement",
        kind="refinement",
    )


def import_slicer_core():
    """The slicer-core ``slicer`` module, or skip the calling test module with the reason."""
    import pytest

    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install -e '.[test]')")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' module is not slicer-core (no vtkMRMLScene)", allow_module_level=True)
    return slicer
