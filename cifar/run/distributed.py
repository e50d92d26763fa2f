"""torchrun support: one process per device, DistributedDataParallel, rank 0 tracks.

``torchrun --nproc_per_node=N train.py ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; ``process_group``
joins the group (NCCL on GPUs, gloo on CPU) and picks this rank's device. The engine shards each
global batch across ranks and all-reduces the training metrics; only rank 0 creates the MLflow
run, logs, prints and writes files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cifar.errors import CifarError


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[ProcessGroup]:
    """Join torchrun's group for the duration (no-op for a single process)."""
    if not launched_by_torchrun():
        yield ProcessGroup(device=device)
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise CifarError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s): lower --nproc_per_node."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    try:
        yield ProcessGroup(dist.get_rank(), dist.get_world_size(), device)
    finally:
        if owns_group:
            dist.destroy_process_group()
