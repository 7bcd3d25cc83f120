"""Training the segmentation network: supervised, or IDEAL's two-stream consistency finetuning.

Both run through one code path. Labelled slices get Dice + cross-entropy on both decoders; with
unlabelled slices (and not ``supervised_only``) each decoder's hard pseudo-label supervises the
other decoder (cross pseudo-supervision), weighted by a sigmoid ramp-up. The recipe follows the
SSL4MIS baselines (SGD, momentum 0.9, poly learning-rate decay) so results compare with the
literature; runs are seeded, checkpoint atomically and resume exactly.

``train_segmentation`` runs the named steps in order: :func:`check_run`, :func:`build_network`,
:func:`build_optimizer`, a :class:`TrainingLoop` driving :class:`FinetuneStep` and
:class:`Validation`, and :func:`result_bundle`.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import IdealError
from ..evaluation.metrics import mean_scores, score
from ..inference.predictor import Predictor, resolve_device
from ..io.datasets import Case
from ..model.bundle import Bundle
from ..model.networks import NetworkConfig, SegmentationNetwork, StreamPerturbation, update_moving_average
from ..model.postprocessing import Postprocessing
from ..model.preprocessing import Preprocessing
from .augment import Augmentation, augment_batch
from .distributed import Distributed, setup_distributed
from .encoder_start import check_initial_model, load_pretrained_encoder
from .loop import TrainingLoop
from .losses import cross_pseudo_label_loss
from .partial_labels import partial_dice_ce_loss
from .precision import autocast, resolve_precision
from .retention import Retention, random_crop
from .slices import prepare_slices


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
    pretrained_rescale: bool = False  # each pretrained conv filter rescaled to the norm of the run's own random filter
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
    stream_perturbation: str = "none"  # "dropout" or "noise" of the encoder features, drawn anew before each decoder
    perturbation_strength: float = 0.5  # dropout probability, or the half-width of the multiplicative noise
    precision: str = "auto"  # "bf16" autocast + channels-last, "fp32", or "auto": bf16 where the device runs it natively
    distill_weight: float = 0.0  # > 0: the starting model is distilled where labels leave the class open (partial_labels)
    frozen_levels: int = 0  # the finest N encoder levels do not learn (retention)
    frozen_norm: bool = False  # batch-norm statistics stay the starting model's
    keep_old: float = 0.0  # final weights = keep_old * starting model + (1 - keep_old) * trained (retention)
    crop_size: int = 0  # > 0: train on random crops of this size (faster; 0 = whole slices)
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


def check_run(
    config: TrainConfig, unlabeled: list[Case] | None, pretrained: Bundle | None, initial: Bundle | None
) -> list[Case]:
    """Refuse contradictory settings before any work; return the unlabelled cases the run uses, labels removed."""
    if config.keep not in ("best", "last"):
        raise IdealError(f"keep must be 'best' or 'last', got {config.keep!r}")
    if not 0 <= config.encoder_warmup < config.iterations:
        raise IdealError(
            f"encoder warm-up must be 0 or more iterations and shorter than the run ({config.iterations}), "
            f"got {config.encoder_warmup}"
        )
    if pretrained is not None and initial is not None:
        raise IdealError("choose either a pretrained encoder or an initial model to start from, not both")
    if not 0 < config.pretrained_mix <= 1:
        raise IdealError(
            f"the pretrained mix must be above 0 and at most 1 (1: the pretrained encoder as it is), got {config.pretrained_mix}"
        )
    if config.pretrained_mix != 1 and pretrained is None:
        raise IdealError("a pretrained mix below 1 needs a pretrained encoder (--pretrained) to mix with")
    if config.pretrained_rescale and pretrained is None:
        raise IdealError("rescaling the pretrained filters needs a pretrained encoder (--pretrained)")
    if config.pretrained_rescale and config.pretrained_mix != 1:
        raise IdealError("rescaling the pretrained filters and mixing them with random weights exclude each other")
    if initial is not None:
        check_initial_model(initial, config.network)
    StreamPerturbation(config.stream_perturbation, config.perturbation_strength)  # refuses a bad kind or strength
    unlabeled = [] if config.supervised_only else list(unlabeled or [])
    if not config.supervised_only:
        if not unlabeled:
            raise IdealError("finetuning needs unlabelled data: pass --unlabeled SPEC, or use --supervised-only")
        if len(config.network.decoders) != 2:
            raise IdealError(f"two-stream finetuning needs exactly two decoders, got {config.network.decoders}")
    return [Case(case.name, case.image, None) if case.label is not None else case for case in unlabeled]  # no label leaks


def build_network(
    config: TrainConfig, pretrained: Bundle | None, initial: Bundle | None, device: torch.device
) -> tuple[SegmentationNetwork, dict[str, list[float]] | None]:
    """The network at its start (random, pretrained encoder, or a whole earlier model) on ``device``, channels-last,
    and with a pretrained encoder each level's weight norm (initial, pretrained, start) for the bundle card."""
    network = SegmentationNetwork(config.network)
    network.perturbation = StreamPerturbation(config.stream_perturbation, config.perturbation_strength)
    norms = None
    if pretrained is not None:
        norms = load_pretrained_encoder(network, pretrained, config.pretrained_mix, config.pretrained_rescale)
    if initial is not None:
        network.load_state_dict({name: tensor.float() for name, tensor in initial.weights.items()})
    return network.to(device, memory_format=torch.channels_last), norms


def build_optimizer(network: SegmentationNetwork, config: TrainConfig) -> torch.optim.SGD:
    """SGD with the encoder and the decoders in separate groups, so the encoder can learn slower or wait."""
    groups = [
        {"params": list(network.encoder.parameters()), "lr_scale": config.encoder_lr_scale, "encoder": True},
        {
            "params": [p for name, p in network.named_parameters() if not name.startswith("encoder.")],
            "lr_scale": 1.0,
            "encoder": False,
        },
    ]
    return torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, config: TrainConfig, iteration: int) -> float:
    """Poly decay (power 0.9) of the learning rate; the encoder's group is held at 0 during its warm-up."""
    lr = config.learning_rate * (1 - iteration / config.iterations) ** 0.9
    encoder_frozen = iteration < config.encoder_warmup
    for group in optimizer.param_groups:
        group["lr"] = 0.0 if encoder_frozen and group["encoder"] else lr * group["lr_scale"]
    return lr


@dataclass
class TrainingSlices:
    """The run's slices on the network grid: labelled images and labels, and the unlabelled pool."""

    images: torch.Tensor
    labels: torch.Tensor
    pool: torch.Tensor | None

    def to(self, device: torch.device) -> TrainingSlices:
        """On a GPU the whole training set fits: no loader round trips."""
        if device.type != "cuda":
            return self
        pool = self.pool.to(device) if self.pool is not None else None
        return TrainingSlices(self.images.to(device), self.labels.to(device), pool)


class FinetuneStep:
    """One training iteration: draw and augment a batch, supervised loss, cross pseudo-labels, SGD step."""

    def __init__(
        self, config: TrainConfig, network: SegmentationNetwork, model: nn.Module, teacher: nn.Module | None,
        optimizer: torch.optim.Optimizer, data: TrainingSlices, generator: torch.Generator, context: Distributed,
        precision: str, retention: Retention,
    ) -> None:
        self.config, self.network, self.model, self.teacher, self.retention = config, network, model, teacher, retention
        self.optimizer, self.data, self.generator, self.context = optimizer, data, generator, context
        self.autocast = autocast(precision, context.device)

    def draw(self, source: torch.Tensor, targets: torch.Tensor | None, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` random slices (and labels, or zeros), augmented; this rank's share of them on its device."""
        index = torch.randint(len(source), (count,), generator=self.generator).to(source.device)
        if targets is not None:
            y = targets[index]
        else:
            y = torch.zeros((count, *source.shape[-2:]), dtype=torch.uint8, device=source.device)
        x, y = augment_batch(source[index], y.long(), self.config.augmentation, self.generator)  # same on every rank
        x, y = random_crop(x, y, self.config.crop_size, self.generator)
        device = self.context.device
        return self.context.shard(x).to(device), self.context.shard(y).to(device)

    def __call__(self, iteration: int) -> dict[str, float]:
        config = self.config
        lr = set_learning_rate(self.optimizer, config, iteration)
        self.retention.before_step()
        x, y = self.draw(self.data.images, self.data.labels, config.batch_size)
        if self.data.pool is not None:
            xu, _ = self.draw(self.data.pool, None, config.unlabeled_batch_size)
            x = torch.cat([x, xu])
        with self.autocast:
            streams = self.model(x.contiguous(memory_format=torch.channels_last))
        n = len(y)
        supervised = sum(partial_dice_ce_loss(stream[:n], y) for stream in streams) / len(streams)  # labels where reviewed
        metrics = {"loss_supervised": supervised.item(), "lr": lr}
        loss = supervised
        distill = self.retention.distillation(x, y, streams, self.autocast)
        if distill is not None:
            loss = loss + config.distill_weight * distill
            metrics["loss_distillation"] = distill.item()
        if self.data.pool is not None:
            cross = self.consistency(x[n:], streams, n)
            weight = consistency_ramp(iteration, config)
            loss = loss + weight * cross
            metrics.update(loss_consistency=cross.item(), consistency_weight=weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.teacher is not None:
            update_moving_average(self.teacher, self.network, config.ema_decay)
        return {"loss": loss.item(), **metrics}

    def consistency(self, unlabelled: torch.Tensor, streams: list[torch.Tensor], n: int) -> torch.Tensor:
        """Cross pseudo-supervision on the unlabelled part (from the first ``n``) of the batch."""
        with torch.no_grad(), self.autocast:
            teachers = self.teacher(unlabelled) if self.teacher is not None else [s[n:] for s in streams]
        return cross_pseudo_label_loss((streams[0][n:], streams[1][n:]), tuple(teachers), self.config.confidence_threshold)


def validation_scores(network: SegmentationNetwork, config: TrainConfig, cases: list[Case], device: torch.device) -> dict:
    """Mean scores of the network's current weights on whole validation volumes, as a bundle would predict them."""
    bundle = Bundle(config.network, config.preprocessing, network.state_dict(), postprocessing=config.postprocessing)
    predictor = Predictor(bundle, device=str(device))
    return mean_scores([score(predictor.predict(case.image).labels, case.label) for case in cases])


class Validation:
    """After each ``validate_every`` iterations (and the last): score, report, and keep the best weights."""

    def __init__(
        self, network: SegmentationNetwork, config: TrainConfig, cases: list[Case] | None, loop: TrainingLoop,
        context: Distributed,
    ) -> None:
        self.network, self.config, self.cases, self.loop, self.context = network, config, cases, loop, context

    def __call__(self, done: int) -> None:
        config, loop = self.config, self.loop
        if not (self.cases and self.context.is_main and (done % config.validate_every == 0 or done == config.iterations)):
            return
        self.network.eval()
        metrics = validation_scores(self.network, config, self.cases, self.context.device)
        self.network.train()
        best = loop.run_info["best"]
        if best is None or metrics["mean"]["dice"] > best["dice"]:
            loop.run_info["best"] = {"iteration": done, "dice": metrics["mean"]["dice"], "metrics": metrics}
            if config.keep == "best":
                loop.extra["best"] = {name: t.detach().cpu().clone() for name, t in self.network.state_dict().items()}
        loop.run_info["last_validation"] = {"iteration": done, "metrics": metrics}
        loop.progress.event(
            "validation", iteration=done, dice=metrics["mean"]["dice"], best_iteration=loop.run_info["best"]["iteration"]
        )


def run_info(config: TrainConfig, labeled: list[Case], unlabeled: list[Case], pretrained: Bundle | None,
             initial: Bundle | None) -> dict:
    """What identifies the run in its checkpoints (resuming another run is refused) and its progress."""
    return {
        "phase": "finetune" if not config.supervised_only else "train",
        "config": config.to_json(),
        "data": {
            "labeled": [c.name for c in labeled],
            "unlabeled": [c.name for c in unlabeled],
            "pretrained": pretrained.model_id if pretrained else None,
            "initial_model": f"{initial.model_id} {initial.version}" if initial else None,
        },
        "best": None,
    }


def result_bundle(
    config: TrainConfig, network: SegmentationNetwork, loop: TrainingLoop, data: TrainingSlices, *,
    labeled: list[Case], unlabeled: list[Case], pretrained: Bundle | None, initial: Bundle | None,
    val_cases: list[Case] | None, context: Distributed, agree: bool, precision: str,
    encoder_norms: dict[str, list[float]] | None = None,
) -> Bundle:
    """The trained bundle: the selected (or last) weights, the recipe and data provenance, and validation figures."""
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
            "labeled_slices": len(data.images),
            "unlabeled_cases": len(unlabeled),
            "unlabeled_slices": 0 if data.pool is None else len(data.pool),
            "pretrained": {"id": pretrained.model_id, "version": pretrained.version, "training": pretrained.training} if pretrained else None,
            "encoder_level_norms": encoder_norms,  # initial (random), pretrained and start, per encoder level
            "initial_model": {"id": initial.model_id, "version": initial.version, "training": initial.training} if initial else None,
            "val_cases": len(val_cases or []),
            "selected_iteration": best["iteration"] if best and config.keep == "best" else config.iterations,
            "device": str(context.device),
            "precision": precision,
            "processes": context.world_size,
            "ranks_agree": agree,
        },
        validation={
            **(best["metrics"] if config.keep == "best" else loop.run_info["last_validation"]["metrics"]),
            "postprocessing": config.postprocessing.to_json(),  # what the figures were measured with
        } if best else {},
    )


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
    unlabeled = check_run(config, unlabeled, pretrained, initial)
    context = setup_distributed(resolve_device(device))
    precision = resolve_precision(config.precision, context.device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    data = TrainingSlices(*prepare_slices(labeled, unlabeled, config.preprocessing, config.network))
    network, norms = build_network(config, pretrained, initial, context.device)
    retention = Retention(network, frozen_levels=config.frozen_levels, frozen_norm=config.frozen_norm,
                          distill_weight=config.distill_weight, keep_old=config.keep_old, has_start=initial is not None)
    teacher = copy.deepcopy(network).requires_grad_(False) if config.ema_teacher and not config.supervised_only else None
    model = context.wrap(network)
    optimizer = build_optimizer(network, config)
    modules = {"network": network} | ({"teacher": teacher} if teacher is not None else {})
    info = run_info(config, labeled, unlabeled, pretrained, initial)
    loop = TrainingLoop(
        info["phase"], config.iterations, modules=modules, optimizer=optimizer, generator=generator, run_info=info,
        checkpoint_dir=checkpoint_dir, checkpoint_every=config.checkpoint_every, resume=resume,
        progress_json=progress_json, stop_after=stop_after, is_main=context.is_main,
    )
    if norms is not None:
        loop.progress.event("encoder_norms", **norms)
    step = FinetuneStep(config, network, model, teacher, optimizer, data.to(context.device), generator, context, precision, retention)
    network.train()
    loop.run(step, Validation(network, config, val_cases, loop, context))
    retention.blend_with_start(network)
    agree = context.ranks_agree(network)
    if not agree:
        raise IdealError("the training processes ended with different weights; the distributed run is inconsistent")
    if not context.is_main:
        return None  # rank 0 alone reports the result
    return result_bundle(
        config, network, loop, data, labeled=labeled, unlabeled=unlabeled, pretrained=pretrained, initial=initial,
        val_cases=val_cases, context=context, agree=agree, precision=precision, encoder_norms=norms,
    )
