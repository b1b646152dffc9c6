"""Where computation runs: device selection and the distributed (torchrun) context."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, TypeVar

import torch

from pipeline.atomic import ResumableDir

DeviceName = Literal["auto", "cpu", "cuda"]
T = TypeVar("T")


def resolve_device(name: DeviceName) -> torch.device:
    """``auto`` is CUDA when a GPU is visible, else CPU; ``cuda`` without a GPU is an error, not a fallback."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but no CUDA device is visible (set device: auto or cpu)")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run directly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_from_env() -> Dist:
    """Read torchrun's environment; no process group is created here (see ``init_distributed``)."""
    return Dist(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init_distributed(device: torch.device, backend: str | None = None, timeout: timedelta | None = None) -> Dist:
    """Join the torchrun process group if launched under torchrun (NCCL on CUDA, gloo on CPU, unless ``backend``
    says otherwise); ``timeout``: how long a collective may wait for the slowest rank (torch's default if None)."""
    dist = dist_from_env()
    if dist.enabled and not torch.distributed.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend, timeout=timeout)
    return dist


# A data stage's ranks meet only at its start and end: the end waits for the slowest rank's whole share (a rank
# whose shards survived a kill waits for the others to redo theirs), which can take hours on ImageNet.
DATA_STAGE_TIMEOUT = timedelta(hours=48)


def init_data_parallel(device: torch.device) -> Dist:
    """The process group of a data stage (decompose, extract_tokens, sampling): gloo whatever the device, since
    its collectives are barriers and small objects, and a long timeout (``DATA_STAGE_TIMEOUT``)."""
    return init_distributed(device, backend="gloo", timeout=DATA_STAGE_TIMEOUT)


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch.distributed.barrier()


def share(items: Sequence[T], dist: Dist) -> list[T]:
    """This rank's items: every world_size-th from its rank on, so the ranks' shares partition ``items``."""
    return list(items[dist.rank :: dist.world_size])


def open_resumable(dst, fingerprint: str, dist: Dist) -> ResumableDir:
    """The resumable work directory of a data stage, opened by rank 0 (which clears a stale one) before the other
    ranks join it."""
    work = ResumableDir(dst, fingerprint) if dist.is_main else None
    barrier(dist)
    return work or ResumableDir.join(dst, fingerprint)


def todo_share(names: Sequence[T], done, dist: Dist) -> list[T]:
    """This rank's share of the ``names`` not ``done`` yet (a rerun after a kill redoes only those, spread over
    every rank). All ranks list them before any rank writes again (a barrier), so their lists agree."""
    todo = [name for name in names if not done(name)]
    barrier(dist)
    return share(todo, dist)
