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


def _masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(logits.float(), target, reduction="none")
    return (loss * keep).sum() / keep.sum().clamp(min=1)


def cross_pseudo_label_loss(
    logits: tuple[torch.Tensor, torch.Tensor], teachers: tuple[torch.Tensor, torch.Tensor], threshold: float = 0.0
) -> torch.Tensor:
    """IDEAL's two-stream consistency: stream 1 learns stream 2's hard pseudo-label and vice versa.

    ``teachers`` are the logits the pseudo-labels come from (the streams themselves, or an EMA
    teacher's); pixels whose pseudo-label confidence is below ``threshold`` are ignored.
    """
    with torch.no_grad():
        confidence, pseudo = zip(*(torch.softmax(t.float(), dim=1).max(dim=1) for t in teachers))
        keep = [(c >= threshold).float() for c in confidence]
    return _masked_cross_entropy(logits[0], pseudo[1], keep[1]) + _masked_cross_entropy(logits[1], pseudo[0], keep[0])
