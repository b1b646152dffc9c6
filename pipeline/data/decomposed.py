"""The decomposed dataset: image shards → shards that add the bases B_1 … B_n of every image.

Each output shard corresponds to one input shard and holds, per sample, the original ``png`` (bytes copied,
so the image stays exact), ``cls``, ``json`` and ``bases.f16z``: float16 (n, 3, H, W) in [0, 1], losslessly
compressed (``shards.encode_npy_f16z``; its ratio: bench/RESULTS.md). Shards of earlier versions hold
``bases.npy`` (raw float16) instead; both read the same. Details are not stored: D_k = B_{k−1} − B_k with
B_0 = I. Shards are written one at a time into a resumable work directory,
so a killed stage keeps the shards it finished.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import atomic
from pipeline.data import shards
from pipeline.data.decompose import DecomposeConfig, DecompositionError, decompose, details
from pipeline.progress import Progress, Silent
from pipeline.runtime import barrier, init_data_parallel, open_resumable, resolve_device, todo_share

SPLITS = ("train", "val")


def decode_training_sample(raw: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(image_3HW, bases_K3HW, cls), floats in [0, 1]: what the tokenizer trains on."""
    image = torch.from_numpy(shards.decode_png(raw["png"])).permute(2, 0, 1).float() / 255
    return image, torch.from_numpy(decode_bases(raw).astype(np.float32)), int(raw["cls"])


def decode_bases(raw: dict[str, Any]) -> np.ndarray:
    """The float16 bases (n, 3, H, W) of a raw decomposed sample, compressed or (older shards) raw ``.npy``."""
    if "bases.f16z" in raw:
        return shards.decode_npy_f16z(raw["bases.f16z"])
    return shards.decode_npy(raw["bases.npy"])


def _image_sample(raw: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The image of a ``data/shards`` sample and the fields its decomposed sample copies."""
    return shards.decode_png(raw["png"]), {name: raw[name] for name in ("__key__", "png", "cls", "json")}


def decompose_shard(raw: list[dict[str, Any]], cfg: DecomposeConfig) -> tuple[list[dict[str, Any]], dict]:
    """Decompose the images of one shard; return the output samples and per-level sums for the manifest."""
    decoded = [shards.decoded(sample, _image_sample) for sample in raw]
    images = torch.from_numpy(np.stack([rgb for rgb, _ in decoded])).permute(0, 3, 1, 2).float() / 255
    samples = [fields for _, fields in decoded]
    try:
        result = decompose(images, cfg)
    except DecompositionError as err:
        keys = [samples[i]["__key__"] for i in err.indices]
        raise DecompositionError(err.indices, f"samples {keys}: {str(err).split(': ', 1)[-1]}") from None
    bases = result.bases_NKCHW
    detail_energy = details(images, bases).square().mean((2, 3, 4)).sum(0) if cfg.order else torch.zeros(0)
    out = []
    for i, sample in enumerate(samples):
        out.append(
            {
                "__key__": sample["__key__"],
                "png": sample["png"],
                "cls": sample["cls"],
                "json": sample["json"],
                "bases.f16z": shards.encode_npy_f16z(bases[i].numpy().astype(np.float16)),
            }
        )
    stats = {
        "count": len(samples),
        "detail_energy_sum": detail_energy.tolist(),
        "unconverged": int((~result.converged_NK).sum()),
    }
    return out, stats


def decompose_splits(
    in_dir: str | Path, out_dir: str | Path, cfg: DecomposeConfig, progress: Progress | None = None
) -> dict[str, Any] | None:
    """Decompose ``in_dir/{train,val}`` into ``out_dir/{train,val}`` plus ``manifest.json``; resumable.

    A rerun after a kill keeps every shard already written if the inputs and parameters are unchanged. Under
    torchrun each rank decomposes its share of the shards (on its own GPU); rank 0 writes the manifest once all
    are done and returns it (the other ranks return None). The output does not depend on the number of ranks.
    """
    in_dir, progress = Path(in_dir), progress or Silent()
    source_manifest = json.loads((in_dir / "manifest.json").read_text())
    dist = init_data_parallel(resolve_device(cfg.device))
    # Everything but how the work is scheduled decides the output.
    settings = {k: v for k, v in vars(cfg).items() if k not in ("batch_size", "preview_count", "compile")}
    work = open_resumable(out_dir, atomic.fingerprint(settings, atomic.files_fingerprint(in_dir)), dist)
    shards.list_shards(in_dir / "train")  # a missing train split is an error naming the directory
    urls = {split: split_shards(in_dir / split) for split in SPLITS}
    names = {
        url: (f"{split}/{Path(url).name}", f"{split}/.{Path(url).stem}.stats.json")
        for split in SPLITS
        for url in urls[split]
    }
    for split in SPLITS:
        work.path(split).mkdir(exist_ok=True)
    mine = todo_share(list(names), lambda url: all(work.done(name) for name in names[url]), dist)
    progress.start(f"decompose (order {cfg.order})", sum(shards.count_samples(url) for url in mine), unit="images")
    for url in mine:
        shard_name, stats_name = names[url]
        samples, stats = decompose_shard(list(shards.read_shard(url)), cfg)
        with atomic.writing(work.path(shard_name)) as tmp:
            shards.write_shard(tmp, samples)
        atomic.write_json(work.path(stats_name), stats)
        progress.advance(stats["count"])
    barrier(dist)
    if not dist.is_main:
        return None
    splits: dict[str, Any] = {}
    for split in SPLITS:
        totals = {"count": 0, "detail_energy_sum": np.zeros(cfg.order), "unconverged": 0}
        for url in urls[split]:
            stats = json.loads(work.path(names[url][1]).read_text())
            totals["count"] += stats["count"]
            totals["detail_energy_sum"] += np.array(stats["detail_energy_sum"])
            totals["unconverged"] += stats["unconverged"]
        splits[split] = {
            "count": totals["count"],
            "shards": len(urls[split]),
            # Mean squared detail intensity of each level D_1 … D_n (per pixel and channel, [0, 1] scale).
            "mean_detail_energy": (totals["detail_energy_sum"] / max(1, totals["count"])).tolist(),
            "unconverged_solves": totals["unconverged"],
        }
    for stats_file in work.work.glob("*/.*.stats.json"):
        stats_file.unlink()
    manifest = {
        "order": cfg.order,
        "classes": source_manifest["classes"],
        "resolution": source_manifest["resolution"],
        "splits": splits,
        "decompose": dict(vars(cfg)),
    }
    atomic.write_json(work.path("manifest.json"), manifest)
    work.finish()
    return manifest


def split_shards(directory: Path) -> list[str]:
    """The shards of a split that may be empty (val with val_fraction 0), each checked complete."""
    return [shards.complete(str(p)) for p in sorted(Path(directory).glob("shard-*.tar"))]


def first_samples(split_dir: str | Path, count: int) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(key, image_3HW, bases_K3HW) of the first ``count`` samples of a decomposed split (for figures)."""
    for i, raw in enumerate(shards.read_samples(split_shards(split_dir))):
        if i >= count:
            return
        image, bases, _ = shards.decoded(raw, decode_training_sample)
        yield raw["__key__"], image, bases
