"""The iteration loop every training phase shares: atomic checkpoints, exact resume, progress
(tqdm or JSON lines) and a clean stop on SIGINT/SIGTERM or request."""
from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import IdealError, TrainingStopped
from .checkpoint import CheckpointLock, TrainingState, check_checkpoint_dir, load_checkpoint, save_checkpoint
from .progress import Progress

_RANDOM = "random"


class _StopRequest:
    """Turns SIGINT/SIGTERM into a request to save and stop at the end of the iteration."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict = {}

    def __enter__(self) -> _StopRequest:
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


def setting_differences(saved: object, current: object, name: str) -> list[str]:
    """'name.key: X in the checkpoint, Y now' for every leaf setting that differs (dicts compared key by key)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(saved) | set(current), key=str):
            if saved.get(key) != current.get(key):
                leaf = str(key) if name in ("config",) else f"{name}.{key}"
                found += setting_differences(saved.get(key), current.get(key), leaf)
        return found
    return [f"{name}: {json.dumps(saved)} in the checkpoint, {json.dumps(current)} now"]


class TrainingLoop:
    """Runs ``step(iteration)`` from the first (or resumed) iteration to ``total``.

    ``modules`` and ``extra`` tensors (best weights, queues, ...) are checkpointed with the
    optimizer, the torch random state and the sampling generator; ``run_info["config"]`` and
    ``run_info["data"]`` identify the run, and resuming a different run is refused.
    """

    def __init__(
        self,
        phase: str,
        total: int,
        *,
        modules: dict[str, nn.Module],
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        run_info: dict,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 500,
        resume: bool = False,
        progress_json: bool = False,
        stop_after: Callable[[int], bool] | None = None,
        is_main: bool = True,
    ) -> None:
        self.phase, self.total = phase, total
        self.modules, self.optimizer, self.generator = modules, optimizer, generator
        self.run_info = json.loads(json.dumps(run_info))  # compares equal to the checkpointed copy
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.checkpoint_every, self.progress_json = checkpoint_every, progress_json
        self.stop_after, self.is_main = stop_after, is_main
        self.extra: dict[str, dict[str, torch.Tensor]] = {}
        self.start = 0
        self.lock = None
        if self.checkpoint_dir is not None and is_main:
            check_checkpoint_dir(self.checkpoint_dir, resume)
            self.lock = CheckpointLock(self.checkpoint_dir).acquire()
        if resume:
            self._restore()
        self.progress = Progress(phase, total, self.start, progress_json, enabled=is_main)

    def _restore(self) -> None:
        if self.checkpoint_dir is None:
            raise IdealError("--resume needs --checkpoint-dir")
        state = load_checkpoint(self.checkpoint_dir)
        for key in ("phase", "config", "data"):
            if state.info.get(key) != self.run_info.get(key):
                changed = "; ".join(setting_differences(state.info.get(key), self.run_info.get(key), key)[:3])
                raise IdealError(
                    f"the checkpoint in {self.checkpoint_dir} is from a run with other settings or data "
                    f"({changed}); resume with the same command, or use another --checkpoint-dir"
                )
        for name, module in self.modules.items():
            module.load_state_dict(state.tensors[name])
        self.optimizer.load_state_dict(state.optimizer)
        random = state.tensors[_RANDOM]
        torch.set_rng_state(random["torch"])
        self.generator.set_state(random["sampler"])
        if "cuda" in random and torch.cuda.is_available():
            torch.cuda.set_rng_state(random["cuda"])
        self.extra = {k: v for k, v in state.tensors.items() if k not in self.modules and k != _RANDOM}
        self.run_info, self.start = state.info, state.iteration

    def save(self, iteration: int) -> None:
        """Checkpoint now (rank 0 only; nothing without a checkpoint folder)."""
        if self.checkpoint_dir is None or not self.is_main:
            return
        random = {"torch": torch.get_rng_state(), "sampler": self.generator.get_state()}
        if torch.cuda.is_available():
            random["cuda"] = torch.cuda.get_rng_state()
        tensors = {name: module.state_dict() for name, module in self.modules.items()}
        tensors.update(self.extra)
        tensors[_RANDOM] = random
        save_checkpoint(TrainingState(iteration, tensors, self.optimizer.state_dict(), self.run_info), self.checkpoint_dir)
        self.progress.event("checkpoint", iteration=iteration, path=str(self.checkpoint_dir))

    def run(self, step: Callable[[int], dict[str, float]], after_step: Callable[[int], None] | None = None) -> None:
        """Iterate; ``step`` gets the 0-based iteration and returns metrics to report."""
        try:
            self._run(step, after_step)
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self, step: Callable[[int], dict[str, float]], after_step: Callable[[int], None] | None) -> None:
        with _StopRequest() as stop:
            for iteration in range(self.start, self.total):
                metrics = step(iteration)
                done = iteration + 1
                self.progress.update(done, **metrics)
                if after_step is not None:
                    after_step(done)
                saved = done % self.checkpoint_every == 0 or done == self.total
                if saved:
                    self.save(done)
                if done < self.total and (stop.requested or (self.stop_after is not None and self.stop_after(done))):
                    if not saved:
                        self.save(done)
                    self.progress.close()
                    raise TrainingStopped(done, self.checkpoint_dir)
        self.progress.close()
