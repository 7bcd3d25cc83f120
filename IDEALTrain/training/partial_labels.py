"""Partial labels: train only on what a clinician reviewed, and distil the old model everywhere else.

A label map may hold, besides class values 0..C-1, *partial* values ``PARTIAL | bits``: the set of
classes a voxel may still belong to. A clinician who reviewed the LV on a slice says which voxels
are LV and that every other voxel of that slice is *not* LV, but nothing about the RV they never
looked at; those voxels get ``{background, RV, myocardium}``. A slice nobody reviewed gets every
class (:data:`UNLABELLED` = 255, the usual ignore value). The supervised loss then asks only that
the probability of the allowed set be high (the marginal likelihood of a partial label), and the
soft Dice of a class counts only voxels whose membership in it is known, so unreviewed voxels never
act as labels. Inside the allowed set, :func:`distillation_loss` keeps the old model's split (e.g.
RV against background) so the network does not forget what nobody corrected.
On ordinary labels :func:`partial_dice_ce_loss` equals :func:`losses.dice_ce_loss` exactly.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import IdealError

PARTIAL = 128  # values >= PARTIAL are sets of allowed classes: bit c set = class c allowed
UNLABELLED = 255  # every class allowed: the voxel is unlabelled
MAX_CLASSES = 7
_EXCLUDED = -1e4  # logit of a class outside the allowed set (finite: no inf - inf in gradients)


def class_set_value(classes: Sequence[int]) -> int:
    """The partial-label value allowing exactly ``classes`` (a single class is its own value)."""
    classes = sorted(set(int(c) for c in classes))
    if not classes or classes[0] < 0 or classes[-1] >= MAX_CLASSES:
        raise IdealError(f"a partial label needs 1 to {MAX_CLASSES} classes in 0-{MAX_CLASSES - 1}, got {classes}")
    return classes[0] if len(classes) == 1 else PARTIAL | sum(1 << c for c in classes)


def reviewed_labels(
    labels: np.ndarray, reviewed: Mapping[int, Sequence[int]], slice_axis: int, num_classes: int
) -> np.ndarray:
    """Labels kept only where reviewed: ``reviewed`` maps a class value to the slices it was reviewed on.

    On a slice where classes R were reviewed, a voxel labelled with a class of R keeps it and every
    other voxel may be any class but R; a slice with no reviewed class is :data:`UNLABELLED`.
    """
    if not 2 <= num_classes <= MAX_CLASSES:
        raise IdealError(f"partial labels support 2 to {MAX_CLASSES} classes, got {num_classes}")
    out = np.full(labels.shape, UNLABELLED, np.uint8)
    count = labels.shape[slice_axis]
    for value, slices in reviewed.items():
        if not 1 <= int(value) < num_classes:
            raise IdealError(f"reviewed class {value} is not a structure of this model (1-{num_classes - 1})")
        bad = [k for k in slices if not 0 <= int(k) < count]
        if bad:
            raise IdealError(f"reviewed slices {bad} of class {value} are outside the volume's {count} slices")
    source, target = np.moveaxis(labels, slice_axis, 0), np.moveaxis(out, slice_axis, 0)  # views
    for k in range(count):
        done = sorted(int(value) for value, slices in reviewed.items() if k in set(int(s) for s in slices))
        if not done:
            continue
        rest = class_set_value([c for c in range(num_classes) if c not in done])
        target[k] = np.where(np.isin(source[k], done), source[k], rest)
    return out


def allowed_classes(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Bool (N, C, H, W): which classes each voxel of a (partial) label map (N, H, W) may belong to."""
    target = target.long()
    classes = torch.arange(num_classes, device=target.device).view(1, -1, 1, 1)
    value = target[:, None]
    partial = value >= PARTIAL
    return torch.where(partial, ((value - PARTIAL) >> classes) & 1 == 1, value == classes)


def has_partial(target: torch.Tensor) -> bool:
    """Whether a label batch holds any partial (set-valued or unlabelled) voxel."""
    return bool((target >= PARTIAL).any())


def partial_dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """(marginal cross-entropy + soft Dice on known voxels) / 2; equals ``dice_ce_loss`` on ordinary labels.

    Cross-entropy is -log P(allowed set), averaged over voxels that exclude at least one class; the
    Dice of class c counts only voxels known to be c (a single allowed class) or known not to be c.
    """
    allowed = allowed_classes(target, logits.shape[1])
    log_p = F.log_softmax(logits.float(), dim=1)
    informative = ~allowed.all(dim=1)
    ce = -log_p.masked_fill(~allowed, _EXCLUDED).logsumexp(dim=1)
    ce = (ce * informative).sum() / informative.sum().clamp(min=1)
    single = allowed.sum(dim=1, keepdim=True) == 1
    positive, known = (allowed & single).float(), (single | ~allowed).float()
    p = log_p.exp()
    dims = (0, 2, 3)
    intersection = (p * positive * known).sum(dims)
    denominator = (p * known).sum(dims) + positive.sum(dims)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    scored = known.sum(dims)[1:] > 0
    dice_loss = 1 - dice[1:][scored].mean() if scored.any() else logits.sum() * 0.0
    return 0.5 * (ce + dice_loss)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the class distributions renormalised inside each voxel's allowed set.

    Averaged over voxels with more than one allowed class (where the labels leave the answer open):
    there the old model's split is kept; where the label is certain the term is zero.
    """
    allowed = allowed_classes(target, student.shape[1])
    open_ = allowed.sum(dim=1) > 1
    t = F.log_softmax(teacher.float().masked_fill(~allowed, _EXCLUDED), dim=1)
    s = F.log_softmax(student.float().masked_fill(~allowed, _EXCLUDED), dim=1)
    kl = torch.where(allowed, t.exp() * (t - s), torch.zeros_like(t)).sum(dim=1)
    return (kl * open_).sum() / open_.sum().clamp(min=1)
