"""The shard stage: images from a source → ``{train,val}`` WebDataset shards and a manifest, all or nothing."""

from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline import atomic
from pipeline.data import cifar10, shards
from pipeline.data.sources import (
    DataConfig,
    Item,
    Skipped,
    SourceError,
    demo_items,
    image_folder_items,
    load_demo_item,
    load_file_item,
)
from pipeline.progress import Progress, Silent

SPLITS = ("train", "val")
# Items go to the worker pool in windows: results come back in order while memory stays bounded.
_WINDOW = 2048


@dataclass(frozen=True)
class _Encoded:
    """A loaded image as ready-to-append tar bytes, made in the worker so the writer only appends them."""

    item: Item
    tar_bytes: bytes
    highres: bool  # holds hr.png


def _load_and_encode(item: Item, cfg: DataConfig) -> _Encoded | Skipped:
    loaded = load_demo_item(item, cfg) if item.box is not None else load_file_item(item, cfg)
    if isinstance(loaded, Skipped):
        return loaded
    meta = {"source": item.source, "original_size": list(loaded.original_size)}
    if item.box is not None:
        meta["crop_box"] = list(item.box)  # (top, left, side) in the source photograph
    sample = {
        "__key__": item.key,
        "png": shards.encode_png(loaded.rgb),
        "cls": str(item.cls).encode(),
        "json": shards.encode_json(meta),
    }
    if loaded.rgb_highres is not None:
        sample["hr.png"] = shards.encode_png(loaded.rgb_highres)
    return _Encoded(item, shards.tar_members(sample), loaded.rgb_highres is not None)


_worker_cfg: DataConfig | None = None


def _init_worker(cfg: DataConfig) -> None:

    global _worker_cfg
    _worker_cfg = cfg  # sent once per worker, not with every image

    cv2.setNumThreads(1)  # one image per process: OpenCV's own threads would only contend with the others
    # Decoders log every broken file; the manifest already records each skip with its reason.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


def _load_in_worker(item: Item) -> _Encoded | Skipped:
    return _load_and_encode(item, _worker_cfg)


def _load_all(items: list[Item], cfg: DataConfig, progress: Progress) -> Iterator[_Encoded | Skipped]:
    if cfg.workers == 1:
        _init_worker(cfg)
        for item in items:
            yield _load_and_encode(item, cfg)
            progress.advance()
        return
    # spawn, not fork: the parent may hold threads (torch, OpenCV) that a forked child would inherit locked.
    context = multiprocessing.get_context("spawn")
    pending = iter(items)
    with context.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg,)) as pool:
        while window := list(itertools.islice(pending, _WINDOW)):
            chunk = max(1, len(window) // (cfg.workers * 8))
            for result in pool.imap(_load_in_worker, window, chunksize=chunk):
                yield result
                progress.advance()


def build_shards(cfg: DataConfig, out_dir: str | Path, progress: Progress | None = None) -> dict[str, Any]:
    """Write ``out_dir/{train,val}/shard-*.tar`` and ``out_dir/manifest.json``; return the manifest.

    The previous ``out_dir`` is replaced only once everything is written. Unreadable or unsuitable images are
    skipped and listed in the manifest; a source with nothing usable raises ``SourceError``.
    """
    if cfg.source == "cifar10":
        cfg = _with_cifar10(cfg, Path(out_dir), progress or Silent())
    if cfg.source == "demo":
        classes, items = demo_items(cfg)
        skipped_unread: list[Skipped] = []
    else:
        classes, items, skipped_unread = image_folder_items(cfg)
    # Shuffle before sharding (seeded): each shard mixes all classes, so a shuffle buffer smaller than the split
    # still gives class-balanced batches, and splitting shards across ranks and workers stays balanced.
    for split in SPLITS:
        order = np.random.default_rng([cfg.seed, SPLITS.index(split)]).permutation(len(items[split]))
        items[split] = [items[split][i] for i in order]
    progress = progress or Silent()
    progress.start("shard: decode, resize, encode", sum(len(v) for v in items.values()), unit="images")

    counts: dict[str, Counter] = {split: Counter() for split in SPLITS}
    highres: Counter = Counter()
    skipped = [_skip_record(s, split="-") for s in skipped_unread]
    with atomic.atomic_dir(out_dir) as tmp:
        for split in SPLITS:

            def kept(results: Iterable[_Encoded | Skipped], split: str = split) -> Iterator[bytes]:
                for result in results:
                    if isinstance(result, Skipped):
                        skipped.append(_skip_record(result, split))
                    else:
                        counts[split][result.item.cls] += 1
                        highres[split] += result.highres
                        yield result.tar_bytes

            sizes = shards.write_split(tmp / split, kept(_load_all(items[split], cfg, progress)), cfg.shard_size)
            if not sizes and split == "train":
                raise SourceError(f"data.source {cfg.source}: no usable image ({len(skipped)} skipped)")
        _every_class_has_train_images(cfg, classes, counts["train"], skipped)
        manifest = {
            "source": cfg.source,
            "val_source": cfg.val_source,
            "resolution": cfg.resolution,
            "highres_scale": cfg.highres_scale if cfg.highres_scale > 1 else 0,
            "classes": classes,
            "splits": {
                split: {
                    "count": sum(counts[split].values()),
                    "shards": len(list((tmp / split).glob("shard-*.tar"))),
                    "per_class": {name: counts[split][i] for i, name in enumerate(classes)},
                    # images that also have hr.png; the others' sources had fewer pixels than highres_scale needs
                    "highres_count": highres[split],
                }
                for split in SPLITS
            },
            "kept": sum(sum(c.values()) for c in counts.values()),
            "skipped_count": len(skipped),
            "skipped": skipped,
        }
        atomic.write_json(tmp / "manifest.json", manifest)
    return manifest


def _with_cifar10(cfg: DataConfig, out_dir: Path, progress: Progress) -> DataConfig:
    """``cfg`` reading the train tree of CIFAR-10, unpacked (once per archive) to ``cifar10/`` beside the shards."""
    tree = out_dir.parent / "cifar10"
    cifar10.ensure(cfg.archive, tree, out_dir.parent / "downloads", progress)
    return dataclasses.replace(cfg, source=str(tree / "train"))


def _every_class_has_train_images(cfg: DataConfig, classes: list[str], train: Counter, skipped: list[dict]) -> None:
    """A class whose every file was skipped would still take a class index (and the model a class): stop."""
    unseen = [name for i, name in enumerate(classes) if not train[i]]
    if not unseen:
        return
    why = [f"{r['source']}: {r['reason']}" for r in skipped if r["source"].split("/")[0] in unseen]
    raise SourceError(
        f"data.source {cfg.source}: no usable train image in class folder(s) {', '.join(unseen)} "
        f"({'; '.join(why[:3])}{' …' if len(why) > 3 else ''}): fix or remove them"
    )


def _skip_record(skipped: Skipped, split: str) -> dict[str, str]:
    return {"source": skipped.item.source, "split": split, "reason": skipped.reason}
