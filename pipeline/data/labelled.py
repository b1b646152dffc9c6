"""The samples of ``data/shards`` as labelled image tensors, and loaders of their real high-resolution images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.data import shards
from pipeline.data.loader import ShardLoader


def decode_labelled(raw: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """(image_uint8_3HW, cls) of a ``data/shards`` sample."""
    return torch.from_numpy(shards.decode_png(raw["png"])).permute(2, 0, 1).contiguous(), int(raw["cls"])


def has_highres(raw: dict[str, Any]) -> bool:
    """Whether a ``data/shards`` sample holds the 2× (highres_scale×) reference ``hr.png``."""
    return "hr.png" in raw


def decode_labelled_highres(raw: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """(image_uint8_3HW at highres_scale × the resolution, cls) of a sample that has one."""
    return torch.from_numpy(shards.decode_png(raw["hr.png"])).permute(2, 0, 1).contiguous(), int(raw["cls"])


def highres_loaders(
    shards_dir: Path, batch_size: int, seed: int, shuffle_buffer: int
) -> tuple[tuple[ShardLoader, int], ShardLoader] | None:
    """((train loader, batches per epoch), val loader) of the real highres_scale× images in ``shards_dir`` (its
    ``manifest.json`` must exist), or None when the shards hold fewer than ``batch_size`` of them."""
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    count = manifest["splits"]["train"].get("highres_count", 0)
    if manifest.get("highres_scale", 0) < 2 or count < batch_size:
        return None
    per_epoch = count // batch_size
    train = ShardLoader(
        shards.list_shards(shards_dir / "train"),
        decode_labelled_highres,
        batch_size=batch_size,
        seed=seed,
        resampled=True,
        batches_per_epoch=per_epoch,
        shuffle_buffer=shuffle_buffer,
        select=has_highres,
    )
    val_urls = shards.list_shards(shards_dir / "val")
    val = ShardLoader(val_urls, decode_labelled_highres, batch_size=64, shuffle=False, select=has_highres)
    return (train, per_epoch), val
