"""Shard-stage throughput (images/s) on an ImageFolder tree, for 1 and 2 worker processes.

    python bench/shard.py --source /tmp/cifar10/train --workers 1 2

Write the CIFAR-10 tree first (docs/cifar10.md):
    python -m stages prepare-cifar10 --archive <your CIFAR-10 archive> --out /tmp/cifar10
Prints one row per worker count; copy it into bench/RESULTS.md with the machine and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.data.ingest import build_shards
from pipeline.data.sources import DataConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="ImageFolder tree (one sub-folder per class)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    base = DataConfig(source=args.source, resolution=args.resolution, val_fraction=0.1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; source {args.source}")
    print("| workers | images | seconds | images/s |")
    print("|---|---|---|---|")
    for workers in args.workers:
        cfg = dataclasses.replace(base, workers=workers)
        times = []
        for _ in range(args.repeats):
            out = Path(tempfile.mkdtemp()) / "shards"
            start = time.perf_counter()
            manifest = build_shards(cfg, out)
            times.append(time.perf_counter() - start)
            shutil.rmtree(out.parent)
        seconds = sorted(times)[len(times) // 2]
        images = manifest["kept"] + manifest["skipped_count"]
        print(f"| {workers} | {images} | {seconds:.1f} | {images / seconds:.0f} |")


if __name__ == "__main__":
    main()
