"""The train_tokenizer stage: the main tokenizer and, for Figure 7, the same budget spent on VAR's and a vanilla
VQ-VAE; each trained with ``TokenizerTask`` (resuming from its checkpoints), saved, measured on val, drawn."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from pipeline import atomic
from pipeline.config import Field, InvalidInput, section
from pipeline.data.decomposed import decode_training_sample, split_shards
from pipeline.data.labelled import highres_loaders
from pipeline.data.loader import ShardLoader
from pipeline.evaluation.tokenizer import evaluate_tokenizer, highres_psnr, psnr
from pipeline.models.lpips import load_lpips
from pipeline.models.tokenizer import Tokenizer, TokenizerModelConfig, init_tokenizer_from, save_tokenizer
from pipeline.models.weights import MissingWeights, init_fingerprint
from pipeline.progress import Progress
from pipeline.runtime import dist_from_env, resolve_device
from pipeline.training.rfid import RfidConfig, RfidMeter, RfidTracking
from pipeline.training.tokenizer_training import TokenizerLossConfig, TokenizerTask
from pipeline.training.train import RunPaths, TrainConfig, shard_training_loader, train


@section
class TokenizerConfig:
    model: TokenizerModelConfig = Field(default_factory=TokenizerModelConfig, description="Architecture.")
    quantize: Literal["vq", "continuous"] = Field(
        "vq",
        description="vq: every map's tokens are codes of the codebook (VAR, CART); continuous: no codebook, a map's "
        "tokens are its area-downsampled residual itself, and all maps compose to f exactly (the transformer then "
        "needs transformer.head diffusion).",
    )
    loss: TokenizerLossConfig = Field(default_factory=TokenizerLossConfig, description="Loss weights (eq. 6).")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(lr=1e-3, beta1=0.5, beta2=0.9), description="Optimisation."
    )
    compare: bool = Field(
        True,
        description="Also train a single-scale VQ-VAE and VAR's multi-scale VQ-VAE (order 0) with the same budget, "
        "for the Figure-7 comparison.",
    )
    eval_images: int = Field(256, ge=1, description="Val images used for the reconstruction metrics.")
    rfid: RfidConfig = Field(
        default_factory=RfidConfig,
        description="Training until the rFID (Inception FID of the val reconstructions) stops improving: the best "
        "weights are saved (docs/pipeline.md).",
    )
    init_from: str | None = Field(
        None,
        description="Stem of a saved tokenizer (e.g. one `cart import-var` wrote) to start every variant from: "
        "encoder, decoder, quant convs, codebook and φ are copied (the architecture must match; any order). "
        "The codebook is then kept, not re-drawn from data.",
    )
    frozen: bool = Field(
        False,
        description="Keep init_from's weights as they are, no training (VAR trains its transformer on a frozen "
        "VQVAE; a CART tokenizer of any order is defined by the same encoder, codebook and decoder).",
    )

    def __post_init__(self):
        if self.frozen and not self.init_from:
            raise ValueError("tokenizer.frozen keeps the weights of tokenizer.init_from, which is not set")


@dataclass(frozen=True)
class TokenizerPaths:
    data: Path  # data/decomposed
    shards: Path  # data/shards: the real highres_scale× images (hr.png) of the multi-scale term
    models: Path  # models/tokenizer: tokenizer.{safetensors,json}, variants/<name>.*
    checkpoints: Path  # persist: one sub-directory per variant
    live: Path  # persist: dvclive logs, one sub-directory per variant
    metrics: Path  # metrics/tokenizer.json
    reports: Path  # reports/tokenizer: figure7.png, reconstructions.png, depth/<variant>.json


@dataclass(frozen=True)
class Variant:
    name: str
    model: TokenizerModelConfig
    order: int

    @property
    def is_main(self) -> bool:
        return self.name == "tokenizer"


def variants(cfg: TokenizerConfig, order: int) -> list[Variant]:
    """The tokenizer the pipeline uses (order n) and, with ``compare``, VAR (order 0) and a one-map VQ-VAE."""
    found = [Variant("tokenizer", cfg.model, order)]
    if cfg.compare:
        if order > 0:
            found.append(Variant("var", cfg.model, 0))
        found.append(Variant("vqvae", dataclasses.replace(cfg.model, scales=[cfg.model.scales[-1]]), 0))
    return found


def train_tokenizers(
    cfg: TokenizerConfig,
    order: int,
    resolution: int,
    paths: TokenizerPaths,
    progress: Progress | None = None,
    log: Callable[[str], None] = lambda message: None,
    inception_weights: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Train every variant (resuming from matching checkpoints), save weights, evaluate, draw the figures.

    With ``cfg.init_from`` every variant starts from that tokenizer; ``log`` hears what was copied. With
    ``cfg.rfid.every`` every variant is measured by rFID (the FID network from ``inception_weights``, as
    ``evaluate.inception_weights``) while it trains, stops early by ``cfg.rfid.patience``, and its best weights
    are saved."""
    perceptual = load_lpips(cfg.loss.lpips_net, cfg.loss.lpips_weights) if cfg.loss.lambda_perceptual > 0 else None
    manifest = json.loads((paths.data / "manifest.json").read_text())
    if manifest["order"] != order:
        raise ValueError(
            f"{paths.data} holds order-{manifest['order']} decompositions but decompose.order = {order}: "
            "rerun the decompose stage"
        )
    train_urls, val_urls = split_shards(paths.data / "train"), split_shards(paths.data / "val")
    if not val_urls:
        raise FileNotFoundError(f"{paths.data / 'val'}: no val shards (the tokenizer is measured on val)")
    count = manifest["splits"]["train"]["count"]
    train_loader, per_epoch = shard_training_loader(train_urls, decode_training_sample, count, cfg.train)
    val_loader = ShardLoader(val_urls, decode_training_sample, batch_size=64, shuffle=False)
    highres = highres_term_loaders(paths.shards, cfg)
    meter = None
    if cfg.rfid.every and not cfg.frozen and dist_from_env().is_main:  # before training: a bad file stops it now
        meter = RfidMeter(
            cfg.rfid,
            inception_weights,
            lambda: iter(val_loader.epoch(0)),
            manifest["splits"]["val"]["count"],
            paths.data / "val",
            paths.checkpoints / "rfid-reference",
            resolve_device(cfg.train.device),
        )
    inputs = atomic.files_fingerprint(paths.data) + init_fingerprint(cfg.init_from)
    if highres is not None:
        inputs += atomic.files_fingerprint(paths.shards)
    results: dict[str, dict[str, Any]] = {}
    rfid_results: dict[str, dict[str, Any]] = {}
    models: dict[str, Tokenizer] = {}
    for variant in variants(cfg, order):
        torch.manual_seed(cfg.train.seed)
        model = Tokenizer(variant.model, variant.order, cfg.quantize)
        if cfg.init_from:
            copied = init_tokenizer_from(model, cfg.init_from)
            log(f"{variant.name}: copied from {cfg.init_from}: {', '.join(copied)}")
        if cfg.frozen:
            log(f"{variant.name}: frozen (tokenizer.frozen), not trained")
            models[variant.name] = model.eval()
            continue
        rfid = RfidTracking(cfg.rfid, cfg.train.steps, model, meter) if cfg.rfid.every else None
        task = TokenizerTask(
            model,
            cfg.loss,
            lambda: iter(val_loader.epoch(0)),
            cfg.eval_images,
            perceptual,
            codes_from_data=cfg.loss.init_codes_from_data and not cfg.init_from,
            highres_loader=None if highres is None else highres[0],
            rfid=rfid,
        )
        run = RunPaths(paths.checkpoints / variant.name, paths.live / variant.name)
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("compare", "eval_images")}
        fingerprint = atomic.fingerprint(
            variant.name, variant.order, dataclasses.asdict(variant.model), settings, inputs
        )
        train(task, cfg.train, train_loader.epoch, run, fingerprint, batches_per_epoch=per_epoch, progress=progress)
        if rfid is not None:  # what the stage saves: the weights of the best rFID, not the last ones
            model.load_state_dict(rfid.state.best.state_dict())
            rfid_results[variant.name] = rfid.summary()
            log(f"{variant.name}: rFID {rfid_results[variant.name]['rfid_inception']:.2f} at step "
                f"{rfid_results[variant.name]['rfid_step']} (the saved weights)")  # fmt: skip
        models[variant.name] = model.eval()
    if not dist_from_env().is_main:
        return results
    if perceptual is None:
        perceptual = _lpips_if_available(cfg.loss)
    for variant in variants(cfg, order):
        model = models[variant.name]
        stem = paths.models / ("tokenizer" if variant.is_main else f"variants/{variant.name}")
        save_tokenizer(stem, model, resolution)
        results[variant.name] = evaluate_tokenizer(model, iter(val_loader.epoch(0)), cfg.eval_images, perceptual)
        if highres is not None:
            results[variant.name]["psnr_highres"] = highres_psnr(model, iter(highres[1].epoch(0)), cfg.eval_images)
        results[variant.name] |= rfid_results.get(variant.name, {})
        results[variant.name]["order"] = variant.order
        results[variant.name]["maps"] = model.layout.num_maps
    _report(results, models["tokenizer"], val_loader, paths)
    return results


def highres_term_loaders(shards_dir: Path, cfg: TokenizerConfig):
    """((train loader, batches per epoch), val loader) of the real highres_scale× images in ``data/shards`` for the
    highres term, or None when the shards hold none or the term is off."""
    if cfg.loss.lambda_highres == 0:
        return None
    manifest_path = shards_dir / "manifest.json"
    if not manifest_path.is_file():
        # Training on without the term would give other weights than the params ask for, silently.
        raise InvalidInput(
            f"{manifest_path} is missing: tokenizer.loss.lambda_highres > 0 trains on the real high-resolution "
            "images of data/shards (run `cart shard`, or set tokenizer.loss.lambda_highres: 0)"
        )
    return highres_loaders(shards_dir, cfg.loss.highres_batch, cfg.train.seed, cfg.train.shuffle_buffer)


def _lpips_if_available(cfg: TokenizerLossConfig) -> nn.Module | None:
    try:
        return load_lpips(cfg.lpips_net, cfg.lpips_weights)
    except MissingWeights:
        return None  # LPIPS is reported when its weights are present; MSE and PSNR always are


def _report(results: dict[str, dict[str, Any]], main: Tokenizer, val_loader, paths: TokenizerPaths) -> None:
    # lazy: pipeline.params imports this module, and matplotlib would slow every stage's start (bench/RESULTS.md)
    from pipeline.evaluation.figures import depth_curves_figure, prefix_decodes_figure

    scalars = {name: {k: v for k, v in r.items() if not isinstance(v, list)} for name, r in results.items()}
    atomic.write_json(paths.metrics, scalars)
    for name, r in results.items():  # one file per variant: the curves of the Figure-7 DVC plot
        depth = [{"depth": m + 1, "mse": mse, "psnr": psnr(mse)} for m, mse in enumerate(r["mse_depth"])]
        atomic.write_json(paths.reports / "depth" / f"{name}.json", depth)
    depth_curves_figure(
        {name: r["mse_depth"] for name, r in results.items()},
        paths.reports / "figure7.png",
        title="Reconstruction MSE against quantisation depth (val)",
    )
    device = next(main.parameters()).device
    image, bases, _ = next(iter(val_loader.epoch(0)))
    prefix_decodes_figure(main, image[:8].to(device), bases[:8].to(device), paths.reports / "reconstructions.png")
