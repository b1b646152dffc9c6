"""The `evaluate` stage: sample, decode, measure against val, draw the figures.

Every number comes with its bounds, measured the same way: the tokenizer's reconstructions of val (the
ceiling: the generator cannot beat its own decoder) and the samples of an untrained transformer (the floor).
Metrics are named after the network that produced them (``*_ref`` for the reference classifier, ``*_inception``
for Inception-v3 when its weights are on disk); numbers from different networks are never mixed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline import atomic
from pipeline.config import Field, section
from pipeline.decomposed import split_shards
from pipeline.progress import Progress, Silent
from pipeline.runtime import init_data_parallel, resolve_device


@section
class EvaluateConfig:
    samples_per_class: int = Field(64, ge=2, description="Images generated per class for the metrics.")
    batch_size: int = Field(64, ge=1, description="Images sampled together.")
    inception_weights: str | None = Field(
        None,
        description="Path of torch-fidelity's Inception-v3 weights (weights-inception-2015-12-05-6726825d.pth). "
        "Null: use torch-fidelity's cache if the file is there; without it only *_ref metrics are computed.",
    )
    reference_stats: str | None = Field(
        None,
        description="Reference statistics for `cart sample-fid`: an .npz with Inception-v3's mu (2048) and sigma "
        "(2048×2048), e.g. ADM's VIRTUAL_imagenet256_labeled.npz or MAR's adm_in256_stats.npz, or one `cart "
        "reference-stats` wrote. Needs the Inception weights (inception_weights). Null: sample-fid writes the "
        "samples and no FID.",
    )
    highres_scale: int = Field(2, ge=0, le=4, description="Also generate at this multiple of the resolution (0: skip).")
    highres_per_class: int = Field(8, ge=1, description="Images per class generated at highres_scale.")
    figure_per_class: int = Field(8, ge=1, description="Samples per class in the sample grid figure.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when visible.")


@dataclass(frozen=True)
class EvaluatePaths:
    shards: Path  # data/shards (val images)
    tokens: Path  # data/tokens (val tokens: the reconstruction ceiling)
    tokenizer: Path  # stem
    transformer: Path  # stem
    evaluator: Path  # stem of the reference classifier
    metrics: Path  # metrics/eval.json
    reports: Path  # reports/evaluate
    speed: Path  # metrics/sampling_speed.json: wall-clock figures, apart so that eval.json is reproducible


def to_uint8(images_N3HW: torch.Tensor) -> torch.Tensor:
    return (images_N3HW.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def load_val_images(shards_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(img_uint8_N3HW, labels_N) of the val split."""
    from pipeline.evaluator import decode_labelled
    from pipeline.shards import decoded, read_samples

    urls = split_shards(shards_dir / "val")
    if not urls:
        raise FileNotFoundError(f"{shards_dir / 'val'}: no val shards to compare the samples with")
    pairs = [decoded(raw, decode_labelled) for raw in read_samples(urls)]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def evaluate(
    cfg: EvaluateConfig, sampling, paths: EvaluatePaths, progress: Progress | None = None
) -> dict[str, Any] | None:
    """Measure the trained transformer, its ceiling and its floor; write metrics/eval.json and the figures.

    Under torchrun every rank samples its share; rank 0 measures, writes and returns the metrics (others: None).
    """
    from pipeline.evaluator import load_evaluator
    from pipeline.highres import generate_highres, upsample
    from pipeline.metrics import (
        class_consistency,
        fidelity_metrics,
        inception_available,
        inception_extractor,
        reference_extractor,
    )
    from pipeline.sampling import sample_sharded
    from pipeline.shards import decoded, read_samples
    from pipeline.tokenizer import load_tokenizer
    from pipeline.tokens import decode_token_sample, layout_from_manifest, split_maps
    from pipeline.transformer import load_transformer, sampling_stem
    from pipeline.transformer_training import build_model

    progress = progress or Silent()
    device = resolve_device(cfg.device)
    dist = init_data_parallel(device)
    extractors = [reference_extractor(paths.evaluator)]  # first: a missing one names the stage to run
    stem, weights = sampling_stem(paths.transformer, sampling.weights)
    model, config = load_transformer(stem, device)
    tokenizer, _ = load_tokenizer(paths.tokenizer, device)
    manifest = json.loads((paths.tokens / "manifest.json").read_text())
    classes = config["classes"]
    labels = torch.arange(len(classes)).repeat_interleave(cfg.samples_per_class)

    steps = 4 + (cfg.highres_scale > 1)
    progress.start("evaluate", steps, unit="parts")
    # Sampling takes the time: under torchrun each rank draws its share of the batches (each batch with its own
    # seed, so the images do not depend on the number of ranks) and rank 0 measures.
    start = time.perf_counter()
    samples = sample_sharded(model, tokenizer, labels, sampling, cfg.batch_size, dist)
    # Wall time of sampling and decoding (a cost figure beside FID; it moves with the machine's load).
    sampling_images_per_s = len(labels) / (time.perf_counter() - start)
    # The floor: the same architecture, untrained, sampled the same way.
    untrained = build_model(model.cfg, manifest, seed=0).to(device).eval()
    floor = sample_sharded(untrained, tokenizer, labels, sampling, cfg.batch_size, dist)
    if not dist.is_main:
        return None
    ref_net = load_evaluator(paths.evaluator, device)
    if inception_available(cfg.inception_weights) is not None:
        extractors.append(inception_extractor(cfg.inception_weights))
    val_uint8, _ = load_val_images(paths.shards)

    def measure(images_uint8: torch.Tensor, prefix: str, labels_N: torch.Tensor | None = None) -> dict[str, float]:
        out = {}
        for extractor in extractors:
            out |= {f"{prefix}{k}": v for k, v in fidelity_metrics(images_uint8, val_uint8, extractor, device).items()}
        if labels_N is not None:
            out[f"{prefix}class_consistency_ref"] = class_consistency(ref_net, images_uint8, labels_N)
        return out

    metrics = measure(to_uint8(samples.images_N3HW), "", labels)
    progress.advance()

    # The ceiling: val images through the tokenizer (their stored tokens, decoded).
    val_tokens = read_samples(split_shards(paths.tokens / "val"))
    idx_NL = torch.stack([decoded(raw, decode_token_sample)[0] for raw in val_tokens])
    recon = torch.cat(
        [
            tokenizer.reconstruct(split_maps(idx_NL[i : i + 256].to(device), layout_from_manifest(manifest))).cpu()
            for i in range(0, len(idx_NL), 256)
        ]
    )
    metrics |= measure(to_uint8(recon), "reconstruction_")
    progress.advance()

    metrics |= measure(to_uint8(floor.images_N3HW), "untrained_", labels)
    metrics["chance_class_consistency"] = 1 / len(classes)
    progress.advance()

    if cfg.highres_scale > 1:
        s = cfg.highres_scale
        hr_labels = torch.arange(len(classes)).repeat_interleave(cfg.highres_per_class).to(device)
        highres = generate_highres(model, tokenizer, hr_labels, sampling, s)
        val_up = to_uint8(upsample(val_uint8.float() / 255, s))
        for name, images in (("highres", highres.images_N3HW), ("highres_bilinear", upsample(highres.plain_N3HW, s))):
            ref = fidelity_metrics(to_uint8(images), val_up, extractors[0], device)
            metrics[f"{name}_fid_ref"] = ref["fid_ref"]
        metrics["highres_scale"] = s
        progress.advance()

    _figures(model, tokenizer, samples, classes, cfg, sampling, paths.reports, device)
    progress.advance()
    metrics["samples"] = len(labels)
    metrics["val_images"] = len(val_uint8)
    metrics["order"] = model.layout.order
    metrics["ema_weights"] = int(weights == "ema")  # sampled from the moving average of the weights
    metrics |= {"tokens": model.layout.num_tokens, "maps": model.layout.num_maps}
    atomic.write_json(paths.metrics, metrics)
    atomic.write_json(paths.speed, {"sampling_images_per_s": sampling_images_per_s, "device": str(device)})
    return metrics


def _figures(model, tokenizer, samples, classes, cfg: EvaluateConfig, sampling, reports: Path, device) -> None:
    """Sample grid per class, the Figure-1 strip, the decomposition of a generated image, Figure 6."""
    from pipeline.decompose import DecomposeConfig, decompose
    from pipeline.figures import decomposition_figure, image_grid, labelled_rows
    from pipeline.highres import highres_figure
    from pipeline.sampling import sample_images

    reports.mkdir(parents=True, exist_ok=True)
    per = cfg.samples_per_class
    k = min(cfg.figure_per_class, per)
    rows = [(name, samples.images_N3HW[c * per : c * per + k]) for c, name in enumerate(classes)]
    labelled_rows(rows, reports / "samples.png", title=f"Samples per class (guidance {sampling.guidance:g})")

    strip_labels = torch.arange(min(len(classes), 4))
    strip = sample_images(model, tokenizer, strip_labels, sampling, progressive=True)
    titles = [f"{m.side}²" if m.is_base else f"+D{m.level}" for m in model.layout.maps]
    image_grid(
        [(t, strip.prefixes_NM3HW[:, m]) for m, t in enumerate(titles)],
        reports / "progressive.png",
        title="Decoded after each token map: base scales, then details D_n … D_1 (Figure 1)",
    )

    order = max(model.layout.order, 1)
    generated = samples.images_N3HW[:1]
    parts = decompose(generated, DecomposeConfig(order=order, outer_tol=1e-3, cg_tol=1e-4))
    decomposition_figure(
        generated[0],
        parts.bases_NKCHW[0],
        parts.edges_NKHW[0],
        reports / "generated_decomposition.png",
        title=f"Decomposition of a generated {classes[0]}",
    )
    if cfg.highres_scale > 1:
        labels = torch.arange(min(len(classes), 4))
        highres_figure(model, tokenizer, labels, sampling, cfg.highres_scale, reports / "highres.png")
