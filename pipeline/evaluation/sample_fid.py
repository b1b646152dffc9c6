"""The field's FID protocol: N images per class from the trained transformer, as PNGs and as the ``samples.npz``
OpenAI's ADM evaluator reads, and FID against reference statistics with the field's Inception-v3
(``pipeline.evaluation.inception``).

Sampling goes in chunks of ``batch_size`` images (``pipeline.evaluation.sampling.sample_chunk``), each drawn
with its own seed derived from (``transformer.sampling.seed``, chunk index): under torchrun every rank draws its
share of the chunks and no two chunks, hence no two ranks, share a random stream; the images do not depend on
the number of ranks. Chunks are written into a resumable work directory (``samples/.fid.partial``) and marked
done once their PNGs are on disk, so a killed run, rerun, keeps every finished chunk. Rank 0 then packs
``samples.npz`` (``arr_0``: uint8 N×H×W×3, ``arr_1``: int64 labels, ADM's layout), computes the Inception
features of the samples (``pipeline.evaluation.inception``: TensorFlow's FID network, TF 1 bilinear resize) and
their FID against ``evaluate.reference_stats`` (an ``.npz`` with ``mu`` and ``sigma``, as ADM's
``VIRTUAL_imagenet256_labeled.npz`` or MAR's ``adm_in256_stats.npz``, or one ``cart reference-stats`` wrote),
and writes the sampling recipe and the reference set beside the number.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

from pipeline import atomic
from pipeline.config import Field, InvalidInput, section
from pipeline.data import shards
from pipeline.data.labelled import decode_labelled
from pipeline.data.sources import decode_rgb
from pipeline.evaluation.evaluation import to_uint8
from pipeline.evaluation.inception import NETWORK, RESIZE
from pipeline.evaluation.metrics import FEATURES, batched, build, inception_extractor
from pipeline.evaluation.metrics import features as extract
from pipeline.evaluation.sampling import chunk_labels, sample_chunk
from pipeline.models.tokenizer import load_tokenizer
from pipeline.models.transformer import load_transformer, sampling_stem
from pipeline.progress import Progress, Silent
from pipeline.runtime import barrier, init_data_parallel, open_resumable, resolve_device, todo_share

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member dates: the same samples give the same samples.npz


@section
class SampleFidConfig:
    per_class: int = Field(
        50, ge=1, description="Images per class (the ImageNet convention: 50, i.e. 50 000 for 1000 classes)."
    )
    batch_size: int = Field(
        64,
        ge=1,
        description="Images sampled together: one chunk, drawn with its own seed (from transformer.sampling.seed "
        "and the chunk's index). With the seed it decides the images; a rerun with another batch size draws others.",
    )
    feature_batch_size: int = Field(64, ge=1, description="Images per Inception forward pass.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when visible.")


@dataclass(frozen=True)
class SampleFidPaths:
    transformer: Path  # stem of the trained transformer (its <stem>_ema beside it when training kept one)
    out: Path  # samples/fid: images/, samples.npz, recipe.json
    metrics: Path  # metrics/fid.json


# ---------------------------------------------------------------------------------------------------------------
# Inception features and statistics


def load_reference_stats(path: str | Path, key: str = "evaluate.reference_stats") -> dict[str, np.ndarray]:
    """``mu`` (D,) and ``sigma`` (D, D) of a reference statistics file, as float64, and the ``count``, ``source``,
    ``network`` and ``resize`` it records, if any. Other arrays (ADM's reference batches also hold the images) are
    not read. A bad file, or one whose features were made another way, is ``InvalidInput`` naming ``key``."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as saved:
            missing = [name for name in ("mu", "sigma") if name not in saved.files]
            if missing:
                raise InvalidInput(f"{key}: {path} has no {' or '.join(missing)} (it holds {', '.join(saved.files)})")
            mu, sigma = saved["mu"].astype(np.float64), saved["sigma"].astype(np.float64)
            # What `cart reference-stats` records beside them (published files have none of it).
            info = {k: saved[k].item() for k in ("count", "source", "network", "resize") if k in saved.files}
    except InvalidInput:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise InvalidInput(f"{key}: {path} is not a readable .npz of reference statistics ({err})") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise InvalidInput(f"{key}: {path}: mu {mu.shape} and sigma {sigma.shape} should be (D,) and (D, D)")
    if mu.shape != (int(FEATURES),):
        raise InvalidInput(f"{key}: {path}: {len(mu)}-d statistics; Inception-v3's pool features are {FEATURES}-d")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise InvalidInput(f"{key}: {path}: mu or sigma holds non-finite values")

    for name, ours in (("network", NETWORK), ("resize", RESIZE)):
        if name in info and info[name] != ours:
            raise InvalidInput(f"{key}: {path} was made with {name} {info[name]!r}, not {ours!r}: not comparable")
    return {"mu": mu, "sigma": sigma, **info}


def inception(weights: str | Path | None, device: torch.device):
    """The FID network as a torch-fidelity extractor module on ``device`` (weights checked; never downloaded)."""

    return build(inception_extractor(weights), device)  # MissingWeights (exit 1) saying how to install it


def features(extractor, batches: Iterable[torch.Tensor]) -> np.ndarray:
    """Inception pool features (N, 2048) of uint8 image batches (B×3×H×W, any size: resized to 299)."""

    return extract(extractor, batches).numpy()


def statistics(features_ND: np.ndarray) -> dict[str, np.ndarray]:
    """mu and sigma as torch-fidelity computes them (``fid_features_to_statistics``), then as float64 (the dtype of
    published reference statistics; torch-fidelity's formula needs both sides alike)."""

    stats = fid_features_to_statistics(torch.from_numpy(features_ND))
    return {"mu": stats["mu"].astype(np.float64), "sigma": stats["sigma"].astype(np.float64)}


def frechet_distance(stats: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """FID between two sets of statistics: torch-fidelity's own formula (``fid_statistics_to_metric``)."""

    return float(fid_statistics_to_metric(stats, reference, verbose=False)[KEY_METRIC_FID])


def write_statistics(path: str | Path, stats: dict[str, np.ndarray], count: int, source: str) -> None:
    """A reference statistics file, written atomically: ``mu``, ``sigma``, the image ``count``, the ``source``
    images, and the ``network`` and ``resize`` that made the features (FID against it needs the same)."""
    with atomic.writing(path) as tmp, open(tmp, "wb") as f:
        info = {"count": np.int64(count), "source": source, "network": NETWORK, "resize": RESIZE}
        np.savez(f, mu=stats["mu"], sigma=stats["sigma"], **info)


# ---------------------------------------------------------------------------------------------------------------
# ADM's samples.npz


def write_adm_npz(path: Path, chunks: Iterable[np.ndarray], shape: tuple[int, int, int, int], labels_N) -> None:
    """``arr_0`` (uint8 N×H×W×3, streamed chunk by chunk: 50 000 images at 256² are 9.8 GB) and ``arr_1``
    (int64 labels), uncompressed as ``np.savez`` writes them, with fixed member dates. Written atomically."""
    with atomic.writing(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open(zipfile.ZipInfo("arr_0.npy", _ZIP_DATE), "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": shape})
            written = 0
            for chunk_NHW3 in chunks:
                if chunk_NHW3.dtype != np.uint8 or chunk_NHW3.shape[1:] != shape[1:]:
                    raise ValueError(f"chunk {chunk_NHW3.dtype} {chunk_NHW3.shape} does not fit arr_0 {shape}")
                member.write(np.ascontiguousarray(chunk_NHW3).tobytes())
                written += len(chunk_NHW3)
            if written != shape[0]:
                raise ValueError(f"{written} images written for arr_0 of {shape[0]}")
        with archive.open(zipfile.ZipInfo("arr_1.npy", _ZIP_DATE), "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.asarray(labels_N, dtype=np.int64))


# ---------------------------------------------------------------------------------------------------------------
# The stage


def sample_fid(
    cfg: SampleFidConfig,
    sampling,
    reference_stats: str | None,
    inception_weights: str | None,
    paths: SampleFidPaths,
    progress: Progress | None = None,
) -> dict[str, Any] | None:
    """Draw ``cfg.per_class`` images of every class into ``paths.out`` and measure their FID against
    ``reference_stats`` (when given); return the metrics with the recipe (rank 0; other ranks return None)."""

    progress = progress or Silent()
    device = resolve_device(cfg.device)
    dist = init_data_parallel(device)
    reference = load_reference_stats(reference_stats) if reference_stats else None
    if reference is not None:
        # On every rank, before sampling: a missing file is named with where to put it, a pickled one refused.
        inception_extractor(inception_weights)
    stem, weights = sampling_stem(paths.transformer, sampling.weights)
    model, config = load_transformer(stem, device)
    tokenizer_stem = Path(config["tokenizer"])
    tokenizer, tokenizer_config = load_tokenizer(tokenizer_stem, device)
    classes = config.get("classes") or [str(i) for i in range(config["num_classes"])]
    labels_N = torch.arange(len(classes)).repeat_interleave(cfg.per_class)
    chunks = chunk_labels(labels_N, cfg.batch_size)
    side = tokenizer_config["resolution"]
    recipe = {
        "images": len(labels_N),
        "per_class": cfg.per_class,
        "classes": len(classes),
        "resolution": side,
        "sampling": dataclasses.asdict(sampling) | {"weights": weights, "batch_size": cfg.batch_size},
        # The average's decay when the average is what was sampled (its saved config records it).
        **({"ema_decay": config["ema_decay"]} if weights == "ema" else {}),
        "transformer": str(stem),
        "tokenizer": str(tokenizer_stem),
    }
    inputs = [atomic.files_fingerprint(p.parent) for p in (stem, tokenizer_stem)]
    work = open_resumable(paths.out, atomic.fingerprint(recipe, inputs), dist)
    for folder in ("images", "chunks"):
        work.path(folder).mkdir(exist_ok=True)
    mine = todo_share(range(len(chunks)), lambda i: work.done(_marker(i)), dist)
    progress.start(f"sample-fid ({len(labels_N)} images)", sum(len(chunks[i]) for i in mine), unit="images")
    for i in mine:
        img_uint8_B3HW = to_uint8(sample_chunk(model, tokenizer, chunks[i], sampling, i).images_N3HW)
        names = []
        for offset, (image_3HW, label) in enumerate(zip(img_uint8_B3HW, chunks[i].tolist(), strict=True)):
            names.append(f"images/{i * cfg.batch_size + offset:06d}_{label}.png")
            atomic.write_bytes(work.path(names[-1]), shards.encode_png(image_3HW.permute(1, 2, 0).numpy()))
        atomic.write_json(work.path(_marker(i)), {"chunk": i, "images": names})  # the chunk is done
        progress.advance(len(names))
    barrier(dist)
    if not dist.is_main:
        return None
    extractor = inception(inception_weights, device) if reference is not None else None

    def chunk_images() -> Iterator[np.ndarray]:
        for i in range(len(chunks)):
            names = json.loads(work.path(_marker(i)).read_text())["images"]
            yield np.stack([shards.decode_png(work.path(name).read_bytes()) for name in names])

    feature_batches: list[np.ndarray] = []

    def measured(images: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        for img_uint8_BHW3 in images:
            if extractor is not None:
                img_uint8_B3HW = torch.from_numpy(img_uint8_BHW3).permute(0, 3, 1, 2)
                feature_batches.append(features(extractor, batched(img_uint8_B3HW, cfg.feature_batch_size)))
            yield img_uint8_BHW3

    write_adm_npz(work.path("samples.npz"), measured(chunk_images()), (len(labels_N), side, side, 3), labels_N)
    metrics: dict[str, Any] = {}
    if reference is not None:  # the FID, then what it was measured on (first in the file and in `dvc exp show`)
        metrics["fid_inception"] = frechet_distance(statistics(np.concatenate(feature_batches)), reference)
        metrics |= {"fid_samples": len(labels_N), "reference_stats": str(reference_stats)}
        metrics |= {f"reference_{k}": reference[k] for k in ("count", "source") if k in reference}
        metrics |= {"network": NETWORK, "resize": RESIZE}
    metrics |= recipe
    for marker in work.path("chunks").iterdir():
        marker.unlink()
    work.path("chunks").rmdir()
    atomic.write_json(work.path("recipe.json"), metrics)
    work.finish()
    atomic.write_json(paths.metrics, metrics)
    return metrics


def _marker(chunk: int) -> str:
    return f"chunks/{chunk:06d}.json"


def shard_images(urls: list[str]) -> Iterator[torch.Tensor]:
    """The uint8 3×H×W images of image shards (e.g. a val or train split), in shard order."""
    for raw in shards.read_samples(urls):
        yield shards.decoded(raw, decode_labelled)[0]


def folder_images(root: str | Path) -> tuple[list[Path], Iterator[torch.Tensor]]:
    """The image files under ``root`` (an ImageFolder tree: ``<class>/<file>``) in sorted path order, and their
    uint8 3×H×W pixels decoded as the shard stage decodes them. An unreadable file, or one whose size differs from
    the first's, is ``InvalidInput`` naming it: reference statistics are of images at the samples' size, so a tree
    of mixed sizes (an uncropped ImageNet folder) must be cropped and resized as the shard stage does first."""
    suffixes = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
    paths = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    if not paths:
        raise InvalidInput(f"{root}: no image files ({', '.join(sorted(suffixes))}) under it")

    def decode() -> Iterator[torch.Tensor]:
        size = None
        for path in paths:
            rgb = decode_rgb(path.read_bytes())
            if rgb is None:
                raise InvalidInput(f"{path}: not a readable image")
            size = size or (rgb.shape[:2], path)
            if rgb.shape[:2] != size[0]:
                raise InvalidInput(
                    f"{path}: {rgb.shape[1]}×{rgb.shape[0]} pixels, {size[1]} {size[0][1]}×{size[0][0]}: reference "
                    "statistics need images of one size (crop and resize them as the shard stage does first)"
                )
            yield torch.from_numpy(rgb).permute(2, 0, 1)

    return paths, decode()


def reference_features(
    images: Iterable[torch.Tensor],
    inception_weights: str | None,
    device: torch.device,
    batch_size: int = 64,
    work: atomic.ResumableDir | None = None,
    chunk_size: int = 1024,
    progress: Progress | None = None,
    total: int | None = None,
) -> np.ndarray:
    """(N, 2048) Inception features of uint8 3×H×W images (batched; images of one batch must share a size).

    With ``work``, the features of every ``chunk_size`` images are saved there as they are done, so a killed run,
    rerun with the same work directory, computes only the chunks it lacks (the images of a done chunk are read and
    skipped, not measured again): 50 000 images are hours of a small CPU."""
    progress = progress or Silent()
    extractor = inception(inception_weights, device)
    chunks: list[np.ndarray] = []

    def measured(chunk: list[torch.Tensor]) -> np.ndarray:
        return features(extractor, (torch.stack(chunk[i : i + batch_size]) for i in range(0, len(chunk), batch_size)))

    progress.start("Inception features", total, unit="images")
    chunk: list[torch.Tensor] = []
    for img_uint8_3HW in itertools.chain(images, [None]):
        if img_uint8_3HW is not None:
            chunk.append(img_uint8_3HW)
            if len(chunk) < chunk_size:
                continue
        if not chunk:
            break
        name = f"features-{len(chunks):06d}.npy"
        if work is not None and work.done(name):
            chunks.append(np.load(work.path(name), allow_pickle=False))
        else:
            chunks.append(measured(chunk).astype(np.float32))
            if work is not None:
                with atomic.writing(work.path(name)) as tmp, open(tmp, "wb") as f:
                    np.save(f, chunks[-1])
        progress.advance(len(chunk))
        chunk = []
    if not chunks:
        raise InvalidInput("no images to measure")
    return np.concatenate(chunks)
