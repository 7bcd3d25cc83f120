"""The click-conditioned correction network (a ``refinement`` bundle): DeepEdit-style click guidance for one slice.

A compact 2D U-Net takes a short-axis slice (normalised as the segmentation model does), the segmentation
model's class probabilities (the draft prior) and click guidance (per structure a positive and a negative
map, a Gaussian at each click) and returns corrected class logits as a residual on the log prior: its last
layer starts at zero, so an untrained network returns the draft. The engine that runs it is
:mod:`IDEALTrain.inference.refine_guided`; training is :mod:`IDEALTrain.training.refinement_training`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IdealError
from .networks import ConvBlock, config_from_json

LOG_FLOOR = 1e-3  # smallest prior probability the residual starts from


@dataclass(frozen=True)
class RefinementConfig:
    """Architecture of the correction network (the ``architecture`` section of a refinement card)."""

    num_classes: int = 4
    base_channels: int = 16
    depth: int = 4
    guide_sigma_px: float = 2.0  # a click's guidance blob
    context_px: int = 24  # the engine's window: the clicks' reach plus this much context on each side
    #: A second set of guidance maps for the clicks on the adjacent slices: the network then also corrects a
    #: slice next to a clicked one, where it sees the same error (2.5D editing, one network run per slice).
    adjacent_guidance: bool = False
    name: str = field(default="click-guided-unet2d")

    def __post_init__(self) -> None:
        if self.depth < 2 or self.num_classes < 2:
            raise IdealError(f"a refinement network needs depth >= 2 and >= 2 classes, got {self.depth}, {self.num_classes}")

    @property
    def guidance_channels(self) -> int:
        """A positive and a negative map per structure (every class but background)."""
        return 2 * (self.num_classes - 1)

    @property
    def input_channels(self) -> int:
        """Image, class probabilities and the guidance maps (the slice's own clicks, then the adjacent slices')."""
        return 1 + self.num_classes + self.guidance_channels * (2 if self.adjacent_guidance else 1)

    @property
    def size_multiple(self) -> int:
        return 2 ** (self.depth - 1)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RefinementConfig:
        return config_from_json(cls, data)


class RefinementNetwork(nn.Module):
    """Image (1) + prior (C) + guidance (2 (C - 1), twice with adjacent guidance) in; log prior + a learnt correction out."""

    def __init__(self, config: RefinementConfig) -> None:
        super().__init__()
        self.config = config
        channels = [config.base_channels * 2**level for level in range(config.depth)]
        self.down = nn.ModuleList([ConvBlock(config.input_channels, channels[0])])
        self.down.extend(ConvBlock(channels[n - 1], channels[n]) for n in range(1, config.depth))
        self.reduce = nn.ModuleList(nn.Conv2d(channels[n], channels[n - 1], 1) for n in range(config.depth - 1, 0, -1))
        self.up = nn.ModuleList(ConvBlock(2 * channels[n - 1], channels[n - 1]) for n in range(config.depth - 1, 0, -1))
        self.head = nn.Conv2d(channels[0], config.num_classes, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, image: torch.Tensor, prior: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        features = [self.down[0](torch.cat([image, prior, guidance], dim=1))]
        for level in self.down[1:]:
            features.append(level(F.max_pool2d(features[-1], 2)))
        x = features[-1]
        for reduce, block, skip in zip(self.reduce, self.up, reversed(features[:-1])):
            x = F.interpolate(reduce(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([skip, x], dim=1))
        return torch.log(prior.clamp_min(LOG_FLOOR)) + self.head(x).float()


def guidance_maps(
    shape: tuple[int, int], clicks: list, config: RefinementConfig, offset: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """(2 (C - 1), H, W): per structure a positive then a negative map, the max of a Gaussian at each click.

    ``clicks`` are :class:`~IDEALTrain.inference.refine_engines.SliceClick` (voxel, label, positive);
    ``offset`` is the window's corner, subtracted from the click voxels."""
    maps = np.zeros((config.guidance_channels, *shape), np.float32)
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    for click in clicks:
        r, c = click.voxel[0] - offset[0], click.voxel[1] - offset[1]
        blob = np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * config.guide_sigma_px**2)).astype(np.float32)
        channel = 2 * (click.label - 1) + (0 if click.positive else 1)
        np.maximum(maps[channel], blob, out=maps[channel])
    return maps


def slice_guidance(shape: tuple[int, int], clicks: list, config: RefinementConfig, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The network's guidance input: maps of the slice's own clicks, then (with ``adjacent_guidance``) of the
    clicks carried over from the adjacent slices (``soft`` ones); without it all clicks share one set."""
    if not config.adjacent_guidance:
        return guidance_maps(shape, clicks, config, offset)
    own = guidance_maps(shape, [c for c in clicks if not getattr(c, "soft", False)], config, offset)
    adjacent = guidance_maps(shape, [c for c in clicks if getattr(c, "soft", False)], config, offset)
    return np.concatenate([own, adjacent])


def widen_for_adjacent_guidance(weights: dict[str, torch.Tensor], config: RefinementConfig) -> dict[str, torch.Tensor]:
    """Weights of a network without adjacent guidance, given zero weights for the new input maps (so it starts
    as the old network): the warm start of an adjacent-guidance network."""
    first = "down.0.0.weight"
    if weights[first].shape[1] == config.input_channels:
        return weights
    extra = config.input_channels - weights[first].shape[1]
    if not config.adjacent_guidance or extra != config.guidance_channels:
        raise IdealError(f"cannot widen weights of {weights[first].shape[1]} input maps to {config.input_channels}")
    zeros = weights[first].new_zeros((weights[first].shape[0], extra, *weights[first].shape[2:]))
    return {**weights, first: torch.cat([weights[first], zeros], dim=1)}
