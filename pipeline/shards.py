"""The WebDataset shard format every stage reads and writes.

A split is a directory of ``shard-%06d.tar`` files; a sample is a group of tar members sharing a key
(``<key>.png``, ``<key>.cls``, ``<key>.json``, ``<key>.<name>.npy`` ...). Writing is byte-reproducible: fixed
mtime, owner and member order, so the same samples give the same files and DVC sees no change.

Training reads shards through ``pipeline.loader``; this module is the format alone and needs no torch, so
worker processes that only encode images start fast.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

SHARD_PATTERN = "shard-{:06d}.tar"


# ---------------------------------------------------------------------------------------------------------------
# Encoding and decoding of sample fields


def encode_png(rgb_HW3: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", cv2.cvtColor(rgb_HW3, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return buffer.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("undecodable PNG")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Decode every field of a raw sample by its extension: png → RGB uint8 (H, W, 3), npy → array,
    cls → int, json → object. ``__key__`` is kept; other ``__`` entries are dropped."""
    sample: dict[str, Any] = {"__key__": raw["__key__"]}
    for name, value in raw.items():
        if name.startswith("__"):
            continue
        if name.endswith("png"):
            sample[name] = decode_png(value)
        elif name.endswith("npy"):
            sample[name] = decode_npy(value)
        elif name == "cls":
            sample[name] = int(value)
        elif name.endswith("json"):
            sample[name] = json.loads(value)
        else:
            sample[name] = value
    return sample


# ---------------------------------------------------------------------------------------------------------------
# Writing


def tar_members(sample: dict[str, Any]) -> bytes:
    """One sample as tar members (``<key>.<field>`` in sorted field order, mtime 0, fixed owner), ready to append.

    Serialising here rather than in a shared ``tarfile`` lets worker processes do it, so the process that
    writes a shard only appends bytes.
    """
    key = sample["__key__"]
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot (WebDataset splits keys at dots)")
    blocks = []
    for field in sorted(name for name in sample if not name.startswith("__")):
        data = sample[field]
        info = tarfile.TarInfo(f"{key}.{field}")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uname = info.gname = "cart"
        header = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
        blocks += [header, data, bytes(-len(data) % tarfile.BLOCKSIZE)]
    return b"".join(blocks)


def write_shard(path: str | Path, samples: Iterable[dict[str, Any] | bytes]) -> int:
    """Write samples (dicts of ``__key__`` and bytes fields, or their ``tar_members``) to one tar file.

    Byte-reproducible: the same samples always give the same file. Returns the sample count.
    """
    count = 0
    with open(path, "wb") as stream:
        for sample in samples:
            stream.write(sample if isinstance(sample, bytes) else tar_members(sample))
            count += 1
        stream.write(bytes(2 * tarfile.BLOCKSIZE))  # end-of-archive marker
    return count


def write_split(directory: str | Path, samples: Iterable[dict[str, Any] | bytes], shard_size: int) -> list[int]:
    """Write samples into ``directory`` as consecutive shards of at most ``shard_size``; returns their sizes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = []
    iterator = iter(samples)
    for index in itertools.count():
        chunk = list(itertools.islice(iterator, shard_size))
        if not chunk:
            break
        sizes.append(write_shard(directory / SHARD_PATTERN.format(index), chunk))
    return sizes


# ---------------------------------------------------------------------------------------------------------------
# Reading


def list_shards(directory: str | Path) -> list[str]:
    """Sorted shard paths of a split; an empty or missing split is an error naming the directory."""
    directory = Path(directory)
    urls = sorted(str(p) for p in directory.glob("shard-*.tar"))
    if not urls:
        raise FileNotFoundError(f"no shards (shard-*.tar) in {directory}: run the stage that writes it first")
    return urls


def read_samples(urls: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Every raw sample of the given shards, in order (for stages that transform a split sample by sample)."""
    for url in urls:
        yield from read_shard(url)


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    import webdataset as wds  # imports torch: kept out of the image-encoding workers, which never read shards

    try:
        yield from wds.tarfile_samples([{"url": url}])
    except (tarfile.TarError, OSError, ValueError) as err:
        raise ValueError(f"{url}: unreadable shard ({err})") from err
