"""IDEAL pretraining: dense contrastive learning of the U-Net encoder on unlabelled slices.

Two augmented views of each slice with a known geometric relation go through a query encoder
with a 1x1-convolution dense projection head and a momentum (key) copy of both; a dense InfoNCE
loss pulls together the embeddings of corresponding pixels and pushes apart those of other
pixels and other images (optionally also a queue of past keys). An optional image-level term
(global InfoNCE on pooled embeddings, as in Chaitanya et al. 2020) can be added. The result is a
``pretrained-encoder`` bundle that ``finetune --pretrained`` starts from.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..model.bundle import Bundle
from ..training.contrastive import KeyQueue, ViewConfig, corresponding_points, dense_info_nce, global_info_nce, make_views
from ..io.datasets import Case
from ..training.distributed import setup_distributed
from ..errors import IdealError
from ..model.networks import DenseProjectionHead, NetworkConfig, UNetEncoder, update_moving_average
from ..inference.predictor import resolve_device
from ..model.preprocessing import Preprocessing
from ..training.finetune import network_slices, pad_and_stack
from ..training.loop import TrainingLoop


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
    temperature: float = 0.1
    samples_per_image: int = 64
    negative_min_distance: float = 0.0  # same-image cells closer than this (feature cells) are not negatives
    same_image_negatives: bool = False  # negatives only from the query's own image (Chaitanya et al.'s local loss)
    key_momentum: float = 0.99
    queue_size: int = 0
    dense_level: int = -1  # encoder level whose features are projected (-1: the deepest)
    global_weight: float = 0.0  # weight of the optional image-level InfoNCE term
    frozen_levels: int = 0  # the finest N encoder levels keep their random start; only deeper ones learn
    seed: int = 0
    checkpoint_every: int = 500
    network: NetworkConfig = field(default_factory=NetworkConfig)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    views: ViewConfig = field(default_factory=ViewConfig)

    def to_json(self) -> dict:
        return asdict(self)  # nested configs are dataclasses too


class DenseEmbedder(nn.Module):
    """Encoder + dense projection head: per-pixel unit embeddings of one encoder level."""

    def __init__(self, config: PretrainConfig) -> None:
        super().__init__()
        if not -config.network.depth <= config.dense_level < config.network.depth:
            raise IdealError(f"--dense-level {config.dense_level} is outside the encoder's {config.network.depth} levels")
        self.level = config.dense_level
        self.encoder = UNetEncoder(config.network)
        learning = range(config.network.depth)[config.dense_level] + 1  # levels the dense loss reaches
        if not 0 <= config.frozen_levels < learning:
            raise IdealError(f"--frozen-levels {config.frozen_levels} must be 0 or more and leave a level up to --dense-level to learn (at most {learning - 1})")
        self.encoder.levels[: config.frozen_levels].requires_grad_(False)
        self.head = DenseProjectionHead(config.network.channels[config.dense_level], config.network.projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[self.level])


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
    if not cases:
        raise IdealError("no unlabelled images to pretrain on")
    if config.same_image_negatives and config.queue_size:
        raise IdealError("same-image negatives exclude a key queue (its keys come from other images); set the queue size to 0")
    context = setup_distributed(resolve_device(device))
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    query = DenseEmbedder(config).to(context.device, memory_format=torch.channels_last)  # bad options fail before the data is read
    stacks, _ = network_slices(cases, config.preprocessing, config.network.size_multiple, with_labels=False)
    images = pad_and_stack(stacks, max(x.shape[-2] for x in stacks), max(x.shape[-1] for x in stacks))

    if context.device.type == "cuda":  # the whole set fits on a GPU: no loader round trips
        images = images.to(context.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=context.device.type == "cuda")
    key = copy.deepcopy(query).requires_grad_(False)
    model = context.wrap(query)
    optimizer = torch.optim.Adam([p for p in query.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=config.weight_decay)
    queue = KeyQueue(config.queue_size, config.network.projection_dim, device=context.device) if config.queue_size else None
    run_info = {"phase": "pretrain", "config": config.to_json(), "data": [case.name for case in cases]}
    loop = TrainingLoop(
        "pretrain", config.iterations, modules={"query": query, "key": key}, optimizer=optimizer, generator=generator,
        run_info=run_info, checkpoint_dir=checkpoint_dir, checkpoint_every=config.checkpoint_every, resume=resume,
        progress_json=progress_json, stop_after=stop_after, is_main=context.is_main,
    )
    if queue is not None and "queue" in loop.extra:
        queue.load_state_dict(loop.extra["queue"])

    def step(iteration: int) -> dict[str, float]:
        lr = config.learning_rate * (1 - iteration / config.iterations) ** 0.9
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(images), (config.batch_size,), generator=generator).to(images.device)
        views = make_views(images[index], config.views, generator)  # the same stream on every rank
        view1, view2 = (context.shard(v).to(context.device) for v in (views.view1, views.view2))
        theta1, theta2 = (context.shard(t).to(context.device) for t in (views.theta1, views.theta2))
        with autocast:
            queries = model(view1.contiguous(memory_format=torch.channels_last))
            with torch.no_grad():
                keys = key(view2.contiguous(memory_format=torch.channels_last))
        points, valid = corresponding_points(theta1, theta2, tuple(queries.shape[-2:]))
        dense = dense_info_nce(
            queries, keys, points, valid, generator=generator, temperature=config.temperature,
            samples_per_image=config.samples_per_image, queue=queue.tensor() if queue is not None else None,
            negative_min_distance=config.negative_min_distance, same_image_negatives=config.same_image_negatives,
        )
        loss = dense.loss
        metrics = {"loss_dense": dense.loss.item(), "lr": lr}
        if config.global_weight:
            pooled = [F.normalize(e.mean(dim=(2, 3)), dim=1) for e in (queries, keys)]
            global_loss = global_info_nce(*pooled, temperature=config.temperature)
            loss = loss + config.global_weight * global_loss
            metrics["loss_global"] = global_loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_moving_average(key, query, config.key_momentum)
        if queue is not None:
            queue.enqueue(dense.keys)
            loop.extra["queue"] = queue.state_dict()
        return {"loss": loss.item(), **metrics}

    query.train()
    loop.run(step)
    agree = context.ranks_agree(query)
    if not agree:
        raise IdealError("the pretraining processes ended with different weights; the distributed run is inconsistent")
    if not context.is_main:
        return None
    return Bundle(
        network=config.network,
        preprocessing=config.preprocessing,
        weights={f"encoder.{name}": t.detach().cpu().clone() for name, t in query.encoder.state_dict().items()},
        kind="pretrained-encoder",
        description="U-Net encoder pretrained with IDEAL's dense contrastive loss",
        training={
            "method": "ideal-dense-contrastive-pretraining",
            "recipe": config.to_json(),
            "cases": len(cases),
            "slices": len(images),
            "device": str(context.device),
            "processes": context.world_size,
        },
    )
