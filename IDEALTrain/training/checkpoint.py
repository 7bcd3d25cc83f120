"""Training checkpoints (module weights, optimizer, random states) as one safetensors file, no pickle.

Tensors go into the safetensors body, grouped by name (``network::encoder.levels.0...``); everything
else (iteration, optimizer hyper-parameters, run configuration) goes into its JSON metadata. Files
are written atomically, so a run killed while saving leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import IdealError
from ..io.atomic import atomic_path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

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


def check_checkpoint_dir(directory: str | Path, resume: bool) -> Path:
    """Refuse, before training starts, a checkpoint folder that cannot be written, or that already
    holds a run when this is not ``resume`` (starting over would replace that run's checkpoint)."""
    from ..io.atomic import check_writable_folder

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise IdealError(f"--checkpoint-dir {directory}: is a file, not a folder")
    check_writable_folder(directory)
    if not resume and (directory / CHECKPOINT_NAME).exists():
        raise IdealError(
            f"--checkpoint-dir {directory} already holds a training run ({CHECKPOINT_NAME}); pass --resume to continue it, "
            "or choose another --checkpoint-dir"
        )
    return directory


class CheckpointLock:
    """Ownership of a checkpoint folder by one run at a time: an OS lock on ``run.lock`` holding the owner's
    pid. The system releases it when the process dies, so a killed run never leaves a stale lock (its
    file stays, unlocked, and the next run takes it over); a run that ends removes the file."""

    NAME = "run.lock"

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / self.NAME
        self.handle = None

    def acquire(self) -> CheckpointLock:
        """Take the lock, or raise IdealError naming the run (pid) that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+")  # noqa: SIM115  held for the run's lifetime
            try:
                _lock(handle)
            except OSError:
                handle.seek(0)
                owner = handle.read().strip() or "unknown"
                handle.close()
                raise IdealError(
                    f"--checkpoint-dir {self.path.parent} is in use by another training run (pid {owner}); "
                    "wait for it to finish or choose another --checkpoint-dir"
                ) from None
            if _same_file(self.path, handle):
                break
            handle.close()  # the owner removed the file as we opened it: lock the new one
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        """Give the folder up and remove the lock file."""
        if self.handle is not None:
            self.path.unlink(missing_ok=True)
            _unlock(self.handle)
            self.handle.close()
            self.handle = None


def _same_file(path: Path, handle) -> bool:
    """True when ``path`` still names the file ``handle`` has open."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(handle.fileno()))
    except FileNotFoundError:
        return False


def _lock(handle) -> None:
    if fcntl is not None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:  # Windows
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)


def _unlock(handle) -> None:
    if fcntl is not None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    else:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
