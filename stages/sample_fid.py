"""`cart sample-fid`: the field's FID protocol (N images per class, ADM's samples.npz, FID against reference
statistics); `cart reference-stats`: such statistics of image shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import ParamsOption, console, load, one_run_at_a_time, progress, reports_errors, summary

MODEL, OUT, METRICS = Path("models/transformer/transformer"), Path("samples/fid"), Path("metrics/fid.json")


@reports_errors
@one_run_at_a_time("sample-fid")
def command(
    params: ParamsOption = Path("params.yaml"),
    checkpoint: Annotated[
        Path, typer.Option(help="Transformer weights: the stem of <stem>.safetensors + <stem>.json.")
    ] = MODEL,
    out: Annotated[Path, typer.Option(help="Where the PNGs, samples.npz and recipe.json go.")] = OUT,
    metrics: Annotated[Path, typer.Option(help="The FID and the sampling recipe, as JSON.")] = METRICS,
) -> None:
    """Sample `sample_fid.per_class` images of every class and measure their FID against `evaluate.reference_stats`.

    Writes `samples/fid/images/*.png`, `samples/fid/samples.npz` (`arr_0` uint8 N×H×W×3, `arr_1` labels: what
    OpenAI's ADM evaluator reads) and `metrics/fid.json`: `fid_inception` (torch-fidelity's Inception-v3, read from
    disk, never downloaded) beside the recipe (guidance, top-k, top-p, seed, EMA or raw weights). Sampling and
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
        rows.append(("FID (Inception)", f"{result['fid_inception']:.3f} against {result['reference_stats']}"))
    else:
        rows.append(("FID", "not computed: evaluate.reference_stats is null (the samples are written)"))
    summary("sample-fid", rows)


@reports_errors
def reference_stats_command(
    params: ParamsOption = Path("params.yaml"),
    split: Annotated[
        list[Path] | None, typer.Option(help="Image shards (a split of `cart shard`); repeat for several.")
    ] = None,
    out: Annotated[Path, typer.Option(help="The .npz to write (mu, sigma, count).")] = Path("reference_stats.npz"),
) -> None:
    """Write the Inception-v3 statistics (mu, sigma) of image shards: reference statistics for `cart sample-fid`.

    Default split: `data/shards/val`. Inception's weights come from `evaluate.inception_weights` or torch-fidelity's
    cache; they are never downloaded. For ImageNet prefer the published files (ADM's
    `VIRTUAL_imagenet256_labeled.npz`): numbers against them compare with the papers'.
    """
    from pipeline.data.decomposed import split_shards
    from pipeline.evaluation.sample_fid import reference_statistics, write_statistics
    from pipeline.runtime import resolve_device

    p = load(params)
    urls = [url for directory in split or [Path("data/shards/val")] for url in split_shards(directory)]
    if not urls:
        raise FileNotFoundError(f"no shards (shard-*.tar) in {', '.join(map(str, split or ['data/shards/val']))}")
    stats, count = reference_statistics(urls, p.evaluate.inception_weights, resolve_device(p.sample_fid.device))
    write_statistics(out, stats, count)
    console.print(f"wrote {out}: Inception statistics of {count} images")
