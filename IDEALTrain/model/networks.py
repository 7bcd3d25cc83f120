"""The 2D network family IDEAL needs: one U-Net encoder, two decoders of different architecture,
and a 1x1-convolution dense projection head for contrastive pretraining.

The default widths and dropout follow the SSL4MIS U-Net (base 16 channels, 5 levels) so results
are comparable with the semi-supervised ACDC literature. A network is fully described by a plain
dict (``NetworkConfig.to_json``) stored in the model bundle's card.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import IdealError

DECODER_KINDS = ("unet", "fpn")
PERTURBATIONS = ("none", "dropout", "noise")
_SSL4MIS_DROPOUT = (0.05, 0.1, 0.2, 0.3)  # the deepest level always gets 0.5


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture hyper-parameters (the ``architecture`` section of a bundle card)."""

    in_channels: int = 1
    num_classes: int = 4
    base_channels: int = 16
    depth: int = 5
    decoders: tuple[str, ...] = ("unet", "fpn")
    dropout: tuple[float, ...] = ()  # per level; empty = the SSL4MIS schedule for this depth
    fpn_channels: int = 16
    projection_dim: int = 128
    name: str = field(default="ideal-unet2d")

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoders", tuple(self.decoders))
        if self.depth < 2:
            raise IdealError(f"network depth must be at least 2, got {self.depth}")
        schedule = _SSL4MIS_DROPOUT + (0.5,) * self.depth
        dropout = self.dropout or schedule[: self.depth - 1] + (0.5,)
        object.__setattr__(self, "dropout", tuple(float(p) for p in dropout))
        if len(self.dropout) != self.depth:
            raise IdealError(f"dropout needs one value per level ({self.depth}), got {len(self.dropout)}")
        unknown = [kind for kind in self.decoders if kind not in DECODER_KINDS]
        if unknown or not self.decoders:
            raise IdealError(f"unknown decoder kind(s) {unknown or self.decoders}; choose from {DECODER_KINDS}")
        if self.num_classes < 2:
            raise IdealError(f"a segmentation network needs at least 2 classes, got {self.num_classes}")

    @property
    def channels(self) -> list[int]:
        return [self.base_channels * 2**level for level in range(self.depth)]

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (one halving per level)."""
        return 2 ** (self.depth - 1)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> NetworkConfig:
        return config_from_json(cls, data)


def config_from_json(cls: type, data: dict):
    """An architecture dataclass from a card's ``architecture`` section; unknown fields or another ``name`` are refused."""
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise IdealError(f"unknown architecture field(s) {unknown}; this bundle needs a newer IDEALTrain")
    name = next(f.default for f in fields(cls) if f.name == "name")
    if data.get("name", name) != name:
        raise IdealError(f"unknown architecture {data.get('name')!r}; this IDEALTrain knows {name!r} here")
    return cls(**data)


class ConvBlock(nn.Sequential):
    """Two 3x3 conv + batch norm + leaky ReLU, with dropout between them."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(inplace=True),
        )


class UNetEncoder(nn.Module):
    """U-Net contracting path; returns the feature map of every level, finest first."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        channels = config.channels
        self.levels = nn.ModuleList([ConvBlock(config.in_channels, channels[0], config.dropout[0])])
        for level in range(1, config.depth):
            self.levels.append(ConvBlock(channels[level - 1], channels[level], config.dropout[level]))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [self.levels[0](x)]
        for level in self.levels[1:]:
            features.append(level(F.max_pool2d(features[-1], 2)))
        return features


class UNetDecoder(nn.Module):
    """Decoder 1: U-Net expanding path (1x1 conv, bilinear upsampling, skip concatenation)."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        channels = config.channels
        self.reduce = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for level in range(config.depth - 1, 0, -1):
            self.reduce.append(nn.Conv2d(channels[level], channels[level - 1], 1))
            self.blocks.append(ConvBlock(2 * channels[level - 1], channels[level - 1]))
        self.classifier = nn.Conv2d(channels[0], config.num_classes, 3, padding=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.upsample(features))

    def upsample(self, features: list[torch.Tensor], blocks: int | None = None) -> torch.Tensor:
        """The expanding path's features after its first ``blocks`` blocks (all of them by default): after 2 of
        a 5-level U-Net, quarter resolution, where decoder pretraining puts its dense loss."""
        x = features[-1]
        for reduce, block, skip in list(zip(self.reduce, self.blocks, reversed(features[:-1])))[:blocks]:
            x = F.interpolate(reduce(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([skip, x], dim=1))
        return x


class FPNDecoder(nn.Module):
    """Decoder 2: a feature-pyramid decoder, deliberately unlike decoder 1: 1x1 laterals to one
    narrow width, additive top-down fusion and a single 3x3 smoothing per level."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        width = config.fpn_channels
        self.laterals = nn.ModuleList([nn.Conv2d(c, width, 1) for c in config.channels])
        self.smooth = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(inplace=True))
                for _ in config.channels[:-1]
            ]
        )
        self.classifier = nn.Conv2d(width, config.num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.laterals[-1](features[-1])
        for level in range(len(features) - 2, -1, -1):
            x = F.interpolate(x, size=features[level].shape[-2:], mode="bilinear", align_corners=False)
            x = self.smooth[level](x + self.laterals[level](features[level]))
        return self.classifier(x)


class DenseProjectionHead(nn.Module):
    """IDEAL's projection head G: 1x1 convolutions, so every pixel keeps its own embedding."""

    def __init__(self, in_channels: int, out_channels: int = 128, hidden_channels: int | None = None) -> None:
        super().__init__()
        hidden = hidden_channels or in_channels
        self.net = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


class StreamPerturbation(nn.Module):
    """Training-time perturbation of the encoder features, drawn anew for each decoder, so the two
    streams of two-stream finetuning read differently perturbed features (identity in eval mode).

    "dropout" zeroes whole channels of every level with probability ``strength`` (UniMatch's feature
    dropout); "noise" multiplies each feature by 1 + U(-strength, strength) (CCT's feature noise).
    """

    def __init__(self, kind: str = "none", strength: float = 0.0) -> None:
        super().__init__()
        if kind not in PERTURBATIONS:
            raise IdealError(f"stream perturbation must be one of {', '.join(PERTURBATIONS)}, got {kind!r}")
        if kind != "none" and not 0 < strength < 1:
            raise IdealError(f"stream perturbation strength must be between 0 and 1 (exclusive), got {strength}")
        self.kind, self.strength = kind, strength

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        if not self.training or self.kind == "none":
            return features
        if self.kind == "dropout":
            return [F.dropout2d(f, self.strength, training=True) for f in features]
        return [f * (1 + (2 * torch.rand_like(f) - 1) * self.strength) for f in features]


_DECODERS = {"unet": UNetDecoder, "fpn": FPNDecoder}


class SegmentationNetwork(nn.Module):
    """One shared encoder feeding one or more decoders; ``forward`` returns each decoder's logits."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = UNetEncoder(config)
        self.decoders = nn.ModuleList([_DECODERS[kind](config) for kind in config.decoders])
        self.perturbation = StreamPerturbation()  # a training choice, not architecture: set by the run

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.encoder(x)
        return [decoder(self.perturbation(features)) for decoder in self.decoders]


def fold_batch_norm(module: nn.Module) -> nn.Module:
    """Fold eval-mode batch norms into the convolutions before them (inference only).

    The same affine maths in one pass instead of two, which matters for memory-bound 2D convs.
    """
    for child in module.children():
        fold_batch_norm(child)
    if isinstance(module, nn.Sequential):
        layers = list(module)
        for index, (layer, following) in enumerate(zip(layers, layers[1:])):
            if isinstance(layer, nn.Conv2d) and isinstance(following, nn.BatchNorm2d):
                module[index] = fuse_conv_bn_eval(layer, following)
                module[index + 1] = nn.Identity()
    return module


def update_moving_average(average: nn.Module, current: nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * current for parameters; buffers copied.

    Used for the momentum key encoder of pretraining and the EMA teacher of finetuning.
    """
    with torch.no_grad():
        for mine, theirs in zip(average.parameters(), current.parameters()):
            mine.mul_(decay).add_(theirs.detach(), alpha=1 - decay)
        for mine, theirs in zip(average.buffers(), current.buffers()):
            mine.copy_(theirs)
