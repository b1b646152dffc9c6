"""CIFAR-10 as ImageFolder trees (``<out>/train/<class>/*.png``, ``<out>/test/<class>/*.png``) from what a user has.

Three archive formats are read, all without extracting anything to disk unchecked and without running code:

* ``cifar-10-binary.tar.gz`` (the "binary version"): ``data_batch_{1..5}.bin`` and ``test_batch.bin``, records of
  one label byte and 3072 pixel bytes (the red, green and blue 32×32 planes), class names in
  ``batches.meta.txt``. Plain bytes: the format to prefer.
* ``cifar-10-python.tar.gz`` (the "python version", what torchvision's downloader fetches): the same batches as
  pickles of dicts of numpy arrays. A pickle can run any code it names, so these are read with an unpickler that
  resolves exactly the globals a numpy array needs (``_reconstruct``, ``ndarray``, ``dtype``; and ``_codecs.encode``
  for latin-1 only, as Python 3 writes bytes at protocol 2) and refuses every other; the result must then be a
  dict holding a uint8 ``data`` array of shape (N, 3072) and N integer labels.
* an ImageFolder archive (``.tar``, ``.tar.gz``): ``train/<class>/<image>`` and optionally ``test/<class>/<image>``,
  at the top or under one folder. The image files are copied as they are (the shard stage decodes them).

Array formats are written as PNG (lossless), named after their batch and row (``data_batch_3-00017.png``). The
tree is built beside its destination and renamed into place once complete, so a killed run leaves either the
previous tree or the finished one; ``prepared.json`` in it records the archive it came from.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import zlib
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pipeline import atomic
from pipeline.config import InvalidInput
from pipeline.data.shards import encode_png
from pipeline.progress import Progress, Silent

SPLITS = ("train", "test")
SIDE = 32
RECORD = 1 + 3 * SIDE * SIDE  # the binary version: label byte, then the R, G and B planes
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
BATCHES = TRAIN_BATCHES + ("test_batch",)
_IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")
MANIFEST = "prepared.json"


class ArchiveError(InvalidInput):
    """The archive is damaged, truncated or not a CIFAR-10 archive this module reads: nothing is written."""


# ---------------------------------------------------------------------------------------------------------------
# The python version's pickles, read without running code


def _numpy_global(name: str):
    try:
        from numpy._core import multiarray  # numpy ≥ 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray
    return {"_reconstruct": multiarray._reconstruct, "ndarray": np.ndarray, "dtype": np.dtype, "encode": _latin1}[name]


def _latin1(text: str, codec: str) -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2 (CIFAR's own Python 2 pickles need it not): only
    the latin-1 round trip, no other codec."""
    if codec != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with codec {codec!r} (only latin1 rebuilds bytes)")
    return text.encode("latin1")


class _ArraysOnly(pickle.Unpickler):
    """Resolves only the globals that rebuild a numpy array; any other global (a function, a class) is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return _numpy_global(name)
        raise pickle.UnpicklingError(f"refused to load the global {module}.{name} (only numpy arrays are read)")


def load_arrays_pickle(data: bytes, what: str) -> Any:
    """A pickle of plain values and numpy arrays (CIFAR's batches: Python 2 pickles, hence bytes keys)."""
    try:
        return _ArraysOnly(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # a refused global, a truncated stream, garbage: all say the same to the user
        raise ArchiveError(f"{what}: not a CIFAR-10 python batch ({err})") from None


def _python_batch(data: bytes, what: str) -> tuple[np.ndarray, np.ndarray]:
    batch = load_arrays_pickle(data, what)
    if not isinstance(batch, dict):
        raise ArchiveError(f"{what}: expected a dict of arrays, found {type(batch).__name__}")
    pixels, labels = batch.get(b"data", batch.get("data")), batch.get(b"labels", batch.get("labels"))
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3072:
        got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise ArchiveError(f"{what}: 'data' should be a uint8 array of shape (N, 3072), found {got}")
    if not isinstance(labels, list | np.ndarray) or len(labels) != len(pixels):
        raise ArchiveError(f"{what}: 'labels' should hold {len(pixels)} class indices")
    labels_N = np.asarray(labels)
    if labels_N.dtype.kind not in "iu":
        raise ArchiveError(f"{what}: 'labels' should be integers, found {labels_N.dtype}")
    return pixels.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1), labels_N.astype(np.int64)


def _python_meta(data: bytes, what: str) -> list[str]:
    meta = load_arrays_pickle(data, what)
    names = meta.get(b"label_names", meta.get("label_names")) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, bytes | str) for n in names):
        raise ArchiveError(f"{what}: expected a dict with a 'label_names' list")
    return [n.decode() if isinstance(n, bytes) else n for n in names]


def _binary_batch(data: bytes, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not data or len(data) % RECORD:
        raise ArchiveError(f"{what}: {len(data)} bytes is not a whole number of {RECORD}-byte CIFAR-10 records")
    records_NR = np.frombuffer(data, np.uint8).reshape(-1, RECORD)
    return records_NR[:, 1:].reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1), records_NR[:, 0].astype(np.int64)


# ---------------------------------------------------------------------------------------------------------------
# Reading an archive


def _member_kind(name: str) -> tuple[str, str] | None:
    """("python" | "binary" | "meta-python" | "meta-binary", batch) for a CIFAR-10 member, else None."""
    base = PurePosixPath(name).name
    if base in BATCHES:
        return "python", base
    if base.endswith(".bin") and base[:-4] in BATCHES:
        return "binary", base[:-4]
    if base == "batches.meta":
        return "meta-python", base
    if base == "batches.meta.txt":
        return "meta-binary", base
    return None


def _image_member(name: str) -> tuple[str, str, str] | None:
    """(split, class, file) for ``[<top>/]{train,test}/<class>/<file>`` with an image suffix, else None."""
    parts = PurePosixPath(name).parts
    if any(p.startswith(".") for p in parts) or PurePosixPath(name).suffix.lower() not in _IMAGE_SUFFIXES:
        return None
    for k in (0, 1):
        if len(parts) == k + 3 and parts[k] in SPLITS:
            return parts[k], parts[k + 1], parts[k + 2]
    return None


def _check_name(name: str, archive: Path) -> str:
    """A class folder's or file's name, refused if it could name another place (a path, a parent, a hidden file)."""
    if not name.strip() or name.startswith(".") or "/" in name or "\\" in name or "\0" in name:
        raise ArchiveError(f"{archive}: {name!r} cannot be a folder or file name")
    return name


def prepare(archive: str | Path, out: str | Path, progress: Progress | None = None) -> dict[str, Any]:
    """Write ``out/{train,test}/<class>/`` from ``archive`` (replacing ``out`` only when complete); the manifest.

    Raises ``ArchiveError`` naming the archive when it cannot be read, is truncated, or holds no CIFAR-10.
    """
    archive, out = Path(archive), Path(out)
    if not archive.is_file():
        raise ArchiveError(f"CIFAR-10 archive {archive}: no such file")
    progress = progress or Silent()
    batches: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {"python": {}, "binary": {}}
    metas: dict[str, list[str]] = {}
    counts: dict[str, Counter] = {split: Counter() for split in SPLITS}
    progress.start(f"read {archive.name}", None, unit="members")
    with atomic.atomic_dir(out) as tmp:
        try:
            with tarfile.open(archive, "r:*") as tar:
                for member in tar:
                    progress.advance()
                    if not member.isfile():
                        continue
                    kind, image = _member_kind(member.name), _image_member(member.name)
                    if kind is None and image is None:
                        continue
                    data = tar.extractfile(member).read()
                    what = f"{archive}: {member.name}"
                    if image is not None:
                        split, name, file = image
                        folder = tmp / split / _check_name(name, archive)
                        folder.mkdir(parents=True, exist_ok=True)
                        (folder / _check_name(file, archive)).write_bytes(data)
                        counts[split][name] += 1
                    elif kind[0] == "python":
                        batches["python"][kind[1]] = _python_batch(data, what)
                    elif kind[0] == "binary":
                        batches["binary"][kind[1]] = _binary_batch(data, what)
                    elif kind[0] == "meta-python":
                        metas["python"] = _python_meta(data, what)
                    else:
                        metas["binary"] = [line.strip() for line in data.decode(errors="replace").splitlines()]
                        metas["binary"] = [n for n in metas["binary"] if n]
        except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
            raise ArchiveError(f"CIFAR-10 archive {archive}: damaged or not a tar archive ({err})") from None
        found = [f for f in ("python", "binary") if batches[f]] + (["imagefolder"] if any(counts.values()) else [])
        if len(found) != 1:
            raise ArchiveError(
                f"CIFAR-10 archive {archive}: "
                + (f"holds several formats at once ({', '.join(found)})" if found else "no CIFAR-10 found")
                + ": expected cifar-10-python.tar.gz (data_batch_1 … 5, test_batch, batches.meta), "
                "cifar-10-binary.tar.gz (data_batch_1.bin … 5, test_batch.bin, batches.meta.txt) or an ImageFolder "
                "archive (train/<class>/<image>, optionally test/<class>/<image>)"
            )
        kind = found[0]
        if kind == "imagefolder":
            if not counts["train"]:
                raise ArchiveError(f"CIFAR-10 archive {archive}: images under test/ but none under train/")
        else:
            counts = _write_arrays(archive, batches[kind], metas.get(kind), tmp, progress)
        manifest = {
            "archive": str(archive.resolve()),
            "format": kind,
            "fingerprint": archive_fingerprint(archive),
            "splits": {s: dict(sorted(counts[s].items())) for s in SPLITS if counts[s]},
        }
        atomic.write_json(tmp / MANIFEST, manifest)
    return manifest


def _write_arrays(archive: Path, batches: dict, names: list[str] | None, tmp: Path, progress: Progress):
    missing = [b for b in BATCHES if b not in batches]
    if missing:
        raise ArchiveError(f"CIFAR-10 archive {archive}: batch(es) {', '.join(missing)} missing (truncated?)")
    if names is None:
        raise ArchiveError(f"CIFAR-10 archive {archive}: the class names (batches.meta / batches.meta.txt) missing")
    names = [_check_name(n, archive) for n in names]
    counts: dict[str, Counter] = {split: Counter() for split in SPLITS}
    progress.start("write PNG", sum(len(labels) for _, labels in batches.values()), unit="images")
    for batch in BATCHES:
        rgb_NHW3, labels_N = batches[batch]
        if labels_N.size and (labels_N.min() < 0 or labels_N.max() >= len(names)):
            raise ArchiveError(f"{archive}: {batch}: a label outside 0 … {len(names) - 1} ({len(names)} classes)")
        split = "test" if batch == "test_batch" else "train"
        for i, (rgb, label) in enumerate(zip(rgb_NHW3, labels_N, strict=True)):
            folder = tmp / split / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{batch}-{i:05d}.png").write_bytes(encode_png(np.ascontiguousarray(rgb)))
            counts[split][names[label]] += 1
            progress.advance()
    return counts


def archive_fingerprint(archive: Path) -> list:
    stat = archive.stat()
    return [str(archive.resolve()), stat.st_size, stat.st_mtime_ns]


def prepared(out: str | Path, archive: str | Path) -> dict[str, Any] | None:
    """The manifest of ``out`` if it was prepared from ``archive`` as it is now (same path, size, mtime)."""
    path = Path(out) / MANIFEST
    if not path.is_file() or not Path(archive).is_file():
        return None

    manifest = json.loads(path.read_text())
    return manifest if manifest.get("fingerprint") == archive_fingerprint(Path(archive)) else None


def download(root: str | Path) -> Path:
    """``root/cifar-10-python.tar.gz`` from CIFAR-10's site through torchvision's downloader (MD5-checked; a file
    already there with the right MD5 is kept). Only the archive is downloaded: ``prepare`` reads it."""
    # lazy: torchvision takes seconds to import (bench/RESULTS.md); only the download needs it
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity, download_url

    root = Path(root)
    path = root / CIFAR10.filename
    download_url(CIFAR10.url, str(root), CIFAR10.filename, CIFAR10.tgz_md5)
    if not check_integrity(str(path), CIFAR10.tgz_md5):
        raise RuntimeError(f"download of {CIFAR10.url} to {path} failed its MD5 check: delete it and rerun")
    return path


def ensure(archive: str | Path | None, out: str | Path, downloads: str | Path, progress: Progress | None = None):
    """The prepared tree ``out`` for ``archive`` (None: download the python version into ``downloads`` first),
    made only when ``out`` was not already prepared from that very file."""
    archive = Path(archive) if archive is not None else download(downloads)
    return prepared(out, archive) or prepare(archive, out, progress)
