"""Batch augmentation on the training device: random rotation, scale, flips and intensity.

All randomness comes from one explicit ``torch.Generator`` so a run is reproducible and a resumed
run continues the same random stream.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def augment_batch(
    images: torch.Tensor, labels: torch.Tensor, config: Augmentation, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment images (B, 1, H, W) in [0, 1] and labels (B, H, W) with the same spatial transform."""
    n, device = images.shape[0], images.device
    angle = _uniform(n, -1, 1, generator) * math.radians(config.rotation_degrees)
    scale = _uniform(n, *config.scale_range, generator)
    flips = torch.where(torch.rand(n, 2, generator=generator) < 0.5, -1.0, 1.0) if config.flip else torch.ones(n, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flips[:, 0], -sin * flips[:, 1]
    theta[:, 1, 0], theta[:, 1, 1] = sin * flips[:, 0], cos * flips[:, 1]
    grid = F.affine_grid(theta.to(device), list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)

    gamma = _uniform(n, *config.gamma_range, generator).view(n, 1, 1, 1).to(device)
    contrast = _uniform(n, *config.contrast_range, generator).view(n, 1, 1, 1).to(device)
    brightness = _uniform(n, -config.brightness, config.brightness, generator).view(n, 1, 1, 1).to(device)
    noise = torch.randn(images.shape, generator=generator).to(device) * config.noise_std
    images = images.clamp(0, 1) ** gamma * contrast + brightness + noise
    return images, labels[:, 0].long()
