"""Where a finetuning run starts: a pretrained encoder (as it is, diluted, or rescaled), or a whole earlier model.

Every conv feeds a batch norm, so a filter's scale does not change what the network computes but
does set SGD's effective step on it (about lr / |w|^2): a pretraining that inflates the filters'
norms slows the finetuning of the encoder. :func:`encoder_level_norms` measures that, and
``rescale=True`` puts each pretrained filter back to the norm of the run's own random filter.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import IdealError
from ..model.bundle import Bundle
from ..model.networks import NetworkConfig, SegmentationNetwork


def encoder_level_norms(weights: dict[str, torch.Tensor] | nn.Module) -> list[float]:
    """L2 norm of all conv weights of each encoder level (keys ``levels.N...`` of an encoder's state dict)."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    squares: dict[int, float] = {}
    for name, tensor in state.items():
        if name.startswith("levels.") and name.endswith(".weight") and tensor.ndim == 4:
            level = int(name.split(".")[1])
            squares[level] = squares.get(level, 0.0) + float(tensor.float().square().sum())
    return [squares[level] ** 0.5 for level in sorted(squares)]


def rescale_filters(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each conv filter (output channel) of ``weights`` scaled to the norm of the same filter in ``reference``.

    Only 4D conv weights change: the filters' directions are kept, batch norm makes their scale
    irrelevant to the output, and the effective SGD step returns to that of a random start.
    """
    scaled = dict(weights)
    for name, tensor in weights.items():
        if tensor.ndim == 4 and name.endswith(".weight"):
            own = reference[name].float().flatten(1).norm(dim=1)
            current = tensor.float().flatten(1).norm(dim=1).clamp(min=1e-12)
            scaled[name] = tensor.float() * (own / current).view(-1, 1, 1, 1)
    return scaled


def load_pretrained_encoder(
    network: SegmentationNetwork, pretrained: Bundle, mix: float = 1.0, rescale: bool = False
) -> dict[str, list[float]]:
    """Initialise the shared encoder from a pretrained bundle of the same encoder architecture.

    With ``mix`` < 1 the start is ``mix`` x pretrained + (1 - mix) x the encoder's own random
    weights (shrink and perturb, Ash & Adams 2020), against the warm start's generalisation gap.
    With ``rescale`` every pretrained conv filter takes the norm of the encoder's own random filter
    (no random mix). Returns each level's weight norm: initial (random), pretrained, and start.
    """
    if rescale and mix != 1.0:
        raise IdealError("rescaling the pretrained filters and mixing them with random weights exclude each other")
    mine, theirs = network.config, pretrained.network
    fields_ = ("in_channels", "base_channels", "depth")
    if any(getattr(mine, f) != getattr(theirs, f) for f in fields_):
        raise IdealError(
            f"pretrained bundle {pretrained.model_id} has another encoder architecture "
            f"({', '.join(f'{f}={getattr(theirs, f)}' for f in fields_)}) than this run "
            f"({', '.join(f'{f}={getattr(mine, f)}' for f in fields_)})"
        )
    prefix = "encoder."
    weights = {k[len(prefix) :]: v for k, v in pretrained.weights.items() if k.startswith(prefix)}
    own = {k: v.clone() for k, v in network.encoder.state_dict().items()}
    norms = {"initial": encoder_level_norms(own), "pretrained": encoder_level_norms(weights)}
    if mix != 1.0:
        weights = {k: mix * v.float() + (1 - mix) * own[k] if v.is_floating_point() else v for k, v in weights.items()}
    if rescale:
        weights = rescale_filters(weights, own)
    network.encoder.load_state_dict(weights)
    load_pretrained_decoder_blocks(network, pretrained, mix, rescale)
    return norms | {"start": encoder_level_norms(network.encoder)}


def load_pretrained_decoder_blocks(network: SegmentationNetwork, pretrained: Bundle, mix: float = 1.0, rescale: bool = False) -> list[str]:
    """The decoder blocks a decoder-pretrained bundle carries (``decoders.I...``, I in the bundle's decoder
    order), loaded into this network's decoder of the same kind, mixed or rescaled as the encoder; the
    rest of that decoder keeps its random start. Returns the names loaded (none for an encoder-only bundle)."""
    prefix = "decoders."
    carried = {k: v for k, v in pretrained.weights.items() if k.startswith(prefix)}
    by_decoder: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in carried.items():
        index, rest = name[len(prefix):].split(".", 1)
        kind = pretrained.network.decoders[int(index)]
        if kind not in network.config.decoders:
            raise IdealError(
                f"pretrained bundle {pretrained.model_id} carries pretrained {kind} decoder blocks, but this run's "
                f"decoders are {', '.join(network.config.decoders)}: add a {kind} decoder or use an encoder-only bundle"
            )
        by_decoder.setdefault(network.config.decoders.index(kind), {})[rest] = tensor
    for index, weights in by_decoder.items():
        decoder = network.decoders[index]
        own = {k: v.clone() for k, v in decoder.state_dict().items()}
        if mix != 1.0:
            weights = {k: mix * v.float() + (1 - mix) * own[k] if v.is_floating_point() else v for k, v in weights.items()}
        if rescale:
            weights = rescale_filters(weights, own)
        decoder.load_state_dict(own | weights)
    return sorted(carried)


def check_initial_model(initial: Bundle, config: NetworkConfig) -> None:
    """Refuse a starting model that is no segmentation model, or of another architecture than the run.

    Starting from a whole model (encoder and decoders) is a second training cycle, or retraining a
    model on new cases instead of starting over.
    """
    if initial.kind != "segmentation":
        raise IdealError(
            f"model {initial.model_id} is a {initial.kind} bundle; initialising a run needs a segmentation model "
            "(an encoder is a pretrained start)"
        )
    if initial.network != config:
        raise IdealError(
            f"model {initial.model_id} {initial.version} has another architecture ({initial.network}) than this run "
            f"({config}); leave out the architecture flags to take the model's own"
        )
