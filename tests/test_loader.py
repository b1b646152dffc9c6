"""Reading shards for training: exact epochs, reproducible order, and DDP ranks that partition or keep in step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import shards
from pipeline.data.loader import ShardLoader

HERE = Path(__file__).resolve().parent


def key_and_value(raw: dict) -> tuple[str, int]:
    return raw["__key__"], int(shards.decode_npy(raw["x.npy"])[0])


def make_split(directory: Path, count: int = 50, shard_size: int = 7) -> list[str]:
    samples = ({"__key__": f"s{i:04d}", "x.npy": shards.encode_npy(np.array([i]))} for i in range(count))
    shards.write_split(directory, samples, shard_size)
    return shards.list_shards(directory)


def seen(loader: ShardLoader, epoch: int) -> list[int]:
    return [int(v) for _, values in loader.epoch(epoch) for v in values]


def test_every_sample_is_read_exactly_once_per_epoch_with_two_workers(tmp_path):
    urls = make_split(tmp_path)
    loader = ShardLoader(urls, key_and_value, batch_size=4, num_workers=2, shuffle_buffer=16)
    for epoch in (0, 1):
        assert sorted(seen(loader, epoch)) == list(range(50))


def test_same_seed_gives_the_same_order_and_epochs_differ(tmp_path):
    urls = make_split(tmp_path)

    def make(seed):
        return ShardLoader(urls, key_and_value, batch_size=5, seed=seed, num_workers=2, shuffle_buffer=16)

    assert seen(make(1), 0) == seen(make(1), 0)
    assert seen(make(1), 0) != seen(make(1), 1)
    assert seen(make(1), 0) != seen(make(2), 0)
    # The order of an epoch does not depend on which epochs were read before (resuming mid-run is exact).
    loader = make(1)
    seen(loader, 0)
    assert seen(loader, 3) == seen(make(1), 3)


def test_unshuffled_reading_keeps_shard_order(tmp_path):
    urls = make_split(tmp_path)
    loader = ShardLoader(urls, key_and_value, batch_size=8, shuffle=False)
    assert seen(loader, 0) == list(range(50))


def test_resampled_mode_yields_a_fixed_number_of_full_batches(tmp_path):
    urls = make_split(tmp_path)
    loader = ShardLoader(
        urls, key_and_value, batch_size=6, resampled=True, batches_per_epoch=11, num_workers=2, shuffle_buffer=8
    )
    batches = [values for _, values in loader.epoch(0)]
    assert len(batches) == 11 and all(len(b) == 6 for b in batches)
    with pytest.raises(ValueError, match="batches_per_epoch"):
        ShardLoader(urls, key_and_value, batch_size=6, resampled=True)


def test_missing_split_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
        shards.list_shards(tmp_path / "nothing")


def test_corrupt_shard_is_reported_by_name(tmp_path):
    urls = make_split(tmp_path)
    Path(urls[1]).write_bytes(Path(urls[1]).read_bytes()[:700])
    with pytest.raises(ValueError, match="shard-000001.tar"):
        list(shards.read_samples(urls))


@pytest.mark.slow
def test_two_ddp_ranks_together_see_every_sample_once(tmp_path):
    make_split(tmp_path / "split", count=60, shard_size=5)
    out = tmp_path / "seen"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HERE / "ddp_loader_check.py"),
        str(tmp_path / "split"),
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    exact = Counter(ranks[0]["exact"] + ranks[1]["exact"])
    assert sorted(exact) == list(range(60)) and set(exact.values()) == {1}
    assert set(ranks[0]["exact"]).isdisjoint(ranks[1]["exact"])
    # Resampled mode: both ranks take the same number of steps, and draw different samples.
    assert ranks[0]["resampled_batches"] == ranks[1]["resampled_batches"] == 9
    assert ranks[0]["resampled"] != ranks[1]["resampled"]


def parent_pid(raw: dict) -> tuple[int]:
    return (os.getppid(),)


def test_loader_workers_are_not_forked_from_the_training_process(tmp_path):
    # fork() of a process running torch's threads can deadlock the child; Python 3.12+ warns on every epoch.
    # A worker started by forkserver (or spawn) is not our child, and everything it runs had to pickle.
    urls = make_split(tmp_path)
    loader = ShardLoader(urls, parent_pid, batch_size=5, num_workers=2)
    parents = {int(pid) for (pids,) in loader.epoch(0) for pid in pids}
    assert parents and os.getpid() not in parents
