"""The diffusion head (MAR, Li et al. 2024): a small MLP that models each continuous token's distribution given
the transformer's output z for that token.

Training noises the token x_0 at a random level t (cosine schedule, ``timesteps`` levels) and regresses the
velocity v = √ᾱ·ε − √(1 − ᾱ)·x_0 (v-prediction) from (x_t, t, z), ``draws`` noise draws per token and step, as
MAR repeats every token. With ``variance: learned`` (MAR learns its variance too) the head also predicts the
per-channel variance of x_0 given x_t, trained by the Gaussian likelihood of x_0 around the frozen prediction x̂_0
(the variance part of the variational bound). Sampling runs DDPM's ancestral steps over ``steps`` evenly spaced
levels: each step draws from the posterior q(x_t' | x_t, x̂_0) of the respaced chain widened by the uncertainty of
x̂_0, variance β̃ + c_0²·Var[x_0 | x_t] (c_0 the posterior mean's weight on x_0), which is the exact reverse step
for Gaussian data at any step count; ``variance: fixed`` (the transformers saved before) uses β̃ alone, too narrow
when few steps are taken (docs/diffusion-sampler.md). The noise of each step is scaled by a temperature;
classifier-free guidance combines the velocities predicted from the conditional and unconditional z, which is the
same as combining the predicted noise (ε is affine in v given x_t), and keeps the conditional variance (MAR).

The MLP is MAR's: an input projection, residual blocks of LayerNorm → MLP whose shift, scale and gate come from
the sum of the noise-level embedding and the projected z (AdaLN), and an AdaLN-modulated output layer; the
modulations and the output start at zero, so the untrained head predicts v = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Field, section

FREQUENCIES = 256  # width of the sinusoidal embedding of the noise level (MAR / DiT)


@section
class DiffusionConfig:
    width: int = Field(256, ge=8, description="Width of the denoising MLP (MAR-B: 1024).")
    depth: int = Field(3, ge=1, description="Residual AdaLN MLP blocks (MAR: 3).")
    draws: int = Field(4, ge=1, description="Noise draws per token per training step (MAR's diffusion_batch_mul: 4).")
    timesteps: int = Field(1000, ge=2, description="Noise levels of the training schedule (cosine; MAR: 1000).")
    variance: Literal["learned", "fixed"] = Field(
        "learned",
        description="learned: the head also predicts Var[x_0 | x_t] per channel (trained by x_0's likelihood, the "
        "variational bound's variance term, as MAR learns its variance) and each reverse step adds it to the "
        "posterior variance; fixed: the posterior variance alone (what a saved transformer without this key "
        "ran with; too narrow at few steps: docs/diffusion-sampler.md).",
    )


def cosine_alpha_bar(timesteps: int) -> torch.Tensor:
    """ᾱ_t for t = 1 … T (index t − 1) of the cosine schedule (Nichol & Dhariwal 2021): ᾱ(t) ∝ cos²((t/T + s)/(1 + s)
    · π/2) with s = 0.008, each step's β capped at 0.999 so that the last level is pure noise but finite."""
    s = 0.008
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    beta = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - beta, 0)


def level_embedding(t_N: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding of the (float) noise level: (N, FREQUENCIES)."""
    half = FREQUENCIES // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t_N.device, dtype=torch.float32) / half)
    angles_NF = t_N.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles_NF), torch.sin(angles_NF)], dim=-1)


class ResBlock(nn.Module):
    """x + gate·MLP(LN(x)·(1 + scale) + shift), with shift, scale and gate from the condition."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Linear(width, 3 * width)

    def forward(self, x_NW: torch.Tensor, c_NW: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(F.silu(c_NW)).chunk(3, dim=-1)
        h = torch.addcmul(shift, F.layer_norm(x_NW, x_NW.shape[-1:], eps=1e-6), scale + 1)
        return x_NW + gate * self.mlp(h)


class DiffusionHead(nn.Module):
    """v-prediction denoiser of ``channels``-d tokens conditioned on a ``cond_width``-d z per token."""

    def __init__(self, cfg: DiffusionConfig, channels: int, cond_width: int):
        super().__init__()
        self.cfg, W = cfg, cfg.width
        self.input_proj = nn.Linear(channels, W)
        self.level_embed = nn.Sequential(nn.Linear(FREQUENCIES, W), nn.SiLU(), nn.Linear(W, W))
        self.cond_embed = nn.Linear(cond_width, W)
        self.blocks = nn.ModuleList(ResBlock(W) for _ in range(cfg.depth))
        self.final_modulation = nn.Linear(W, 2 * W)
        self.channels = channels
        # v, then (learned variance) log(Var[x_0 | x_t] / (1 − ᾱ_t)): zero is unit-variance data's value.
        self.output = nn.Linear(W, 2 * channels if cfg.variance == "learned" else channels)
        self.register_buffer("alpha_bar_T", cosine_alpha_bar(cfg.timesteps).float(), persistent=False)
        self._init_weights()

    def _init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.level_embed[0].weight, std=0.02)
        nn.init.normal_(self.level_embed[2].weight, std=0.02)
        # Zero modulations and output: every block starts as the identity and the head predicts v = 0 (and the
        # variance of x_0 that unit-variance data would have).
        for layer in [*(b.modulation for b in self.blocks), self.final_modulation, self.output]:
            nn.init.zeros_(layer.weight)

    def forward(self, x_NC: torch.Tensor, t_N: torch.Tensor, z_NW: torch.Tensor) -> torch.Tensor:
        """The prediction for noisy tokens x_NC at levels t_N (0 … T − 1) given the condition z_NW: the velocity
        v_NC, followed (learned variance) by log(Var[x_0 | x_t] / (1 − ᾱ_t)) per channel: (N, C or 2C)."""
        c_NW = self.level_embed(level_embedding(t_N).to(self.input_proj.weight.dtype)) + self.cond_embed(z_NW)
        h_NW = self.input_proj(x_NC)
        for block in self.blocks:
            h_NW = block(h_NW, c_NW)
        shift, scale = self.final_modulation(F.silu(c_NW)).chunk(2, dim=-1)
        return self.output(torch.addcmul(shift, F.layer_norm(h_NW, h_NW.shape[-1:], eps=1e-6), scale + 1))

    def loss(self, z_NW: torch.Tensor, x0_NC: torch.Tensor) -> torch.Tensor:
        """The diffusion loss of every token, averaged over channels and ``draws`` noise draws: loss_N. It is
        ‖v̂ − v‖², plus (learned variance) the negative log-likelihood of x_0 under N(x̂_0, Var̂), x̂_0 held fixed
        so that only the variance learns from it, offset to be 0 where the head predicts unit-variance data's
        variance and x_0 has it."""
        D, N, C = self.cfg.draws, len(x0_NC), self.channels
        x0_DNC, z_DNW = x0_NC.float().expand(D, *x0_NC.shape), z_NW.expand(D, *z_NW.shape)
        t_DN = torch.randint(self.cfg.timesteps, (D, N), device=x0_NC.device)
        eps_DNC = torch.randn_like(x0_DNC)
        a_DN1 = self.alpha_bar_T[t_DN].sqrt()[..., None]
        s_DN1 = (1 - self.alpha_bar_T[t_DN]).sqrt()[..., None]
        x_DNC = a_DN1 * x0_DNC + s_DN1 * eps_DNC
        v_DNC = a_DN1 * eps_DNC - s_DN1 * x0_DNC
        out = self(x_DNC.flatten(0, 1), t_DN.flatten(), z_DNW.flatten(0, 1)).float().view(D, N, -1)
        loss_DNC = (out[..., :C] - v_DNC).square()
        if self.cfg.variance == "learned":
            x0_hat_DNC = a_DN1 * x_DNC - s_DN1 * out[..., :C].detach()
            u_DNC = out[..., C:]  # log(Var̂ / (1 − ᾱ))
            loss_DNC = loss_DNC + 0.5 * (u_DNC + (x0_DNC - x0_hat_DNC).square() / (s_DN1.square() * u_DNC.exp()) - 1)
        return loss_DNC.mean((0, 2))

    def schedule(self, steps: int) -> list[int]:
        """The levels sampling visits, from T − 1 down to 0, evenly spaced (``steps`` of them at most)."""
        levels = torch.linspace(self.cfg.timesteps - 1, 0, steps).round().long().unique_consecutive()
        return levels.tolist()

    @torch.no_grad()
    def sample(
        self,
        z_NW: torch.Tensor,
        steps: int,
        temperature: float,
        generator: torch.Generator | None,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """Draw one token per row of z by the reverse process over ``schedule(steps)``: x_NC.

        ``guidance`` w: z_NW holds the conditional rows then as many unconditional ones, and each step's velocity
        is v_u + w·(v_c − v_u), its variance the conditional one. ``temperature`` scales the noise added at every
        step (MAR's τ)."""
        guided = guidance is not None
        N, C = (len(z_NW) // 2 if guided else len(z_NW)), self.channels

        def denoise(x_NC: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
            x_in = torch.cat([x_NC, x_NC]) if guided else x_NC
            out = self(x_in, torch.full((len(x_in),), t, device=x_NC.device), z_NW).float()
            v_NC, u_NC = out[:N, :C], out[:N, C:]
            if guided:
                v_NC = torch.lerp(out[N:, :C], v_NC, guidance)
            a_bar = self.alpha_bar_T[t]
            x0_NC = a_bar.sqrt() * x_NC - (1 - a_bar).sqrt() * v_NC
            return x0_NC, (u_NC.exp() * (1 - a_bar) if u_NC.shape[1] else None)

        x_NC = torch.randn(N, C, generator=generator, device=z_NW.device)
        return reverse_process(denoise, x_NC, self.alpha_bar_T, self.schedule(steps), temperature, generator)

    def matrix_weights(self) -> int:
        """Weights of the matrices one denoising pass multiplies per token (for FLOP counts)."""
        return sum(p.numel() for p in self.parameters() if p.ndim == 2)


def reverse_process(
    denoise: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor | None]],
    x_NC: torch.Tensor,
    alpha_bar_T: torch.Tensor,
    levels: list[int],
    temperature: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """DDPM's ancestral sampling from x_NC (pure noise at ``levels[0]``) down the respaced chain ``levels``.

    ``denoise(x_NC, t)`` gives the prediction x̂_0 of x_0 and Var[x_0 | x_t] per entry (None: not predicted). A
    step to the next level t' draws from the posterior q(x_t' | x_t, x_0 = x̂_0) of the respaced chain (β = 1 −
    ᾱ_t / ᾱ_t'), its variance β̃ = β·(1 − ᾱ_t') / (1 − ᾱ_t) widened by c_0²·Var[x_0 | x_t] for the uncertainty of
    x̂_0 (c_0 = √ᾱ_t'·β / (1 − ᾱ_t), the mean's weight on x̂_0): by the law of total variance this is the
    variance of the true reverse step wherever that step is Gaussian, as it is for Gaussian data at any step
    count, so an exact denoiser then samples the data exactly. ``temperature`` multiplies each step's noise.
    The last level returns x̂_0 itself, noiseless."""
    for i, t in enumerate(levels):
        x0_NC, var0_NC = denoise(x_NC, t)
        if i + 1 == len(levels):
            return x0_NC
        a_bar, a_bar_prev = alpha_bar_T[t], alpha_bar_T[levels[i + 1]]
        beta = 1 - a_bar / a_bar_prev
        c0, ct = a_bar_prev.sqrt() * beta / (1 - a_bar), (1 - beta).sqrt() * (1 - a_bar_prev) / (1 - a_bar)
        var_NC = beta * (1 - a_bar_prev) / (1 - a_bar) + (0 if var0_NC is None else c0.square() * var0_NC)
        noise_NC = torch.randn(x_NC.shape, generator=generator, device=x_NC.device)
        x_NC = c0 * x0_NC + ct * x_NC + temperature * var_NC.sqrt() * noise_NC
    raise ValueError("reverse_process needs at least one level")
