"""Segmentation losses: soft Dice over foreground classes plus cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """1 - mean soft Dice over the foreground classes, computed over the whole batch."""
    probabilities = torch.softmax(logits.float(), dim=1)
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    intersection = (probabilities * one_hot).sum(dims)
    denominator = probabilities.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return 1 - dice[1:].mean()


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The supervised loss of the SSL4MIS baselines: (cross-entropy + soft Dice) / 2."""
    return 0.5 * (F.cross_entropy(logits.float(), target) + soft_dice_loss(logits, target))
