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

from ..io.atomic import atomic_path
from ..errors import IdealError

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
        save_file(tensors, str(temp), metadata=metadata)
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
