"""Supervised training of the segmentation network on 2D slices, validated on whole volumes.

The recipe follows the SSL4MIS baselines (SGD, momentum 0.9, poly learning-rate decay, Dice + CE)
so results compare with the literature. A run is seeded, checkpoints atomically, and resumes
exactly: the resumed run ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import json
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .augment import Augmentation, augment_batch
from .bundle import Bundle
from .checkpoint import TrainingState, load_checkpoint, save_checkpoint
from .datasets import Case
from .errors import IdealError, TrainingStopped
from .losses import dice_ce_loss
from .metrics import mean_scores, score
from .networks import NetworkConfig, SegmentationNetwork
from .predictor import Predictor, resolve_device
from .preprocessing import Preprocessing, SliceGrid, check_volume
from .progress import Progress


@dataclass
class TrainConfig:
    """Hyper-parameters of a supervised run (recorded in the bundle card)."""

    iterations: int = 1000
    batch_size: int = 12
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    seed: int = 0
    checkpoint_every: int = 500
    validate_every: int = 200
    network: NetworkConfig = field(default_factory=NetworkConfig)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    augmentation: Augmentation = field(default_factory=Augmentation)

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(network=self.network.to_json(), preprocessing=self.preprocessing.to_json(), augmentation=self.augmentation.to_json())
        return data


def slices_for_training(cases: list[Case], config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """All labelled slices of ``cases`` prepared on the network grid: images (N,1,H,W), labels (N,H,W)."""
    images, labels = [], []
    for case in cases:
        if case.label is None:
            raise IdealError(f"case {case.name} has no label; supervised training needs labelled data")
        check_volume(case.image)
        grid = SliceGrid(case.image, config.preprocessing, config.network.size_multiple)
        images.append(grid.image_to_network(case.image))
        labels.append(grid.labels_to_network(case.label))
    if not images:
        raise IdealError("no labelled cases to train on")
    # Spacing-based plans give each volume its own slice size: pad all to the largest, centred.
    height = max(x.shape[-2] for x in images)
    width = max(x.shape[-1] for x in images)
    x = torch.cat([_pad_to(t, height, width) for t in images])
    y = torch.cat([_pad_to(t, height, width) for t in labels])
    if int(y.max()) >= config.network.num_classes or int(y.min()) < 0:
        raise IdealError(f"labels contain values outside 0-{config.network.num_classes - 1}: {torch.unique(y).tolist()}")
    return x, y


def _pad_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    top, left = (height - x.shape[-2]) // 2, (width - x.shape[-1]) // 2
    return F.pad(x, (left, width - x.shape[-1] - left, top, height - x.shape[-2] - top))


def _validate(network: SegmentationNetwork, config: TrainConfig, cases: list[Case], device: str) -> dict:
    bundle = Bundle(config.network, config.preprocessing, network.state_dict())
    predictor = Predictor(bundle, device=device)
    results = [score(predictor.predict(case.image).labels, case.label) for case in cases]
    return mean_scores(results)


class _StopRequest:
    """Turns SIGINT/SIGTERM into a request to save and stop at the end of the iteration."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "_StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_supervised(
    train_cases: list[Case],
    config: TrainConfig,
    *,
    val_cases: list[Case] | None = None,
    device: str = "auto",
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress_json: bool = False,
    stop_after: Callable[[int], bool] | None = None,
) -> Bundle:
    """Train and return a bundle (best validation weights when validation cases are given).

    ``stop_after(iteration)`` returning True saves a checkpoint and stops early, like a signal.
    """
    torch_device = resolve_device(device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    images, labels = slices_for_training(train_cases, config)
    network = SegmentationNetwork(config.network).to(torch_device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(network.parameters(), lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay)
    # Normalised through JSON so it compares equal to the copy stored in a checkpoint.
    run_info = json.loads(json.dumps({"config": config.to_json(), "train_cases": [c.name for c in train_cases], "best": None}))
    start = 0
    best_weights = None
    if resume:
        if checkpoint_dir is None:
            raise IdealError("--resume needs --checkpoint-dir")
        state = load_checkpoint(checkpoint_dir)
        if state.info.get("config") != run_info["config"] or state.info.get("train_cases") != run_info["train_cases"]:
            raise IdealError(f"the checkpoint in {checkpoint_dir} is from a run with other settings or data; resume with the same command")
        best_weights = _best_from_checkpoint(state)
        network.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        torch.set_rng_state(state.random_states["torch"])
        generator.set_state(state.random_states["sampler"])
        run_info = state.info
        start = state.iteration

    def save(iteration: int) -> None:
        if checkpoint_dir is None:
            return
        random_states = {"torch": torch.get_rng_state(), "sampler": generator.get_state()}
        model = dict(network.state_dict())
        if best_weights is not None:
            model.update({f"best::{name}": t for name, t in best_weights.items()})
        save_checkpoint(TrainingState(iteration, model, optimizer.state_dict(), random_states, run_info), checkpoint_dir)
        progress.event("checkpoint", iteration=iteration, path=str(checkpoint_dir))

    progress = Progress("train", config.iterations, start, progress_json)
    network.train()
    iteration = start
    with _StopRequest() as stop:
        while iteration < config.iterations:
            lr = config.learning_rate * (1 - iteration / config.iterations) ** 0.9
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = torch.randint(len(images), (config.batch_size,), generator=generator)
            x, y = augment_batch(images[index].to(torch_device), labels[index].to(torch_device), config.augmentation, generator)
            logits = network(x.contiguous(memory_format=torch.channels_last))
            loss = sum(dice_ce_loss(stream, y) for stream in logits) / len(logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            iteration += 1
            progress.update(iteration, loss=loss.item(), lr=lr)

            if val_cases and (iteration % config.validate_every == 0 or iteration == config.iterations):
                network.eval()
                metrics = _validate(network, config, val_cases, str(torch_device))
                network.train()
                best = run_info["best"]
                if best is None or metrics["mean"]["dice"] > best["dice"]:
                    run_info["best"] = {"iteration": iteration, "dice": metrics["mean"]["dice"], "metrics": metrics}
                    best_weights = {name: t.detach().cpu().clone() for name, t in network.state_dict().items()}
                progress.event("validation", iteration=iteration, dice=metrics["mean"]["dice"], best_iteration=run_info["best"]["iteration"])
            if iteration % config.checkpoint_every == 0 or iteration == config.iterations:
                save(iteration)
            if stop.requested or (stop_after is not None and stop_after(iteration)):
                if iteration % config.checkpoint_every and iteration != config.iterations:
                    save(iteration)
                progress.close()
                raise TrainingStopped(iteration, checkpoint_dir)
    progress.close()
    final = best_weights if best_weights is not None else network.state_dict()
    best = run_info["best"]
    return Bundle(
        network=config.network,
        preprocessing=config.preprocessing,
        weights={name: t.detach().cpu().clone() for name, t in final.items()},
        training={
            "method": "supervised",
            "recipe": config.to_json(),
            "train_cases": len(train_cases),
            "train_slices": len(images),
            "val_cases": len(val_cases or []),
            "selected_iteration": best["iteration"] if best else config.iterations,
            "device": str(torch_device),
        },
        validation=best["metrics"] if best else {},
    )


def _best_from_checkpoint(state: TrainingState) -> dict[str, torch.Tensor] | None:
    best = {name.split("::", 1)[1]: t for name, t in state.model.items() if name.startswith("best::")}
    for name in list(state.model):
        if name.startswith("best::"):
            del state.model[name]
    return best or None
