"""IDEAL pretraining: dense contrastive learning of the U-Net encoder on unlabelled slices.

Two augmented views of each slice with a known geometric relation go through a query encoder
with a 1x1-convolution dense projection head and a momentum (key) copy of both; a dense InfoNCE
loss pulls together the embeddings of corresponding pixels and pushes apart those of other
pixels and other images (optionally also a queue of past keys). An optional image-level term
(global InfoNCE on pooled embeddings, as in Chaitanya et al. 2020) can be added. The result is a
``pretrained-encoder`` bundle that ``finetune --pretrained`` starts from.

Each variant the review of issue 16 asked for is an option, measurable on its own: the optimiser
(Adam, AdamW, SGD), dropout off, an eval-mode key encoder, the dense loss at extra levels, positives
within a radius of the partner cell, the queue and the global term. Issue 32 adds decoder pretraining
(``decoder_blocks``): the dense loss on the U-Net decoder's output after its first blocks, as Chaitanya
et al.'s local loss, so the bundle carries those blocks too and finetuning starts them pretrained. The bundle card records each
encoder level's weight norm at the random start and at the end, since SGD finetuning's effective
step on a batch-normalised filter shrinks as its norm grows.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import IdealError
from ..inference.predictor import resolve_device
from ..io.datasets import Case
from ..model.bundle import Bundle
from ..model.networks import DenseProjectionHead, NetworkConfig, UNetDecoder, UNetEncoder, update_moving_average
from ..model.preprocessing import Preprocessing
from .contrastive import KeyQueue, ViewConfig, corresponding_points, dense_info_nce, global_info_nce, make_views
from .distributed import setup_distributed
from .encoder_start import encoder_level_norms
from .loop import TrainingLoop
from .precision import autocast, resolve_precision
from .slices import network_slices, pad_and_stack

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class PretrainConfig:
    """Hyper-parameters of contrastive pretraining (recorded in the bundle card).

    The paper leaves these open; defaults follow Chaitanya et al. (temperature 0.1, Adam 1e-3)
    and MoCo (key momentum 0.99); the queue is off unless asked for.
    """

    iterations: int = 1000
    batch_size: int = 16
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adam"  # "adamw" (decoupled decay bounds the norms) or "sgd" (momentum 0.9; use a larger lr)
    temperature: float = 0.1
    samples_per_image: int = 64
    negative_min_distance: float = 0.0  # same-image cells closer than this (feature cells) are not negatives
    same_image_negatives: bool = False  # negatives only from the query's own image (Chaitanya et al.'s local loss)
    positive_radius: float = 0.0  # same-image cells closer than this (feature cells) are positives too (PixPro-style)
    key_momentum: float = 0.99
    key_eval: bool = False  # the key encoder runs in eval mode (running batch-norm statistics, no dropout)
    dropout: bool = True  # False: no dropout in either encoder while pretraining
    queue_size: int = 0
    dense_level: int = -1  # encoder level whose features are projected (-1: the deepest)
    extra_dense_levels: tuple[int, ...] = ()  # more levels with their own head; the dense loss is the mean over levels
    global_weight: float = 0.0  # weight of the optional image-level InfoNCE term
    frozen_levels: int = 0  # the finest N encoder levels keep their random start; only deeper ones learn
    decoder_blocks: int = 0  # > 0: the dense loss on the U-Net decoder after this many blocks (Chaitanya et al.), which are kept too
    precision: str = "auto"  # "bf16" autocast + channels-last, "fp32", or "auto": bf16 where the device runs it natively
    seed: int = 0
    checkpoint_every: int = 500
    network: NetworkConfig = field(default_factory=NetworkConfig)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    views: ViewConfig = field(default_factory=ViewConfig)

    def __post_init__(self) -> None:
        self.extra_dense_levels = tuple(int(level) for level in self.extra_dense_levels)

    def to_json(self) -> dict:
        return asdict(self)  # nested configs are dataclasses too


class DenseEmbedder(nn.Module):
    """Encoder + dense projection heads: per-pixel unit embeddings of the dense level (and any extra levels)."""

    def __init__(self, config: PretrainConfig) -> None:
        super().__init__()
        depth = config.network.depth
        levels = (config.dense_level, *config.extra_dense_levels)
        for level in levels:
            if not -depth <= level < depth:
                raise IdealError(f"--dense-level {level} is outside the encoder's {depth} levels")
        resolved = [range(depth)[level] for level in levels]
        if len(set(resolved)) != len(resolved):
            raise IdealError(f"dense levels {list(levels)} name one encoder level twice")
        self.level, self.extra_levels = config.dense_level, config.extra_dense_levels
        self.encoder = UNetEncoder(config.network)
        learning = max(resolved) + 1  # levels the dense loss reaches
        if not 0 <= config.frozen_levels < learning:
            raise IdealError(
                f"--frozen-levels {config.frozen_levels} must be 0 or more and leave a level up to --dense-level "
                f"to learn (at most {learning - 1})"
            )
        self.encoder.levels[: config.frozen_levels].requires_grad_(False)
        channels, dim = config.network.channels, config.network.projection_dim
        self.decoder_blocks = config.decoder_blocks
        self.decoder = decoder_to_pretrain(config)
        dense_channels = channels[depth - 1 - self.decoder_blocks] if self.decoder is not None else channels[config.dense_level]
        self.head = DenseProjectionHead(dense_channels, dim)
        self.extra_heads = nn.ModuleList([DenseProjectionHead(channels[level], dim) for level in self.extra_levels])
        if not config.dropout:
            for module in self.encoder.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.encoder(x)
        extra = [head(features[level]) for head, level in zip(self.extra_heads, self.extra_levels)]
        dense = self.decoder.upsample(features, self.decoder_blocks) if self.decoder is not None else features[self.level]
        return [self.head(dense), *extra]

    def pretrained_weights(self, network: NetworkConfig) -> dict[str, torch.Tensor]:
        """What the bundle keeps: the encoder, and the decoder blocks the dense loss trained (named as in
        the segmentation network of ``network``'s decoders, so finetuning loads them where they belong)."""
        weights = {f"encoder.{name}": t for name, t in self.encoder.state_dict().items()}
        if self.decoder is not None:
            index = network.decoders.index("unet")
            trained = tuple(f"{part}.{block}." for part in ("reduce", "blocks") for block in range(self.decoder_blocks))
            weights |= {f"decoders.{index}.{name}": t for name, t in self.decoder.state_dict().items() if name.startswith(trained)}
        return {name: t.detach().cpu().clone() for name, t in weights.items()}


def decoder_to_pretrain(config: PretrainConfig) -> UNetDecoder | None:
    """Decoder pretraining: the U-Net decoder whose first ``decoder_blocks`` blocks carry the dense loss
    (the others, unused, do not learn), or None."""
    if not config.decoder_blocks:
        return None
    depth = config.network.depth
    if not 0 < config.decoder_blocks < depth:
        raise IdealError(f"--decoder-blocks must be between 1 and {depth - 1} (the U-Net decoder's blocks), got {config.decoder_blocks}")
    if "unet" not in config.network.decoders:
        raise IdealError("decoder pretraining trains the U-Net decoder: the network needs a unet decoder")
    if config.dense_level not in (-1, depth - 1):
        raise IdealError("--decoder-blocks puts the dense loss on the decoder: leave --dense-level at the deepest level")
    decoder = UNetDecoder(config.network)
    decoder.requires_grad_(False)
    for part in (decoder.reduce, decoder.blocks):
        part[: config.decoder_blocks].requires_grad_(True)
    return decoder


def check_pretraining(cases: list[Case], config: PretrainConfig) -> None:
    """Refuse contradictory options before any work."""
    if not cases:
        raise IdealError("no unlabelled images to pretrain on")
    if config.same_image_negatives and config.queue_size:
        raise IdealError("same-image negatives exclude a key queue (its keys come from other images); set the queue size to 0")
    if config.optimizer not in OPTIMIZERS:
        raise IdealError(f"pretraining optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}")
    if not config.positive_radius >= 0:
        raise IdealError(f"the positive radius must be zero or more feature cells, got {config.positive_radius}")


def build_optimizer(query: DenseEmbedder, config: PretrainConfig) -> torch.optim.Optimizer:
    """Adam (the published recipes), AdamW (decoupled weight decay) or SGD with momentum, on the learning weights."""
    params = [p for p in query.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=0.9, weight_decay=config.weight_decay)
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def pretrain(
    cases: list[Case],
    config: PretrainConfig,
    *,
    device: str = "auto",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress_json: bool = False,
    stop_after: Callable[[int], bool] | None = None,
) -> Bundle | None:
    """Pretrain the encoder on the slices of ``cases`` (labels, if any, are ignored).

    Returns a ``pretrained-encoder`` bundle (None on ranks other than 0 of a torchrun run).
    """
    check_pretraining(cases, config)
    context = setup_distributed(resolve_device(device))
    precision = resolve_precision(config.precision, context.device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    query = DenseEmbedder(config).to(context.device, memory_format=torch.channels_last)  # bad options fail before the data is read
    initial_norms = encoder_level_norms(query.encoder)
    stacks, _ = network_slices(cases, config.preprocessing, config.network.size_multiple, with_labels=False)
    images = pad_and_stack(stacks, max(x.shape[-2] for x in stacks), max(x.shape[-1] for x in stacks))

    if context.device.type == "cuda":  # the whole set fits on a GPU: no loader round trips
        images = images.to(context.device)
    key = copy.deepcopy(query).requires_grad_(False)
    model = context.wrap(query)
    optimizer = build_optimizer(query, config)
    queue = KeyQueue(config.queue_size, config.network.projection_dim, device=context.device) if config.queue_size else None
    run_info = {"phase": "pretrain", "config": config.to_json(), "data": [case.name for case in cases]}
    loop = TrainingLoop(
        "pretrain", config.iterations, modules={"query": query, "key": key}, optimizer=optimizer, generator=generator,
        run_info=run_info, checkpoint_dir=checkpoint_dir, checkpoint_every=config.checkpoint_every, resume=resume,
        progress_json=progress_json, stop_after=stop_after, is_main=context.is_main,
    )
    if queue is not None and "queue" in loop.extra:
        queue.load_state_dict(loop.extra["queue"])
    step = PretrainStep(config, query, key, model, optimizer, queue, images, generator, context, autocast(precision, context.device))

    def keep_queue(done: int) -> None:
        if queue is not None:
            loop.extra["queue"] = queue.state_dict()

    query.train()
    key.train(not config.key_eval)
    loop.run(step, keep_queue)
    agree = context.ranks_agree(query)
    if not agree:
        raise IdealError("the pretraining processes ended with different weights; the distributed run is inconsistent")
    if not context.is_main:
        return None
    norms = {"initial": initial_norms, "final": encoder_level_norms(query.encoder)}
    loop.progress.event("encoder_norms", **norms)
    return Bundle(
        network=config.network,
        preprocessing=config.preprocessing,
        weights=query.pretrained_weights(config.network),
        kind="pretrained-encoder",
        description="U-Net encoder pretrained with IDEAL's dense contrastive loss"
        + (f" (and the first {config.decoder_blocks} U-Net decoder blocks, which carried it)" if config.decoder_blocks else ""),
        training={
            "method": "ideal-dense-contrastive-pretraining",
            "recipe": config.to_json(),
            "cases": len(cases),
            "slices": len(images),
            "device": str(context.device),
            "precision": precision,
            "processes": context.world_size,
            "encoder_level_norms": norms,  # per level, at the random start and at the end
        },
    )


class PretrainStep:
    """One pretraining iteration: two views, query and key embeddings, dense (+ global) InfoNCE, step, key update."""

    def __init__(
        self, config: PretrainConfig, query: DenseEmbedder, key: DenseEmbedder, model: nn.Module,
        optimizer: torch.optim.Optimizer, queue: KeyQueue | None, images: torch.Tensor, generator: torch.Generator,
        context, autocast_context: torch.autocast,
    ) -> None:
        self.config, self.query, self.key, self.model, self.optimizer = config, query, key, model, optimizer
        self.queue, self.images, self.generator, self.context = queue, images, generator, context
        self.autocast = autocast_context

    def __call__(self, iteration: int) -> dict[str, float]:
        config, context = self.config, self.context
        lr = config.learning_rate * (1 - iteration / config.iterations) ** 0.9
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(self.images), (config.batch_size,), generator=self.generator).to(self.images.device)
        views = make_views(self.images[index], config.views, self.generator)  # the same stream on every rank
        view1, view2 = (context.shard(v).to(context.device) for v in (views.view1, views.view2))
        theta1, theta2 = (context.shard(t).to(context.device) for t in (views.theta1, views.theta2))
        with self.autocast:
            queries = self.model(view1.contiguous(memory_format=torch.channels_last))
            with torch.no_grad():
                keys = self.key(view2.contiguous(memory_format=torch.channels_last))
        losses = []
        for level, (q, k) in enumerate(zip(queries, keys)):
            points, valid = corresponding_points(theta1, theta2, tuple(q.shape[-2:]))
            dense = dense_info_nce(
                q, k, points, valid, generator=self.generator, temperature=config.temperature,
                samples_per_image=config.samples_per_image,
                queue=self.queue.tensor() if self.queue is not None and level == 0 else None,
                negative_min_distance=config.negative_min_distance, same_image_negatives=config.same_image_negatives,
                positive_radius=config.positive_radius,
            )
            losses.append(dense.loss)
            if level == 0:
                main_keys = dense.keys
        loss = sum(losses) / len(losses)
        metrics = {"loss_dense": loss.item(), "lr": lr}
        if config.global_weight:
            pooled = [F.normalize(e.mean(dim=(2, 3)), dim=1) for e in (queries[0], keys[0])]
            global_loss = global_info_nce(*pooled, temperature=config.temperature)
            loss = loss + config.global_weight * global_loss
            metrics["loss_global"] = global_loss.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        update_moving_average(self.key, self.query, config.key_momentum)
        if self.queue is not None:
            self.queue.enqueue(main_keys)
        return {"loss": loss.item(), **metrics}
