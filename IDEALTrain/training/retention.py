"""Retraining a model on a few corrected cases without forgetting, in minutes on a CPU.

Four levers, all recorded in the card through ``TrainConfig``: the finest encoder levels stay
frozen (fewer layers trained: faster, and the features the old model learnt from many scans are
kept), the old model distils its predictions wherever the labels leave the answer open
(:func:`partial_labels.distillation_loss`), the final weights are a mix of the old and the trained
ones (weight-space ensembling, Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022:
half of the update keeps most of the gain at the new site and about half of the loss elsewhere), and
training runs on random crops of the slices.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import IdealError


def freeze_encoder_levels(network: nn.Module, levels: int, norm_statistics: bool = False) -> list[nn.Module]:
    """Stop the finest ``levels`` encoder levels from learning; return the modules to keep in eval mode.

    Eval mode matters: batch-norm statistics would otherwise drift towards the few new scans. With
    ``norm_statistics`` every batch-norm layer keeps the starting model's statistics (its scale and
    shift still learn), so the network normalises old and new scans as before.
    """
    encoder_levels = network.encoder.levels
    if not 0 <= levels <= len(encoder_levels):
        raise IdealError(f"frozen levels must be 0 to the encoder's {len(encoder_levels)} levels, got {levels}")
    frozen = list(encoder_levels[:levels])
    for module in frozen:
        module.requires_grad_(False)
    if norm_statistics:
        frozen += [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in frozen:
        module.eval()
    return frozen


def frozen_copy(network: nn.Module) -> nn.Module:
    """The old model as a fixed teacher: a copy in eval mode (no dropout) that never learns."""
    return copy.deepcopy(network).requires_grad_(False).eval()


def random_crop(images: torch.Tensor, labels: torch.Tensor, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One random ``size`` x ``size`` window per batch (images (B,1,H,W), labels (B,H,W)); 0 or a larger size keeps all."""
    height, width = images.shape[-2:]
    if size <= 0 or (size >= height and size >= width):
        return images, labels
    top = int(torch.randint(max(1, height - size + 1), (1,), generator=generator))
    left = int(torch.randint(max(1, width - size + 1), (1,), generator=generator))
    window = (slice(top, top + size), slice(left, left + size))
    return images[..., window[0], window[1]], labels[..., window[0], window[1]]


class Retention:
    """A run's protection against forgetting: frozen modules kept in eval mode, distillation from the starting model.

    Built right after the network gets its starting weights: the one frozen copy of them, taken then, is
    both the model distilled from and the weights mixed back in at the end.
    """

    def __init__(
        self, network: nn.Module, *, frozen_levels: int, frozen_norm: bool, distill_weight: float, has_start: bool,
        keep_old: float = 0.0,
    ) -> None:
        if (distill_weight > 0 or keep_old > 0) and not has_start:
            raise IdealError("distillation and --keep-old need a starting model (--init-from)")
        if not 0 <= keep_old < 1:
            raise IdealError(f"--keep-old is the starting model's share of the final weights, 0 to below 1; got {keep_old}")
        self.old = frozen_copy(network) if distill_weight > 0 or keep_old > 0 else None
        self.distill = distill_weight > 0
        self.keep_old = keep_old
        self.frozen = freeze_encoder_levels(network, frozen_levels, frozen_norm)

    def blend_with_start(self, network: nn.Module) -> None:
        """Final weights: ``keep_old`` of the starting model's plus the rest of the trained ones (float tensors only)."""
        if self.keep_old == 0:
            return
        start = self.old.state_dict()
        with torch.no_grad():
            for name, value in network.state_dict().items():
                if value.is_floating_point():
                    value.lerp_(start[name].to(value.device, value.dtype), self.keep_old)

    def before_step(self) -> None:
        """Keep the frozen modules in eval mode (validation switches the network back to training mode)."""
        for module in self.frozen:
            module.eval()

    def distillation(self, x: torch.Tensor, labels: torch.Tensor, streams: list[torch.Tensor], autocast) -> torch.Tensor | None:
        """The distillation loss of a batch (labelled part first, with ``labels``; the rest unlabelled), None when off."""
        if not self.distill:
            return None
        from .partial_labels import UNLABELLED, distillation_loss

        with torch.no_grad(), autocast:
            old = self.old(x.contiguous(memory_format=torch.channels_last))
        rest = torch.full((len(x) - len(labels), *labels.shape[1:]), UNLABELLED, dtype=labels.dtype, device=labels.device)
        open_ = torch.cat([labels, rest])
        return sum(distillation_loss(s, o, open_) for s, o in zip(streams, old)) / len(streams)
