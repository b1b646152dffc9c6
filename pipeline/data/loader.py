"""Reading shards for training: a WebDataset pipeline with reproducible epochs, split across DDP ranks and workers.

Every random choice is seeded by (seed, epoch, rank, worker), so an epoch's order is reproducible and does not
depend on how many epochs were read before (a resumed run reads what an uninterrupted one would). Two modes:

* exact (default): the shard list is shuffled per epoch, split by rank then by loader worker, and every sample
  is read exactly once per epoch across all ranks and workers. Ranks may get different batch counts.
* resampled: each rank and worker draws shards with replacement and yields a fixed number of batches per
  epoch, so DDP ranks always agree on the number of steps (the multi-GPU training mode).
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from pipeline.data import shards


def _rank() -> tuple[int, int]:
    """(rank, world_size) of this DDP process; asked in the main process (a forkserver worker has no group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _worker() -> tuple[int, int]:
    """(worker, num_workers) of the loader worker running now; (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _ShardStream(IterableDataset):
    """The first stage of the pipeline: which shards this rank and worker read in one epoch."""

    def __init__(self, urls: list[str], seed: int, epoch: int, shuffle: bool, resampled: bool):
        super().__init__()
        self.urls, self.seed, self.epoch, self.shuffle, self.resampled = urls, seed, epoch, shuffle, resampled
        self.rank, self.world = _rank()

    def __iter__(self) -> Iterator[dict[str, str]]:
        (rank, world), (worker, workers) = (self.rank, self.world), _worker()
        if self.resampled:
            rng = random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker}")
            while True:
                yield {"url": rng.choice(self.urls)}
        urls = list(self.urls)
        if self.shuffle:  # the same permutation on every rank, so the rank/worker split stays a partition
            random.Random(f"{self.seed}/{self.epoch}").shuffle(urls)
        for url in urls[rank::world][worker::workers]:
            yield {"url": url}


# Pipeline stages are classes, not closures: loader workers are started by forkserver (or spawn), which pickles
# the pipeline, and closures do not pickle.


class _BufferShuffle:
    def __init__(self, bufsize: int, seed: int, epoch: int):
        self.bufsize, self.seed, self.epoch = bufsize, seed, epoch
        self.rank, _ = _rank()

    def __call__(self, src: Iterator) -> Iterator:
        worker, _ = _worker()  # seeded lazily: the worker is only known inside the worker process
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/samples")
        yield from wds.shuffle(bufsize=self.bufsize, initial=self.bufsize, rng=rng)(src)


class _TakeBatches:
    def __init__(self, batches_per_rank: int):
        self.batches_per_rank = batches_per_rank

    def __call__(self, src: Iterator) -> Iterator:
        worker, workers = _worker()
        share = self.batches_per_rank // workers + (1 if worker < self.batches_per_rank % workers else 0)
        yield from itertools.islice(src, share)


def _read_shards(src: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
    for item in src:
        yield from shards.read_shard(item["url"])


def worker_context() -> multiprocessing.context.BaseContext:
    """How loader workers start: forkserver, with torch and webdataset loaded once in the server.

    Not fork: forking a process that runs threads (torch's, OpenCV's) can deadlock the child, and Python 3.12+
    warns about it on every epoch. The preload makes each worker a cheap fork of that single-threaded server
    instead of a fresh interpreter importing torch (spawn, the fallback where forkserver does not exist).
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["pipeline.data.loader", "pipeline.data.shards"])  # no effect once the server runs
    return context


class ShardLoader:
    """Batches of decoded samples from shards, epoch by epoch (``for batch in loader.epoch(e)``).

    ``decode`` maps a raw sample (bytes fields) to what is batched: a tuple of arrays/tensors, collated by
    ``torch.utils.data.default_collate``; ``select`` (a module-level function: workers pickle it), if given, keeps
    only the raw samples it is true for. In resampled mode ``batches_per_epoch`` is required and every rank
    yields exactly that many full batches.
    """

    def __init__(
        self,
        urls: list[str],
        decode: Callable[[dict[str, Any]], Any],
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        resampled: bool = False,
        batches_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        num_workers: int = 0,
        select: Callable[[dict[str, Any]], bool] | None = None,
    ):
        if not urls:
            raise ValueError("ShardLoader needs at least one shard")
        if resampled and not batches_per_epoch:
            raise ValueError("resampled mode needs batches_per_epoch (the fixed epoch length that keeps ranks in step)")
        self.urls, self.decode, self.batch_size = list(urls), decode, batch_size
        self.seed, self.shuffle, self.resampled = seed, shuffle, resampled
        self.batches_per_epoch, self.shuffle_buffer, self.num_workers = batches_per_epoch, shuffle_buffer, num_workers
        self.select = select

    def dataset(self, epoch: int) -> wds.DataPipeline:
        stages: list[Any] = [
            _ShardStream(self.urls, self.seed, epoch, self.shuffle, self.resampled),
            _read_shards,
        ]
        if self.select is not None:
            stages.append(wds.select(self.select))
        if self.shuffle and self.shuffle_buffer > 1:
            stages.append(_BufferShuffle(self.shuffle_buffer, self.seed, epoch))
        stages += [
            wds.map(functools.partial(shards.decoded, decode=self.decode)),
            wds.batched(self.batch_size, collation_fn=default_collate, partial=not self.resampled),
        ]
        if self.resampled:
            stages.append(_TakeBatches(self.batches_per_epoch))
        return wds.DataPipeline(*stages)

    def epoch(self, epoch: int) -> Iterator[Any]:
        loader = DataLoader(
            self.dataset(epoch),
            batch_size=None,  # batched inside the pipeline, so each worker emits whole batches
            num_workers=self.num_workers,
            persistent_workers=False,
            multiprocessing_context=worker_context() if self.num_workers else None,
            # Its own generator: creating an iterator must not draw from the global RNG, or a run resumed
            # mid-epoch would consume random numbers at other times than an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed + epoch),
        )
        try:
            yield from loader
        except shards.ShardError as err:
            # From a worker it arrives with the worker's traceback as its message: keep the last line, its own.
            raise shards.ShardError(str(err).rstrip().rpartition("ShardError: ")[2]) from None
