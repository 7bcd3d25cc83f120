"""Training checkpoints (module weights, optimizer, random states) as one safetensors file, no pickle.

Tensors go into the safetensors body, grouped by name (``network::encoder.levels.0...``); everything
else (iteration, optimizer hyper-parameters, run configuration) goes into its JSON metadata. Files
are written atomically, so a run killed while saving leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import IdealError
from ..io.atomic import atomic_path
from ..io.output_guard import PathLock, os_error_message, report_leftovers

CHECKPOINT_NAME = "last.safetensors"
_OPTIMIZER = "optimizer"


@dataclass
class TrainingState:
    """Everything needed to continue a run exactly where it stopped."""

    iteration: int
    tensors: dict[str, dict[str, torch.Tensor]]  # group (a module, random states, ...) -> name -> tensor
    optimizer: dict
    info: dict  # JSON-serialisable: run configuration, best validation so far, ...


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(state: TrainingState, directory: str | Path) -> Path:
    """Atomically write ``directory/last.safetensors``."""
    optimizer_tensors, optimizer_meta = _flatten_optimizer(state.optimizer)
    groups = {**state.tensors, _OPTIMIZER: optimizer_tensors}
    tensors = {f"{group}::{name}": t.detach().cpu().contiguous() for group, named in groups.items() for name, t in named.items()}
    metadata = {"iteration": str(state.iteration), "optimizer": json.dumps(optimizer_meta), "info": json.dumps(state.info)}
    path = Path(directory) / CHECKPOINT_NAME
    with atomic_path(path) as temp:
        try:
            save_file(tensors, str(temp), metadata=metadata)
        except SafetensorError as error:  # safetensors reports a full disk as its own error, not an OSError
            reason = str(error).split("I/O error: ")[-1]  # e.g. "No space left on device (os error 28)"
            raise IdealError(f"{os_error_message(path, OSError(reason))}; the previous checkpoint is kept") from None
    return path


def load_checkpoint(directory: str | Path) -> TrainingState:
    """Read the checkpoint written by :func:`save_checkpoint`; clear errors when absent or corrupt."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.is_file():
        raise IdealError(f"no checkpoint to resume from in {directory} (expected {CHECKPOINT_NAME})")
    try:
        with safe_open(str(path), "pt") as handle:
            flat = {name: handle.get_tensor(name) for name in handle.keys()}
            metadata = handle.metadata() or {}
        optimizer_meta = json.loads(metadata["optimizer"])
        info = json.loads(metadata["info"])
        iteration = int(metadata["iteration"])
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise IdealError(f"checkpoint {path} is corrupt or incomplete ({error}); delete it to start over") from None
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        group, name = key.split("::", 1)
        groups.setdefault(group, {})[name] = tensor
    optimizer = _unflatten_optimizer(groups.pop(_OPTIMIZER, {}), optimizer_meta)
    return TrainingState(iteration, groups, optimizer, info)


def check_checkpoint_dir(directory: str | Path, resume: bool) -> Path:
    """Refuse, before training starts, a checkpoint folder that cannot be written, or that already
    holds a run when this is not ``resume`` (starting over would replace that run's checkpoint)."""
    from ..io.atomic import check_writable_folder

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise IdealError(f"--checkpoint-dir {directory}: is a file, not a folder")
    check_writable_folder(directory)
    if directory.is_dir():
        report_leftovers(directory)
    if not resume and (directory / CHECKPOINT_NAME).exists():
        raise IdealError(
            f"--checkpoint-dir {directory} already holds a training run ({CHECKPOINT_NAME}); pass --resume to continue it, "
            "or choose another --checkpoint-dir"
        )
    return directory


class CheckpointLock(PathLock):
    """Ownership of a checkpoint folder by one run at a time: an OS lock on ``run.lock`` holding the owner's
    pid (:class:`~IDEALTrain.io.output_guard.PathLock`, the lock output paths use too). The system releases it
    when the process dies, so a killed run never leaves a stale lock; a run that ends removes the file."""

    NAME = "run.lock"

    def __init__(self, directory: str | Path) -> None:
        super().__init__(
            Path(directory) / self.NAME,
            f"--checkpoint-dir {directory} is in use by another training run (pid {{pid}}); "
            "wait for it to finish or choose another --checkpoint-dir",
        )
