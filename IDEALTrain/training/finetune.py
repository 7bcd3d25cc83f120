"""Training the segmentation network: supervised, or IDEAL's two-stream consistency finetuning.

Both run through one code path. Labelled slices get Dice + cross-entropy on both decoders; with
unlabelled slices (and not ``supervised_only``) each decoder's hard pseudo-label supervises the
other decoder (cross pseudo-supervision), weighted by a sigmoid ramp-up. The recipe follows the
SSL4MIS baselines (SGD, momentum 0.9, poly learning-rate decay) so results compare with the
literature; runs are seeded, checkpoint atomically and resume exactly.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..training.augment import Augmentation, augment_batch
from ..model.bundle import Bundle
from ..io.datasets import Case
from ..training.distributed import setup_distributed
from ..errors import IdealError
from ..training.losses import cross_pseudo_label_loss, dice_ce_loss
from ..evaluation.metrics import mean_scores, score
from ..model.networks import NetworkConfig, SegmentationNetwork, update_moving_average
from ..model.postprocessing import Postprocessing
from ..inference.predictor import Predictor, resolve_device
from ..model.preprocessing import Preprocessing, SliceGrid, check_volume
from ..training.loop import TrainingLoop


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run (recorded in the bundle card)."""

    iterations: int = 1000
    batch_size: int = 12  # labelled slices per iteration
    unlabeled_batch_size: int = 12
    learning_rate: float = 0.01
    encoder_lr_scale: float = 1.0  # the shared encoder's share of the learning rate (< 1 keeps more of a pretrained start)
    encoder_warmup: int = 0  # first iterations with the encoder frozen, so fresh decoders learn to read a pretrained start
    pretrained_mix: float = 1.0  # share of the pretrained encoder in the start; the rest is the run's own random start
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    checkpoint_every: int = 500
    validate_every: int = 200
    keep: str = "best"  # with validation cases: "best" keeps the best-scoring weights, "last" only reports
    supervised_only: bool = True
    consistency_weight: float = 0.1  # SSL4MIS cross pseudo supervision uses 0.1
    ramp_up: float = 1.0  # share of the run over which the consistency weight ramps up (SSL4MIS: all of it)
    confidence_threshold: float = 0.0  # pseudo-label pixels less confident than this are ignored
    ema_teacher: bool = False  # pseudo-labels from an exponential moving average of the network
    ema_decay: float = 0.99
    network: NetworkConfig = field(default_factory=NetworkConfig)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    postprocessing: Postprocessing = field(default_factory=Postprocessing)
    augmentation: Augmentation = field(default_factory=Augmentation)

    def to_json(self) -> dict:
        return asdict(self)  # nested configs are dataclasses too

    @property
    def method(self) -> str:
        return "supervised" if self.supervised_only else "ideal-cross-pseudo-supervision"


def consistency_ramp(iteration: int, config: TrainConfig) -> float:
    """Sigmoid ramp-up exp(-5 (1 - t)^2) of the consistency weight over ``ramp_up`` of the run."""
    length = config.ramp_up * config.iterations
    if length <= 0:
        return config.consistency_weight
    t = min(1.0, iteration / length)
    return config.consistency_weight * math.exp(-5.0 * (1.0 - t) ** 2)


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
    labeled: list[Case], unlabeled: list[Case], config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Labelled images (N,1,H,W) and labels (N,H,W) uint8, unlabelled images (M,1,H,W) or None.

    Spacing-based plans give each volume its own slice size: all are padded to the largest.
    """
    if not labeled:
        raise IdealError("no labelled cases to train on")
    multiple = config.network.size_multiple
    images, labels = network_slices(labeled, config.preprocessing, multiple, with_labels=True)
    pool, _ = network_slices(unlabeled, config.preprocessing, multiple, with_labels=False)
    height = max(x.shape[-2] for x in images + pool)
    width = max(x.shape[-1] for x in images + pool)
    x, y = pad_and_stack(images, height, width), pad_and_stack(labels, height, width)
    if int(y.max()) >= config.network.num_classes:
        raise IdealError(f"labels contain values outside 0-{config.network.num_classes - 1}: {torch.unique(y).tolist()}")
    return x, y, (pad_and_stack(pool, height, width) if pool else None)


def load_pretrained_encoder(network: SegmentationNetwork, pretrained: Bundle, mix: float = 1.0) -> None:
    """Initialise the shared encoder from a pretrained bundle of the same encoder architecture.

    With ``mix`` < 1 the start is ``mix`` x pretrained + (1 - mix) x the encoder's own random
    weights (shrink and perturb, Ash & Adams 2020), against the warm start's generalisation gap.
    """
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
    if mix != 1.0:
        own = network.encoder.state_dict()
        weights = {k: mix * v.float() + (1 - mix) * own[k] if v.is_floating_point() else v for k, v in weights.items()}
    network.encoder.load_state_dict(weights)


def check_initial_model(initial: Bundle, config: NetworkConfig) -> None:
    """Refuse a starting model that is no segmentation model, or of another architecture than the run.

    Starting from a whole model (encoder and decoders) is a second training cycle, or retraining a
    model on new cases instead of starting over.
    """
    if initial.kind != "segmentation":
        raise IdealError(f"model {initial.model_id} is a {initial.kind} bundle; initialising a run needs a segmentation model (an encoder is a pretrained start)")
    if initial.network != config:
        raise IdealError(
            f"model {initial.model_id} {initial.version} has another architecture ({initial.network}) than this run ({config}); "
            "leave out the architecture flags to take the model's own"
        )


def _validate(network: SegmentationNetwork, config: TrainConfig, cases: list[Case], device: torch.device) -> dict:
    bundle = Bundle(config.network, config.preprocessing, network.state_dict(), postprocessing=config.postprocessing)
    predictor = Predictor(bundle, device=str(device))
    return mean_scores([score(predictor.predict(case.image).labels, case.label) for case in cases])


def train_segmentation(
    labeled: list[Case],
    config: TrainConfig,
    *,
    unlabeled: list[Case] | None = None,
    pretrained: Bundle | None = None,
    initial: Bundle | None = None,
    val_cases: list[Case] | None = None,
    device: str = "auto",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress_json: bool = False,
    stop_after: Callable[[int], bool] | None = None,
) -> Bundle | None:
    """Train and return a bundle (best validation weights when validation cases are given and
    ``config.keep`` is "best"; with "last", validation is only reported, e.g. on cases kept for a
    later comparison that must not be biased by checkpoint selection).

    In a multi-process (torchrun) run only rank 0 returns the bundle; the other ranks get None.
    """
    if config.keep not in ("best", "last"):
        raise IdealError(f"keep must be 'best' or 'last', got {config.keep!r}")
    if not 0 <= config.encoder_warmup < config.iterations:
        raise IdealError(f"encoder warm-up must be 0 or more iterations and shorter than the run ({config.iterations}), got {config.encoder_warmup}")
    if pretrained is not None and initial is not None:
        raise IdealError("choose either a pretrained encoder or an initial model to start from, not both")
    if not 0 < config.pretrained_mix <= 1:
        raise IdealError(f"the pretrained mix must be above 0 and at most 1 (1: the pretrained encoder as it is), got {config.pretrained_mix}")
    if config.pretrained_mix != 1 and pretrained is None:
        raise IdealError("a pretrained mix below 1 needs a pretrained encoder (--pretrained) to mix with")
    if initial is not None:
        check_initial_model(initial, config.network)
    unlabeled = [] if config.supervised_only else list(unlabeled or [])
    if not config.supervised_only:
        if not unlabeled:
            raise IdealError("finetuning needs unlabelled data: pass --unlabeled SPEC, or use --supervised-only")
        if len(config.network.decoders) != 2:
            raise IdealError(f"two-stream finetuning needs exactly two decoders, got {config.network.decoders}")
    if any(case.label is not None for case in unlabeled):
        unlabeled = [Case(case.name, case.image, None) for case in unlabeled]  # labels never leak in
    context = setup_distributed(resolve_device(device))
    torch_device = context.device
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    images, labels, pool = prepare_slices(labeled, unlabeled, config)

    network = SegmentationNetwork(config.network)
    if pretrained is not None:
        load_pretrained_encoder(network, pretrained, config.pretrained_mix)
    if initial is not None:
        network.load_state_dict({name: tensor.float() for name, tensor in initial.weights.items()})
    network.to(torch_device, memory_format=torch.channels_last)
    teacher = copy.deepcopy(network).requires_grad_(False) if config.ema_teacher and not config.supervised_only else None
    model = context.wrap(network)
    groups = [
        {"params": list(network.encoder.parameters()), "lr_scale": config.encoder_lr_scale, "encoder": True},
        {"params": [p for name, p in network.named_parameters() if not name.startswith("encoder.")], "lr_scale": 1.0, "encoder": False},
    ]
    optimizer = torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay)
    run_info = {
        "phase": "finetune" if not config.supervised_only else "train",
        "config": config.to_json(),
        "data": {"labeled": [c.name for c in labeled], "unlabeled": [c.name for c in unlabeled], "pretrained": pretrained.model_id if pretrained else None,
                 "initial_model": f"{initial.model_id} {initial.version}" if initial else None},
        "best": None,
    }
    modules = {"network": network} | ({"teacher": teacher} if teacher is not None else {})
    loop = TrainingLoop(
        run_info["phase"], config.iterations, modules=modules, optimizer=optimizer, generator=generator, run_info=run_info,
        checkpoint_dir=checkpoint_dir, checkpoint_every=config.checkpoint_every, resume=resume,
        progress_json=progress_json, stop_after=stop_after, is_main=context.is_main,
    )

    if torch_device.type == "cuda":  # the whole training set fits on a GPU: no loader round trips
        images, labels = images.to(torch_device), labels.to(torch_device)
        pool = pool.to(torch_device) if pool is not None else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch_device.type == "cuda")

    def draw(source: torch.Tensor, targets: torch.Tensor | None, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(len(source), (count,), generator=generator).to(source.device)
        y = targets[index] if targets is not None else torch.zeros((count, *source.shape[-2:]), dtype=torch.uint8, device=source.device)
        x, y = augment_batch(source[index], y.long(), config.augmentation, generator)  # same stream on every rank
        return context.shard(x).to(torch_device), context.shard(y).to(torch_device)

    def step(iteration: int) -> dict[str, float]:
        lr = config.learning_rate * (1 - iteration / config.iterations) ** 0.9
        encoder_frozen = iteration < config.encoder_warmup
        for group in optimizer.param_groups:
            group["lr"] = 0.0 if encoder_frozen and group["encoder"] else lr * group["lr_scale"]
        x, y = draw(images, labels, config.batch_size)
        if pool is not None:
            xu, _ = draw(pool, None, config.unlabeled_batch_size)
            x = torch.cat([x, xu])
        with autocast:
            streams = model(x.contiguous(memory_format=torch.channels_last))
        n = len(y)
        supervised = sum(dice_ce_loss(stream[:n], y) for stream in streams) / len(streams)
        metrics = {"loss_supervised": supervised.item(), "lr": lr}
        loss = supervised
        if pool is not None:
            with torch.no_grad(), autocast:
                teachers = teacher(x[n:]) if teacher is not None else [s[n:] for s in streams]
            cross = cross_pseudo_label_loss((streams[0][n:], streams[1][n:]), tuple(teachers), config.confidence_threshold)
            weight = consistency_ramp(iteration, config)
            loss = supervised + weight * cross
            metrics.update(loss_consistency=cross.item(), consistency_weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if teacher is not None:
            update_moving_average(teacher, network, config.ema_decay)
        return {"loss": loss.item(), **metrics}

    def validate(done: int) -> None:
        if not (val_cases and context.is_main and (done % config.validate_every == 0 or done == config.iterations)):
            return
        network.eval()
        metrics = _validate(network, config, val_cases, torch_device)
        network.train()
        best = loop.run_info["best"]
        if best is None or metrics["mean"]["dice"] > best["dice"]:
            loop.run_info["best"] = {"iteration": done, "dice": metrics["mean"]["dice"], "metrics": metrics}
            if config.keep == "best":
                loop.extra["best"] = {name: t.detach().cpu().clone() for name, t in network.state_dict().items()}
        loop.run_info["last_validation"] = {"iteration": done, "metrics": metrics}
        loop.progress.event("validation", iteration=done, dice=metrics["mean"]["dice"], best_iteration=loop.run_info["best"]["iteration"])

    network.train()
    loop.run(step, validate)
    agree = context.ranks_agree(network)
    if not agree:
        raise IdealError("the training processes ended with different weights; the distributed run is inconsistent")
    if not context.is_main:
        return None  # rank 0 alone reports the result
    best = loop.run_info["best"]
    final = loop.extra.get("best") or network.state_dict()
    return Bundle(
        network=config.network,
        preprocessing=config.preprocessing,
        postprocessing=config.postprocessing,
        weights={name: t.detach().cpu().clone() for name, t in final.items()},
        training={
            "method": config.method,
            "recipe": config.to_json(),
            "labeled_cases": len(labeled),
            "labeled_slices": len(images),
            "unlabeled_cases": len(unlabeled),
            "unlabeled_slices": 0 if pool is None else len(pool),
            "pretrained": {"id": pretrained.model_id, "version": pretrained.version, "training": pretrained.training} if pretrained else None,
            "initial_model": {"id": initial.model_id, "version": initial.version, "training": initial.training} if initial else None,
            "val_cases": len(val_cases or []),
            "selected_iteration": best["iteration"] if best and config.keep == "best" else config.iterations,
            "device": str(torch_device),
            "processes": context.world_size,
            "ranks_agree": agree,
        },
        validation={
            **(best["metrics"] if config.keep == "best" else loop.run_info["last_validation"]["metrics"]),
            "postprocessing": config.postprocessing.to_json(),  # what the figures were measured with
        } if best else {},
    )
