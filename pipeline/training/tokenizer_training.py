"""Training the tokenizer (paper eq. 6) with the shared loop, and measuring it (paper Figure 7).

L = ‖I − Î‖² + VQ(β) + λ_p·LPIPS(I, Î) + λ_G·w·GAN(Î) + λ_prefix·Σ_k ‖B_k − D(f̂_{≤B_k})‖² [+ λ_latent·mean f²]

where the VQ term is the codebook and commitment loss of every map (continuous tokens: the same terms train φ and
pull the encoder towards what the coarse maps express), w is VQGAN's adaptive weight (the ratio of the
reconstruction and adversarial gradient norms at the decoder's last layer), the prefix term makes every
component prefix decode to its base, so that next-detail prefixes are real images, and the last term
(continuous tokens only) bounds the latent's scale.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import atomic
from pipeline.config import Field, InvalidInput, section
from pipeline.models.convnets import PatchDiscriminator, norm
from pipeline.models.tokenizer import Tokenizer, TokenizerModelConfig, save_tokenizer
from pipeline.progress import Progress
from pipeline.training.train import Phase, TrainConfig, adamw, decay_groups

# torchvision's file names for the LPIPS backbones, as torch.hub caches them.
LPIPS_BACKBONE_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


@section
class TokenizerLossConfig:
    beta: float = Field(0.25, ge=0, description="β: weight of the commitment term.")
    lambda_perceptual: float = Field(
        0.0, ge=0, description="λ_p: weight of the LPIPS term (needs the backbone weights; 0 turns it off)."
    )
    lpips_net: Literal["vgg", "alex", "squeeze"] = Field("vgg", description="LPIPS backbone.")
    lpips_weights: str | None = Field(
        None,
        description="Path of the torchvision backbone weights for LPIPS; null: the torch hub cache "
        "($TORCH_HOME/hub/checkpoints/<torchvision file name>).",
    )
    lambda_gan: float = Field(0.0, ge=0, description="λ_G: weight of the adversarial term (0 turns it off).")
    gan_start_step: int = Field(0, ge=0, description="Step at which the discriminator and its loss switch on.")
    disc_channels: int = Field(64, ge=4, description="Width of the patch discriminator.")
    disc_layers: int = Field(3, ge=1, description="Strided layers of the patch discriminator.")
    lambda_prefix: float = Field(1.0, ge=0, description="Weight of the term that makes prefix decodes match B_n … B_1.")
    prefix_samples: int = Field(
        1,
        ge=0,
        description="Prefixes decoded per step for the prefix term, drawn at random from the n (an unbiased "
        "estimate of the sum that costs one decoder pass each; n or more: all of them, every step).",
    )
    lambda_highres: float = Field(
        1.0,
        ge=0,
        description="Weight of the autoencoder term on real images at data.highres_scale × the resolution (hr.png), "
        "so that the decoder is sound at the sizes generation above the trained resolution decodes (0: off).",
    )
    highres_batch: int = Field(8, ge=1, description="Real 2× images per step that has the highres term.")
    highres_every: int = Field(4, ge=1, description="Steps between steps with the highres term.")
    restart_every: int = Field(
        50, ge=0, description="Steps between restarts of dead codes from encoder residuals (0: never)."
    )
    lambda_latent: float = Field(
        1e-3,
        ge=0,
        description="tokenizer.quantize continuous only: weight of the mean square of the encodings f_{B_k}, which "
        'keeps the latent\'s scale bounded where no codebook anchors it (docs/options.md, "Continuous tokens").',
    )
    init_codes_from_data: bool = Field(
        True,
        description="After the first step, set every code to a residual the quantiser saw (data-dependent init, "
        "as SoundStream's k-means init), so codes start at the scale of what they quantise; false: VQGAN's "
        "uniform ±1/V init only.",
    )


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


def init_tokenizer_from(model: Tokenizer, stem: str | Path) -> list[str]:
    """Copy every tensor of the tokenizer saved at ``stem`` into ``model``; return what was copied, by part.

    A tokenizer's weights do not depend on its order (that only decides how maps are laid out), so VAR's VQVAE can
    start a CART tokenizer of any order. Any missing, extra or differently shaped tensor is a ``ConfigError`` naming
    the key: a partial copy would silently train a different network than the one asked for.
    """
    from pipeline.config import ConfigError
    from pipeline.models.weights import load_init_source

    config, state = load_init_source(stem, "tokenizer.init_from")
    ours = model.state_dict()
    # GroupNorm's grouping leaves no trace in the tensors' shapes: compare it from the configs.
    source_min = config.get("model", {}).get("min_group_channels", 1)  # saved before the key: the old rule
    problems = [
        f"{stem}: {name} normalises {m.num_channels} channels in {norm(m.num_channels, source_min).num_groups} "
        f"groups, tokenizer.model in {m.num_groups}: set tokenizer.model.min_group_channels to {source_min}"
        for name, m in model.named_modules()
        if isinstance(m, nn.GroupNorm) and norm(m.num_channels, source_min).num_groups != m.num_groups
    ][:1]
    problems += [
        f"{stem}: key {k!r} has shape {tuple(state[k].shape)}, tokenizer.model needs {tuple(v.shape)}"
        for k, v in ours.items()
        if k in state and state[k].shape != v.shape
    ]
    problems += [
        f"{stem}: key {k!r} is missing (tokenizer.model needs shape {tuple(v.shape)})"
        for k, v in ours.items()
        if k not in state
    ]
    problems += [f"{stem}: key {k!r} is not in a tokenizer with this tokenizer.model" for k in state if k not in ours]
    if problems:
        raise ConfigError("tokenizer.init_from", problems[:5])
    model.load_state_dict(state)
    parts: dict[str, int] = {}
    for key in ours:
        part = key.split(".")[0]
        parts[part] = parts.get(part, 0) + 1
    return [f"{part} ({count} tensors)" for part, count in parts.items()]


class MissingWeights(FileNotFoundError):
    pass


def load_lpips(net: str, weights: str | None) -> nn.Module:
    """LPIPS with its torchvision backbone read from a local file: never downloaded.

    The small linear calibration layers ship inside the lpips wheel; the backbone is read from ``weights`` or
    from the torch hub cache, where torchvision itself would look.
    """
    import lpips
    import torchvision

    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]
    if not path.is_file():
        raise MissingWeights(
            f"LPIPS ({net}) needs torchvision's pretrained backbone weights and they cannot be downloaded here: "
            f"put {LPIPS_BACKBONE_FILES[net]} at {path} (or set tokenizer.loss.lpips_weights to its path), "
            "or set tokenizer.loss.lambda_perceptual: 0"
        )
    backbone = {"vgg": torchvision.models.vgg16, "alex": torchvision.models.alexnet}.get(
        net, torchvision.models.squeezenet1_1
    )()
    # weights_only: the restricted unpickler that reads tensors and nothing executable.
    backbone.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    with warnings.catch_warnings():  # lpips still calls torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    for slice_ in (getattr(model.net, f"slice{i}") for i in range(1, 8) if hasattr(model.net, f"slice{i}")):
        for index, layer in slice_.named_children():
            layer.load_state_dict(backbone.features[int(index)].state_dict())
    return model.eval().requires_grad_(False)


def psnr(mse: float) -> float:
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def perplexity(counts: torch.Tensor) -> float:
    p = counts.float() / counts.sum().clamp(min=1)
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


class TokenizerTask:
    """The tokenizer (and its discriminator) as the training loop sees it."""

    def __init__(
        self,
        model: Tokenizer,
        cfg: TokenizerLossConfig,
        val_batches: Callable[[], Iterator],
        eval_images: int,
        perceptual: nn.Module | None = None,
        codes_from_data: bool | None = None,
        highres_loader: tuple[Any, int] | None = None,
    ):
        self.model, self.cfg = model, cfg
        # An initialised codebook (init_from) is kept: drawing it again from residuals would throw it away.
        self.codes_from_data = cfg.init_codes_from_data if codes_from_data is None else codes_from_data
        # (ShardLoader of real highres_scale× train images, its batches per epoch), for the multi-scale term.
        self.highres_loader = highres_loader
        self._highres_stream: Iterator | None = None
        self._last_highres_mse: float | None = None
        self.val_batches, self.eval_images = val_batches, eval_images
        self.perceptual = perceptual
        self.disc = PatchDiscriminator(cfg.disc_channels, cfg.disc_layers) if cfg.lambda_gan > 0 else None
        self.net: nn.Module = model
        self.disc_net: nn.Module | None = self.disc
        # Code usage since the last restart: training state, checkpointed with the models so a resumed run
        # restarts the same codes an uninterrupted one would.
        self.counters = nn.Module()
        self.counters.register_buffer("usage", torch.zeros(model.cfg.codebook_size, dtype=torch.long))
        # Reconstructions of each micro-batch of a step, for the discriminator's phase, which reads them in order.
        self._fakes: collections.deque[torch.Tensor] = collections.deque()
        self._residuals: torch.Tensor | None = None

    def modules(self) -> dict[str, nn.Module]:
        modules = {"tokenizer": self.model, "counters": self.counters}
        return modules | ({"discriminator": self.disc} if self.disc is not None else {})

    @property
    def usage(self) -> torch.Tensor:
        return self.counters.usage

    def wrap(self, wrapped: dict[str, nn.Module]) -> None:
        self.net, self.disc_net = wrapped["tokenizer"], wrapped.get("discriminator")
        device = next(self.model.parameters()).device
        if self.perceptual is not None:
            self.perceptual.to(device)

    def phases(self, cfg: TrainConfig) -> list[Phase]:
        self.optimizer = adamw(decay_groups(self.model, cfg.weight_decay), cfg)
        phases = [Phase("tokenizer", self.optimizer, self.generator_loss, list(self.model.parameters()))]
        if self.disc is not None:
            disc_optimizer = adamw(decay_groups(self.disc, cfg.weight_decay), cfg)
            phases.append(Phase("discriminator", disc_optimizer, self.discriminator_loss, list(self.disc.parameters())))
        return phases

    def to_device(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        image, bases, _ = batch
        return image.to(device, non_blocking=True), bases.to(device, non_blocking=True)

    def gan_active(self, step: int) -> bool:
        return self.disc is not None and step >= self.cfg.gan_start_step

    def generator_loss(self, batch, step: int):
        image, bases = batch
        n = self.model.order
        chosen = sorted(torch.randperm(n)[: min(self.cfg.prefix_samples, n)].tolist()) if self.cfg.lambda_prefix else []
        highres = self._highres_batch(step, image.device)
        decoded, quantized = self.net(image, bases, self.cfg.beta, chosen + [n], autoencode=highres)
        recon = decoded[:, -1]
        rec_loss = F.mse_loss(recon, image)
        logs = {"rec_mse": rec_loss.item(), "psnr": psnr(rec_loss.item()), "vq": quantized.vq_loss.item()}
        if self.perceptual is not None and self.cfg.lambda_perceptual > 0:
            perceptual = self.perceptual(recon, image, normalize=True).mean()
            rec_loss = rec_loss + self.cfg.lambda_perceptual * perceptual
            logs["lpips"] = perceptual.item()
        loss = rec_loss + quantized.vq_loss
        if self.model.continuous:
            loss = loss + self.cfg.lambda_latent * quantized.latent_ms
            logs["latent_ms"] = quantized.latent_ms.item()
        if highres is not None:
            highres_loss = F.mse_loss(quantized.autoencoded, highres)
            loss = loss + self.cfg.lambda_highres * highres_loss
            self._last_highres_mse = highres_loss.item()
        if self._last_highres_mse is not None:  # the latest value: logged steps need not be highres steps
            logs["rec_mse_highres"] = self._last_highres_mse
        if chosen:
            # Prefix p decodes to B_{n−p}; scaled by n / |chosen| so the sampled term estimates the sum over all.
            targets = bases[:, [n - 1 - p for p in chosen]]
            prefix_loss = F.mse_loss(decoded[:, :-1], targets, reduction="none").mean((0, 2, 3, 4)).sum()
            loss = loss + self.cfg.lambda_prefix * prefix_loss * n / len(chosen)
            logs["prefix_mse"] = prefix_loss.item() / len(chosen)
        if self.gan_active(step):
            # Through the unwrapped critic: its gradients here are discarded, it trains in its own phase.
            generator = -self.disc(recon * 2 - 1).mean()
            weight = self._adaptive_weight(rec_loss, generator)
            loss = loss + self.cfg.lambda_gan * weight * generator
            logs |= {"gan_g": generator.item(), "gan_weight": float(weight)}
        if self.disc is not None:
            self._fakes.append(recon.detach())
        if not self.model.continuous:
            with torch.no_grad():
                for idx in quantized.indices:
                    self.usage.add_(torch.bincount(idx.flatten(), minlength=self.usage.numel()))
                self._residuals = quantized.residual_sample
        return loss, logs

    def _highres_batch(self, step: int, device: torch.device) -> torch.Tensor | None:
        """Real highres_scale× images in [0, 1] on every ``highres_every``-th step (None on the others, or without a
        source). The n-th such batch is the n-th of the loader's seeded stream whatever step a run resumed at."""
        if self.highres_loader is None or self.cfg.lambda_highres == 0 or step % self.cfg.highres_every:
            return None
        if self._highres_stream is None:
            from pipeline.training.train import batches_from

            loader, per_epoch = self.highres_loader
            done = -(-step // self.cfg.highres_every)  # highres batches the steps before this one drew
            self._highres_stream = batches_from(loader.epoch, per_epoch, done)
        image_uint8_B3HW, _ = next(self._highres_stream)
        return image_uint8_B3HW.to(device, non_blocking=True).float() / 255

    def _adaptive_weight(self, rec_loss: torch.Tensor, gan_loss: torch.Tensor) -> torch.Tensor:
        """VQGAN's balance: scale the adversarial term to the reconstruction term's gradient at the last layer."""
        last = self.model.decoder.last_layer
        rec_grad = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
        gan_grad = torch.autograd.grad(gan_loss, last, retain_graph=True)[0]
        return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, 1e4).detach()

    def discriminator_loss(self, batch, step: int):
        fake = self._fakes.popleft()
        if not self.gan_active(step):
            return None, {}
        image, _ = batch
        real, fake = self.disc_net(image * 2 - 1), self.disc_net(fake * 2 - 1)
        loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        return loss, {"gan_d": loss.item()}

    def after_step(self, step: int, batch) -> dict[str, float]:
        if self.model.continuous:  # no codes to start or restart
            return {}
        if step == 0 and self.codes_from_data and self._residuals is not None:
            # With VQGAN's near-zero init every latent first snaps to a handful of codes, φ(z) is almost constant,
            # the decoder learns to ignore it and the encoder collapses onto the codes: the one-map VQ-VAE never
            # left 11 dB that way. Codes drawn from the encoder's own outputs make the first decodes informative.
            everything = torch.arange(self.usage.numel(), device=self.usage.device)
            self._restart(everything)
            self.usage.zero_()
            return {"codes_restarted": float(len(everything))}
        every = self.cfg.restart_every
        if not every or (step + 1) % every:
            return {}
        usage = self.usage.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(usage)
        dead = (usage == 0).nonzero().flatten()
        used = int((usage > 0).sum())
        if len(dead) and self._residuals is not None and len(self._residuals):
            self._restart(dead)
        self.usage.zero_()
        return {"codebook_used": used / usage.numel(), "codes_restarted": float(len(dead))}

    @torch.no_grad()
    def _restart(self, dead: torch.Tensor) -> None:
        """Move dead codes onto residual vectors the quantiser actually saw, and forget their Adam moments."""
        weight = self.model.codebook.weight
        rows = len(self._residuals)
        # Distinct residuals when there are enough: two identical codes would leave one of them dead again.
        if rows >= len(dead):
            pick = torch.randperm(rows, device=weight.device)[: len(dead)]
        else:
            pick = torch.randint(rows, (len(dead),), device=weight.device)
        weight[dead] = self._residuals[pick].to(weight.dtype)
        if torch.distributed.is_initialized():
            torch.distributed.broadcast(weight, src=0)
        state = self.optimizer.state.get(weight, {})
        for slot in ("exp_avg", "exp_avg_sq"):
            if slot in state:
                state[slot][dead] = 0

    def evaluate(self) -> dict[str, float]:
        result = evaluate_tokenizer(self.model, self.val_batches(), self.eval_images)
        return {f"val/{k}": v for k, v in result.items() if isinstance(v, float)}


@torch.no_grad()
def evaluate_tokenizer(
    model: Tokenizer, batches: Iterator, max_images: int, perceptual: nn.Module | None = None
) -> dict[str, Any]:
    """Reconstruction quality at every quantisation depth (paper Figure 7) and codebook health, on val.

    ``mse_depth`` [m−1] is the MSE between I and the decode of the first m maps; ``prefix_mse`` [p] compares the
    p-th component prefix with the base it should reproduce (B_n, …, B_1). Continuous tokens have no codebook:
    ``latent_rms`` (the RMS of the image's encoding, what the latent regulariser bounds) takes its place.
    """
    model.eval()
    device = next(model.parameters()).device
    M = model.layout.num_maps
    sums = np.zeros(M)
    prefix_sums = np.zeros(model.order)
    lpips_sum, latent_ms, count = 0.0, 0.0, 0
    usage = torch.zeros(model.cfg.codebook_size, dtype=torch.long, device=device)
    for image, bases, _ in batches:
        image, bases = image.to(device), bases.to(device)
        indices = model.tokenize(image, bases)
        if model.continuous:
            latent_ms += model.encode(image).square().mean((1, 2, 3)).sum().item()
        else:
            for idx in indices:
                usage += torch.bincount(idx.flatten(), minlength=usage.numel())
        ends = model.layout.component_ends()
        for m in range(1, M + 1):
            decoded = model.decode_prefix(indices, m)
            sums[m - 1] += F.mse_loss(decoded, image, reduction="none").mean((1, 2, 3)).sum().item()
            if m in ends[:-1]:
                p = ends.index(m)
                target = bases[:, model.order - 1 - p]
                prefix_sums[p] += F.mse_loss(decoded, target, reduction="none").mean((1, 2, 3)).sum().item()
            if m == M and perceptual is not None:
                lpips_sum += perceptual(decoded, image, normalize=True).sum().item()
        count += image.shape[0]
        if count >= max_images:
            break
    model.train()
    mse_depth = (sums / count).tolist()
    result: dict[str, Any] = {
        "mse": mse_depth[-1],
        "psnr": psnr(mse_depth[-1]),
        **(
            {"latent_rms": math.sqrt(latent_ms / count)}
            if model.continuous
            else {"codebook_used": float((usage > 0).float().mean()), "perplexity": perplexity(usage)}
        ),
        "images": count,
        "mse_depth": mse_depth,
        "psnr_depth": [psnr(v) for v in mse_depth],
    }
    if model.order > 0:
        result["prefix_mse"] = (prefix_sums / count).tolist()
    if perceptual is not None:
        result["lpips"] = lpips_sum / count
    return result


# ---------------------------------------------------------------------------------------------------------------
# The stage: the main tokenizer and, for Figure 7, the same budget spent on VAR's and a vanilla VQ-VAE


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
) -> dict[str, dict[str, Any]]:
    """Train every variant (resuming from matching checkpoints), save weights, evaluate, draw the figures.

    With ``cfg.init_from`` every variant starts from that tokenizer; ``log`` hears what was copied."""
    from pipeline.data.decomposed import decode_training_sample, split_shards
    from pipeline.data.loader import ShardLoader
    from pipeline.models.weights import init_fingerprint
    from pipeline.runtime import dist_from_env
    from pipeline.training.train import RunPaths, shard_training_loader, train

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
    highres = highres_loaders(paths.shards, cfg)
    inputs = atomic.files_fingerprint(paths.data) + init_fingerprint(cfg.init_from)
    if highres is not None:
        inputs += atomic.files_fingerprint(paths.shards)
    results: dict[str, dict[str, Any]] = {}
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
        task = TokenizerTask(
            model,
            cfg.loss,
            lambda: iter(val_loader.epoch(0)),
            cfg.eval_images,
            perceptual,
            codes_from_data=cfg.loss.init_codes_from_data and not cfg.init_from,
            highres_loader=None if highres is None else highres[0],
        )
        run = RunPaths(paths.checkpoints / variant.name, paths.live / variant.name)
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("compare", "eval_images")}
        fingerprint = atomic.fingerprint(
            variant.name, variant.order, dataclasses.asdict(variant.model), settings, inputs
        )
        train(task, cfg.train, train_loader.epoch, run, fingerprint, batches_per_epoch=per_epoch, progress=progress)
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
        results[variant.name]["order"] = variant.order
        results[variant.name]["maps"] = model.layout.num_maps
    _report(results, models["tokenizer"], val_loader, paths)
    return results


def highres_loaders(shards_dir: Path, cfg: TokenizerConfig):
    """((train loader, batches per epoch), val loader) of the real highres_scale× images in ``data/shards``, or
    None when the shards hold none or the highres term is off."""
    from pipeline.data.loader import ShardLoader
    from pipeline.data.shards import list_shards
    from pipeline.models.evaluator import decode_labelled_highres, has_highres

    if cfg.loss.lambda_highres == 0:
        return None
    manifest_path = shards_dir / "manifest.json"
    if not manifest_path.is_file():
        # Training on without the term would give other weights than the params ask for, silently.
        raise InvalidInput(
            f"{manifest_path} is missing: tokenizer.loss.lambda_highres > 0 trains on the real high-resolution "
            "images of data/shards (run `cart shard`, or set tokenizer.loss.lambda_highres: 0)"
        )
    manifest = json.loads(manifest_path.read_text())
    count = manifest["splits"]["train"].get("highres_count", 0)
    if manifest.get("highres_scale", 0) < 2 or count < cfg.loss.highres_batch:
        return None
    per_epoch = count // cfg.loss.highres_batch
    train = ShardLoader(
        list_shards(shards_dir / "train"),
        decode_labelled_highres,
        batch_size=cfg.loss.highres_batch,
        seed=cfg.train.seed,
        resampled=True,
        batches_per_epoch=per_epoch,
        shuffle_buffer=cfg.train.shuffle_buffer,
        select=has_highres,
    )
    val_urls = list_shards(shards_dir / "val")
    val = ShardLoader(val_urls, decode_labelled_highres, batch_size=64, shuffle=False, select=has_highres)
    return (train, per_epoch), val


@torch.no_grad()
def highres_psnr(model: Tokenizer, batches: Iterator, max_images: int) -> float:
    """PSNR of real highres_scale× val images through encoder and decoder (unquantised): is the autoencoder sound
    at the size that generation above the trained resolution decodes?"""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for image_uint8_B3HW, _ in batches:
        image_B3HW = image_uint8_B3HW.to(device).float() / 255
        total += F.mse_loss(model.decode(model.encode(image_B3HW)).clamp(0, 1), image_B3HW).item() * len(image_B3HW)
        count += len(image_B3HW)
        if count >= max_images:
            break
    return psnr(total / max(count, 1))


def _lpips_if_available(cfg: TokenizerLossConfig) -> nn.Module | None:
    try:
        return load_lpips(cfg.lpips_net, cfg.lpips_weights)
    except MissingWeights:
        return None  # LPIPS is reported when its weights are present; MSE and PSNR always are


def _report(results: dict[str, dict[str, Any]], main: Tokenizer, val_loader, paths: TokenizerPaths) -> None:
    from pipeline.evaluation.figures import depth_curves_figure, image_grid

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
    image, bases = image[:8].to(device), bases[:8].to(device)
    indices = main.tokenize(image, bases)
    ends = main.layout.component_ends()
    columns = [("input I", image)]
    for p, end in enumerate(ends):
        label = "all maps ≈ I" if p == main.order else f"{end} maps ≈ B{main.order - p}"
        columns.append((label, main.decode_prefix(indices, end)))
    if main.order:
        columns.insert(1, (f"B{main.order} (target)", bases[:, main.order - 1]))
    image_grid(columns, paths.reports / "reconstructions.png", title="Tokenizer reconstructions (val): prefix decodes")
