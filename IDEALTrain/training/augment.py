"""Batch augmentation on the training device: random rotation, scale, flips and intensity.

All randomness comes from one explicit ``torch.Generator`` so a run is reproducible and a resumed
run continues the same random stream.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random transforms (recorded in the bundle card)."""

    rotation_degrees: float = 20.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    flip: bool = True
    gamma_range: tuple[float, float] = (0.7, 1.5)
    contrast_range: tuple[float, float] = (0.8, 1.2)
    brightness: float = 0.1
    noise_std: float = 0.03

    def to_json(self) -> dict:
        return asdict(self)


class IntensityRanges(Protocol):
    """Any config with the intensity ranges of ``Augmentation`` (contrastive views reuse them)."""

    @property
    def gamma_range(self) -> tuple[float, float]: ...
    @property
    def contrast_range(self) -> tuple[float, float]: ...
    @property
    def brightness(self) -> float: ...
    @property
    def noise_std(self) -> float: ...


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def random_affine(
    n: int, rotation_degrees: float, scale_range: tuple[float, float], flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Random rotation, zoom and flips as (n, 2, 3) ``affine_grid`` matrices (CPU, no translation)."""
    angle = _uniform(n, -1, 1, generator) * math.radians(rotation_degrees)
    scale = _uniform(n, *scale_range, generator)
    flips = torch.where(torch.rand(n, 2, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(n, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flips[:, 0], -sin * flips[:, 1]
    theta[:, 1, 0], theta[:, 1, 1] = sin * flips[:, 0], cos * flips[:, 1]
    return theta


def random_intensity(images: torch.Tensor, config: IntensityRanges, generator: torch.Generator) -> torch.Tensor:
    """Random gamma, contrast, brightness and Gaussian noise per image (B, 1, H, W) in [0, 1]."""
    n, device = images.shape[0], images.device
    gamma = _uniform(n, *config.gamma_range, generator).view(n, 1, 1, 1).to(device)
    contrast = _uniform(n, *config.contrast_range, generator).view(n, 1, 1, 1).to(device)
    brightness = _uniform(n, -config.brightness, config.brightness, generator).view(n, 1, 1, 1).to(device)
    noise = torch.randn(images.shape, generator=generator).to(device) * config.noise_std
    return images.clamp(0, 1) ** gamma * contrast + brightness + noise


def augment_batch(
    images: torch.Tensor, labels: torch.Tensor, config: Augmentation, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment images (B, 1, H, W) in [0, 1] and labels (B, H, W) with the same spatial transform."""
    theta = random_affine(images.shape[0], config.rotation_degrees, config.scale_range, config.flip, generator)
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return random_intensity(images, config, generator), labels[:, 0].long()
