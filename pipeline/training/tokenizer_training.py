"""The tokenizer's training task and its loss (paper eq. 6), as the shared training loop runs them.

L = ‖I − Î‖² + VQ(β) + λ_p·LPIPS(I, Î) + λ_G·w·GAN(Î) + λ_prefix·Σ_k ‖B_k − D(f̂_{≤B_k})‖² [+ λ_latent·mean f²]

where the VQ term is the codebook and commitment loss of every map (continuous tokens: the same terms train φ and
pull the encoder towards what the coarse maps express), w is VQGAN's adaptive weight (the ratio of the
reconstruction and adversarial gradient norms at the decoder's last layer), the prefix term makes every
component prefix decode to its base, so that next-detail prefixes are real images, and the last term
(continuous tokens only) bounds the latent's scale. The stage that trains and measures the tokenizers is
``pipeline.training.tokenizer_stage``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Field, section
from pipeline.evaluation.tokenizer import evaluate_tokenizer, psnr
from pipeline.models.convnets import PatchDiscriminator
from pipeline.models.tokenizer import Tokenizer
from pipeline.training.rfid import RfidTracking
from pipeline.training.train import Phase, TrainConfig, adamw, batches_from, decay_groups


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
        rfid: RfidTracking | None = None,
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
        # rFID every few steps, the best weights and early stopping (tokenizer.rfid): checkpointed state too.
        self.rfid = rfid

    def modules(self) -> dict[str, nn.Module]:
        modules = {"tokenizer": self.model, "counters": self.counters}
        modules |= {"rfid": self.rfid.state} if self.rfid is not None else {}
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
                for idx in quantized.tokens:
                    self.usage.add_(torch.bincount(idx.flatten(), minlength=self.usage.numel()))
                self._residuals = quantized.residual_sample
        return loss, logs

    def _highres_batch(self, step: int, device: torch.device) -> torch.Tensor | None:
        """Real highres_scale× images in [0, 1] on every ``highres_every``-th step (None on the others, or without a
        source). The n-th such batch is the n-th of the loader's seeded stream whatever step a run resumed at."""
        if self.highres_loader is None or self.cfg.lambda_highres == 0 or step % self.cfg.highres_every:
            return None
        if self._highres_stream is None:
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
            # learned to reconstruct that way (bench/RESULTS.md). Codes drawn from the encoder's own outputs make
            # the first decodes informative.
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

    def measure(self, done: int) -> dict[str, float]:
        return self.rfid.measure(done, self.model) if self.rfid is not None else {}

    def stopped(self) -> bool:
        return self.rfid is not None and self.rfid.stopped()

    def evaluate(self) -> dict[str, float]:
        result = evaluate_tokenizer(self.model, self.val_batches(), self.eval_images)
        return {f"val/{k}": v for k, v in result.items() if isinstance(v, float)}
