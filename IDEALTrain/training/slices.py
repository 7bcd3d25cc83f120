"""Training data on the network grid: each case's slices resampled, padded and stacked into tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import IdealError
from ..io.datasets import Case
from ..model.networks import NetworkConfig
from ..model.preprocessing import Preprocessing, SliceGrid, check_volume
from .partial_labels import PARTIAL


def network_slices(
    cases: list[Case], plan: Preprocessing, size_multiple: int, with_labels: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each case's slices on the network grid: images (S,1,H,W) and, if asked, labels (S,H,W) uint8."""
    images, labels = [], []
    for case in cases:
        if with_labels and case.label is None:
            raise IdealError(f"case {case.name} has no label; it cannot be used as labelled data")
        check_volume(case.image)
        grid = SliceGrid(case.image, plan, size_multiple)
        images.append(grid.image_to_network(case.image))
        if with_labels:
            labels.append(grid.labels_to_network(case.label).to(torch.uint8))
    return images, labels


def pad_and_stack(stacks: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Concatenate slice stacks after padding each (centred) to height x width."""

    def pad(x: torch.Tensor) -> torch.Tensor:
        top, left = (height - x.shape[-2]) // 2, (width - x.shape[-1]) // 2
        return F.pad(x, (left, width - x.shape[-1] - left, top, height - x.shape[-2] - top))

    return torch.cat([pad(x) for x in stacks])


def prepare_slices(
    labeled: list[Case], unlabeled: list[Case], plan: Preprocessing, network: NetworkConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Labelled images (N,1,H,W) and labels (N,H,W) uint8, unlabelled images (M,1,H,W) or None.

    Spacing-based plans give each volume its own slice size: all are padded to the largest.
    """
    if not labeled:
        raise IdealError("no labelled cases to train on")
    images, labels = network_slices(labeled, plan, network.size_multiple, with_labels=True)
    pool, _ = network_slices(unlabeled, plan, network.size_multiple, with_labels=False)
    height = max(x.shape[-2] for x in images + pool)
    width = max(x.shape[-1] for x in images + pool)
    x, y = pad_and_stack(images, height, width), pad_and_stack(labels, height, width)
    if int(torch.where(y < PARTIAL, y, 0).max()) >= network.num_classes:  # values >= PARTIAL: partial labels
        raise IdealError(f"labels contain values outside 0-{network.num_classes - 1}: {torch.unique(y).tolist()}")
    return x, y, (pad_and_stack(pool, height, width) if pool else None)
