"""Run under torchrun (2 ranks, gloo): record which samples each rank reads, for test_loader.py."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from pipeline.data import shards
from pipeline.data.loader import ShardLoader


def value(raw):
    return int(shards.decode_npy(raw["x.npy"])[0])


def main(split_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    urls = shards.list_shards(split_dir)
    # By module name, not __main__.value: forkserver workers cannot unpickle the functions of a script's __main__.
    from ddp_loader_check import value

    exact = ShardLoader(urls, value, batch_size=4, num_workers=2, shuffle_buffer=8)
    resampled = ShardLoader(urls, value, batch_size=4, resampled=True, batches_per_epoch=9, num_workers=2)
    resampled_batches = [b.tolist() for b in resampled.epoch(0)]
    record = {
        "exact": [v for b in exact.epoch(0) for v in b.tolist()],
        "resampled_batches": len(resampled_batches),
        "resampled": [v for b in resampled_batches for v in b],
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
