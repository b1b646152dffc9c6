"""The WebDataset shard format every stage reads and writes.

A split is a directory of ``shard-%06d.tar`` files; a sample is a group of tar members sharing a key
(``<key>.png``, ``<key>.cls``, ``<key>.json``, ``<key>.<name>.npy`` ...). Writing is byte-reproducible: fixed
mtime, owner and member order, so the same samples give the same files and DVC sees no change.

Training reads shards through ``pipeline.data.loader``; this module is the format alone and needs no torch, so
worker processes that only encode images start fast.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np

SHARD_PATTERN = "shard-{:06d}.tar"

T = TypeVar("T")


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


def encode_npy_f16z(array: np.ndarray, level: int = 3) -> bytes:
    """A float16 array, losslessly compressed (``.f16z``): a fraction of its raw size for smooth images.

    The bit patterns are predicted from the left, upper and upper-left neighbours in the last two axes (a 2-D
    difference, wrapping in 16-bit integers so that it is exactly invertible), the residuals zig-zag mapped so
    that small negative ones become small integers too, split into a plane of high bytes (mostly zero) and one of
    low bytes, and deflated. Positive float16 values order like their bit patterns, so the residuals of a smooth
    image are small. zlib level 3: higher levels made photographs' bases barely smaller, for several times the
    encoding time (the figures: bench/RESULTS.md).
    """
    if array.dtype != np.float16:
        raise ValueError(f"f16z stores float16 arrays, got {array.dtype}")
    if array.ndim > 255 or any(side >= 2**32 for side in array.shape):
        raise ValueError(f"f16z cannot store an array of shape {array.shape}")
    bits = np.ascontiguousarray(array).view(np.uint16)
    residual = bits.copy()
    if bits.ndim >= 1:
        residual[..., 1:] -= bits[..., :-1]  # uint16 arithmetic wraps: exact modulo 2^16
    if bits.ndim >= 2:
        residual[..., 1:, :] -= residual[..., :-1, :].copy()
    signed = residual.view(np.int16)
    zigzag = ((signed << 1) ^ (signed >> 15)).view(np.uint16)
    planes = np.stack([(zigzag >> 8).astype(np.uint8), (zigzag & 0xFF).astype(np.uint8)])
    header = _F16Z_MAGIC + bytes([array.ndim]) + np.asarray(array.shape, dtype="<u4").tobytes()
    return header + zlib.compress(planes.tobytes(), level)


def decode_npy_f16z(data: bytes) -> np.ndarray:
    """The float16 array ``encode_npy_f16z`` stored, bit for bit. Damaged data raises ValueError."""
    if data[: len(_F16Z_MAGIC)] != _F16Z_MAGIC or len(data) <= len(_F16Z_MAGIC):
        raise ValueError("not an f16z array (bad magic)")
    ndim = data[len(_F16Z_MAGIC)]
    start = len(_F16Z_MAGIC) + 1
    shape = tuple(int(side) for side in np.frombuffer(data[start : start + 4 * ndim], dtype="<u4"))
    if len(shape) != ndim:
        raise ValueError("f16z header cut short")
    try:
        payload = zlib.decompress(data[start + 4 * ndim :])
    except zlib.error as err:
        raise ValueError(f"f16z payload does not inflate ({err})") from None
    count = int(np.prod(shape, dtype=np.int64))
    if len(payload) != 2 * count:
        raise ValueError(f"f16z payload holds {len(payload)} bytes, shape {shape} needs {2 * count}")
    planes = np.frombuffer(payload, dtype=np.uint8).reshape(2, *shape).astype(np.uint16)
    zigzag = (planes[0] << 8) | planes[1]
    residual = (zigzag >> 1) ^ (np.uint16(0) - (zigzag & 1))
    bits = residual
    if bits.ndim >= 2:
        bits = np.cumsum(bits, axis=-2, dtype=np.uint16)  # wraps modulo 2^16, undoing the encoder's difference
    if bits.ndim >= 1:
        bits = np.cumsum(bits, axis=-1, dtype=np.uint16)
    return bits.view(np.float16).reshape(shape)


_F16Z_MAGIC = b"F16Z\x01"


def encode_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Decode every field of a raw sample by its extension: png → RGB uint8 (H, W, 3), npy → array,
    f16z → float16 array, cls → int, json → object. ``__key__`` is kept; other ``__`` entries are dropped."""
    sample: dict[str, Any] = {"__key__": raw["__key__"]}
    for name, value in raw.items():
        if name.startswith("__"):
            continue
        if name.endswith("png"):
            sample[name] = decode_png(value)
        elif name.endswith("npy"):
            sample[name] = decode_npy(value)
        elif name.endswith("f16z"):
            sample[name] = decode_npy_f16z(value)
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


class ShardError(ValueError):
    """A shard that cannot be read, or a sample in it that cannot be decoded; the message names the file."""


# What decoding a damaged field raises: numpy, OpenCV, JSON, int() and a missing field, not programming errors.
_UNDECODABLE = (ValueError, KeyError, IndexError, EOFError, OSError, SyntaxError, cv2.error)

_END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)


def complete(url: str) -> str:
    """``url``, once its shard is checked to end with tar's end-of-archive marker (a cheap check at listing time).

    A shard cut short at a member boundary reads as a shorter, valid archive: without a check its last samples
    would be lost without a word.
    """
    try:
        with open(url, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - len(_END_OF_ARCHIVE)))
            ending = f.read()
    except OSError as err:
        raise ShardError(f"{url}: unreadable shard ({err.strerror or err})") from None
    if size % tarfile.BLOCKSIZE or ending != _END_OF_ARCHIVE:
        raise ShardError(f"{url}: truncated shard ({size} bytes, no end-of-archive marker){_RERUN}")
    return url


_RERUN = ": rerun the stage that wrote it"


def list_shards(directory: str | Path) -> list[str]:
    """Sorted shard paths of a split, each checked complete; an empty or missing split is an error naming it."""
    directory = Path(directory)
    urls = sorted(str(p) for p in directory.glob("shard-*.tar"))
    if not urls:
        raise FileNotFoundError(f"no shards (shard-*.tar) in {directory}: run the stage that writes it first")
    return [complete(url) for url in urls]


def count_samples(url: str) -> int:
    """Samples in a shard, counted from the tar index without decoding anything (one ``.cls`` per sample)."""
    try:
        with tarfile.open(url) as tar:
            return sum(name.endswith(".cls") for name in tar.getnames())
    except (tarfile.TarError, OSError) as err:
        raise ShardError(f"{url}: unreadable shard ({err}){_RERUN}") from None


def read_samples(urls: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Every raw sample of the given shards, in order (for stages that transform a split sample by sample)."""
    for url in urls:
        yield from read_shard(url)


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard in order, as WebDataset groups them: ``__key__``, ``__url__`` and raw fields.

    Stricter than ``tarfile``, which ends an archive quietly at a damaged header, or at zeros where a header
    should be, and so loses the rest: a shard that is not a whole tar file is a ``ShardError`` naming it.
    """
    sample: dict[str, Any] = {}
    try:
        with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                head, slash, base = member.name.rpartition("/")
                stem, _, field = base.partition(".")  # a WebDataset key ends at the first dot of the name
                key = head + slash + stem
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample = sample or {"__key__": key, "__url__": url}
                if not member.isfile() or field in sample:
                    raise ShardError(f"{url}: {member.name} is not the next field of a sample{_RERUN}")
                sample[field] = tar.extractfile(member).read()
            stop, size = tar.offset, os.fstat(f.fileno()).st_size
            f.seek(stop)
            tail = f.read(2 * tarfile.RECORDSIZE + 1)
    except (tarfile.TarError, OSError) as err:
        raise ShardError(f"{url}: unreadable shard ({err}){_RERUN}") from None
    # tar pads its end with zeros (two blocks at least, to a whole record at most): anything else means
    # reading stopped at a damaged header.
    if not len(_END_OF_ARCHIVE) <= len(tail) <= 2 * tarfile.RECORDSIZE or tail.strip(b"\0"):
        raise ShardError(f"{url}: damaged shard (its tar headers stop at byte {stop} of {size}){_RERUN}")
    if sample:
        yield sample


def decoded(raw: dict[str, Any], decode: Callable[[dict[str, Any]], T]) -> T:
    """``decode(raw)``; a field that is missing or does not decode is a ``ShardError`` naming shard and sample."""
    try:
        return decode(raw)
    except _UNDECODABLE as err:
        where = f"{raw.get('__url__', 'a shard')}: sample {raw.get('__key__')}"
        raise ShardError(f"{where} cannot be decoded ({type(err).__name__}: {err})") from err
