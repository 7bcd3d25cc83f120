"""Multi-process training with ``torchrun``: one process per GPU (NCCL) or per CPU worker (gloo).

Every rank draws the same random stream and takes its own share of each global batch, so a
checkpoint written by rank 0 restores every rank; gradients are averaged by DDP.
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import IdealError


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global batch (the global batch must divide evenly)."""
        if not self.enabled:
            return batch
        if len(batch) % self.world_size:
            raise IdealError(f"batch size {len(batch)} does not divide among {self.world_size} processes")
        return batch[self.rank :: self.world_size]

    def wrap(self, network: nn.Module) -> nn.Module:
        """The module to call for training: DDP-wrapped when several processes train together."""
        if not self.enabled:
            return network
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(network, device_ids=device_ids)

    def ranks_agree(self, network: nn.Module) -> bool:
        """True when every rank holds bit-identical weights (checked at the end of a run).

        Batch-norm statistics are first taken from rank 0, as DDP does before every forward pass:
        each rank's last update saw only its own share of the batch.
        """
        if not self.enabled:
            return True
        for buffer in network.buffers():
            dist.broadcast(buffer, src=0)
        digest = hashlib.sha256()
        for tensor in network.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        mine = torch.tensor(list(digest.digest()), dtype=torch.uint8, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        return all(torch.equal(g, gathered[0]) for g in gathered)


def finish_distributed() -> None:
    """Leave the process group together, after rank 0 has written its results (called once by
    the command line at the very end).

    Worker ranks then exit at once: with gloo under load, interpreter teardown after the group is
    destroyed sometimes aborts in torch's C++ threads ("terminate called without an active
    exception"), which would fail a run whose results are already written and verified.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    worker = dist.get_rank() != 0
    dist.barrier()
    dist.destroy_process_group()
    if worker:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def setup_distributed(device: torch.device) -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, device)
