"""The base–detail multi-scale VQ-VAE (CART paper §3.2): Algorithm 1 (tokenize) and Algorithm 2 (reconstruct).

An image I with bases B_1 … B_n (B_0 = I) is encoded level by level, f_{B_k} = E(B_k). Its token maps, in
generation order, are:

* base maps r_1 … r_B: multi-scale residual quantisation of f_{B_n} as in VAR — area-downsample the residual
  to the map's size, take the nearest codes, upsample them bicubically, pass them through φ and subtract;
* detail maps, for t = n … 1: the detail f_{D_t} = f_{B_{t−1}} − f_{B_t}, quantised at full latent
  resolution, ``detail_depth`` maps each, each step subtracting φ(z).

Reconstruction is f̂ = Σ_k φ_k(z_k), Î = D(f̂). A prefix of the maps decodes to a coarser image: the base maps to
≈ B_n, adding the D_n maps to ≈ B_{n−1}, …, all maps to ≈ I. With order 0 there are no detail maps and the model
is exactly VAR's multi-scale VQ-VAE; a single full-resolution map is a vanilla VQ-VAE.

Continuous tokens (``quantize="continuous"``, no codebook): a map's token is the area-downsampled residual itself,
z_m = area(r), and the map that ends a component at full latent resolution contributes z_m unchanged (no φ), so it
takes whatever residual is left: every complete component prefix equals its target exactly (the base maps f_{B_n},
+ D_n f_{B_{n−1}}, …, all maps f), up to float rounding. The coarser maps go through the same upsample + φ path
as codes do. φ is not inverted anywhere, so exactness needs no solve: only the carrying map skips it.

With ``detail_error_feedback`` (the default) the residual a detail component starts from is f_{B_{t−1}} − f̂,
i.e. the detail f_{D_t} plus whatever the earlier maps left unquantised, so later maps correct earlier errors
(with exact quantisation both are the same; without feedback each component is quantised on its own, as the
paper's Algorithm 1 is literally written).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError, Field, section
from pipeline.models.convnets import Decoder, Encoder, norm
from pipeline.models.weights import load_config, load_init_source, load_state, save_weights


@section
class TokenizerModelConfig:
    channels: int = Field(32, ge=4, description="Base width of encoder and decoder (VQGAN's `ch`).")
    channel_multipliers: list[int] = Field(
        default_factory=lambda: [1, 2, 2],
        min_length=1,
        description="Width multiplier per resolution level; the latent is downsampled 2^(levels − 1) times.",
    )
    res_blocks: int = Field(1, ge=1, description="ResNet blocks per encoder level (the decoder has one more).")
    attention_levels: list[int] = Field(
        default_factory=lambda: [-1],
        description="Levels (0: full resolution, −1: the lowest) whose every ResNet block is followed by "
        "self-attention, in encoder and decoder (VAR / LDM f16: the lowest level only; []: none).",
    )
    mid_attention: bool = Field(True, description="Self-attention in the middle block, between its two ResBlocks.")
    min_group_channels: int = Field(
        4,
        ge=1,
        description="GroupNorm: up to 32 groups (VQGAN's, VAR's), at least this many channels each. 1 normalises a "
        "narrow network's layers channel by channel, which cost the CIFAR-10 tokenizer its colour (docs/results.md); "
        "tokenizers saved before this key existed load with 1.",
    )
    quant_conv: bool = Field(
        True, description="3×3 convolutions (C → C) after the encoder and before the decoder, as in VAR's VQVAE."
    )
    latent_channels: int = Field(16, ge=1, description="C: channels of the latent and dimension of every code.")
    codebook_size: int = Field(512, ge=2, le=32767, description="V: entries of the one codebook shared by all maps.")
    scales: list[int] = Field(
        default_factory=lambda: [1, 2, 3, 4, 5, 6, 8],
        min_length=1,
        description="The base schedule, VAR's: the side of each base token map, increasing, the last equal to the "
        "latent side.",
    )
    layout: Literal["append", "replace"] = Field(
        "append",
        description="append: order n adds n·detail_depth full-resolution detail maps after all the base maps (the "
        "paper's CART; order 0 is VAR); replace: they replace the last n·detail_depth scales (equal token count).",
    )
    detail_depth: int = Field(1, ge=1, description="Token maps per detail level D_t ((M − B)/n in the paper).")
    phi_convs: int = Field(4, ge=1, description="Number of shared 3×3 φ convolutions (VAR: 4).")
    phi_ratio: float = Field(0.5, ge=0.0, le=1.0, description="φ(z) = (1 − r)·z + r·conv(z) (VAR: 0.5).")
    detail_error_feedback: bool = Field(
        True,
        description="Detail residuals start from f_{B_{t-1}} − f̂ (carrying what earlier maps left) rather than "
        "from f_{D_t} alone.",
    )

    def __post_init__(self):
        if any(b <= a for a, b in zip(self.scales, self.scales[1:], strict=False)):
            raise ValueError(f"scales = {self.scales}: must be strictly increasing")
        if min(self.channel_multipliers) < 1:
            raise ValueError(f"channel_multipliers = {self.channel_multipliers}: every multiplier must be ≥ 1")
        levels = len(self.channel_multipliers)
        if any(not -levels <= a < levels for a in self.attention_levels):
            raise ValueError(
                f"attention_levels = {self.attention_levels}: levels run from 0 to {levels - 1} (or −1 … −{levels}) "
                f"with {levels} channel_multipliers"
            )

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)


@dataclass(frozen=True)
class TokenMap:
    """One token map in generation order: a ``side``×``side`` grid of codes of the base (level 0) or of D_level."""

    side: int
    level: int

    @property
    def is_base(self) -> bool:
        return self.level == 0


class TokenLayout:
    """The token maps of one image, in generation order, and where each starts in the flat token sequence.

    ``append`` (the paper's CART): every scale is a base map, VAR's multi-scale quantisation of f_{B_n} ending at
    the full latent, then order·detail_depth full-resolution detail maps, D_n's first. ``replace``: the last
    order·detail_depth scales become the detail maps, so every order has VAR's token count.
    """

    def __init__(self, scales: list[int], order: int, detail_depth: int, mode: Literal["append", "replace"] = "append"):
        base = len(scales) if mode == "append" else len(scales) - order * detail_depth
        if base < 1:
            raise ValueError(
                f"{len(scales)} scales leave no base map for order {order} with detail_depth {detail_depth}"
            )
        latent = scales[-1]
        self.order, self.detail_depth, self.latent_side, self.mode = order, detail_depth, latent, mode
        self.maps = [TokenMap(side, 0) for side in scales[:base]]
        for t in range(order, 0, -1):
            self.maps += [TokenMap(latent, t)] * detail_depth
        self.lengths = [m.side * m.side for m in self.maps]
        self.offsets = [sum(self.lengths[:i]) for i in range(len(self.maps) + 1)]

    @property
    def num_maps(self) -> int:
        return len(self.maps)

    @property
    def num_base(self) -> int:
        return sum(m.is_base for m in self.maps)

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1]

    @property
    def num_scales(self) -> int:
        """The length of the VAR scale schedule these maps follow: appended, the base maps (the details come after
        VAR's last scale); replaced, every map (the details take the last scales' places)."""
        return self.num_base if self.mode == "append" else self.num_maps

    def component_ends(self) -> list[int]:
        """Map counts after which a prefix is complete: base (≈ B_n), then + D_n (≈ B_{n−1}), …, all (≈ I)."""
        return [self.num_base + k * self.detail_depth for k in range(self.order + 1)]

    def map_level_ids(self) -> list[int]:
        """Per map, an id distinguishing every base scale and every detail level (for level embeddings)."""
        return [m for m in range(self.num_base)] + [
            self.num_base + (self.order - m.level) for m in self.maps[self.num_base :]
        ]

    def phi_choice(self, count: int) -> list[int]:
        """The φ convolution of every map. Appended: the base maps choose exactly as VAR over its schedule (so a
        VAR tokenizer quantises the base as it was trained to) and every detail map takes the full-resolution
        base map's conv. Replaced: VAR's rule over all maps."""
        if self.mode == "replace":
            return phi_choice(count, self.num_maps)
        base = phi_choice(count, self.num_base)
        return base + [base[-1]] * (self.num_maps - self.num_base)

    def to_json(self) -> dict:
        return {
            "maps": [
                {"h": m.side, "w": m.side, "kind": "base" if m.is_base else "detail", "level": m.level}
                for m in self.maps
            ],
            "order": self.order,
            "detail_depth": self.detail_depth,
            "mode": self.mode,
            "num_tokens": self.num_tokens,
        }

    @classmethod
    def from_json(cls, saved: dict) -> TokenLayout:
        """The layout ``to_json`` wrote (token manifests, model configs). Files without a mode predate the
        appended layout: every map's side is listed, so they rebuild as replaced."""
        sides = [m["h"] for m in saved["maps"]]
        mode = saved.get("mode", "replace")
        scales = [m["h"] for m in saved["maps"] if m["kind"] == "base"] if mode == "append" else sides
        return cls(scales, saved["order"], saved["detail_depth"], mode)


def phi_choice(count: int, num_maps: int) -> list[int]:
    """Which of the ``count`` φ convolutions each of ``num_maps`` maps uses: VAR's rule, bit for bit.

    Map m takes the conv whose tick is nearest to its relative position m / (M − 1); ticks are
    linspace(1/(3K), 1 − 1/(3K), K) for K = 4 and linspace(1/(2K), 1 − 1/(2K), K) otherwise. Positions fall exactly
    half-way between ticks (M = 7, 10, …), so the arithmetic decides: it is float64 here as in VAR, where float32
    would break those ties the other way and pair maps with other convs than VAR's weights were trained with.
    """
    margin = 1 / 3 / count if count == 4 else 1 / 2 / count
    ticks = np.linspace(margin, 1 - margin, count)
    positions = [m / (num_maps - 1) for m in range(num_maps)] if num_maps > 1 else [0.0]
    return [int(np.argmin(np.abs(ticks - p))) for p in positions]


class Phi(nn.Module):
    """VAR's residual convolutions: a few 3×3 convs shared across maps, each blended with its input."""

    def __init__(self, channels: int, count: int, ratio: float, choice: list[int]):
        super().__init__()
        self.ratio = ratio
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(count))
        self.choice = choice

    def forward(self, z_BChw: torch.Tensor, map_index: int) -> torch.Tensor:
        conv = self.convs[self.choice[map_index]]
        return (1 - self.ratio) * z_BChw + self.ratio * conv(z_BChw)


@dataclass
class Quantized:
    """Algorithm 1's result for a batch, with what training needs."""

    tokens: list[torch.Tensor]  # every map's tokens in generation order: idx_Bhw (vq) or z_BChw (continuous)
    prefixes: list[torch.Tensor]  # f̂ after each component (base, +D_n, …, +D_1), straight-through to its target
    vq_loss: torch.Tensor  # mean over maps of β‖sg(f̂) − f_target‖² + ‖f̂ − sg(f_target)‖²
    residual_sample: torch.Tensor  # (N, C) residual vectors the quantiser saw, from every map: dead-code restarts
    latent_ms: torch.Tensor  # mean square of the encodings f_{B_k}: the continuous tokenizer's latent regulariser
    autoencoded: torch.Tensor | None = None  # ``forward``'s extra images, encoded and decoded unquantised


def full_precision(method):
    """Run a method with autocast off and its half-precision tensor arguments in fp32.

    Nearest codes, f̂ and residuals decide which tokens an image gets and what the transformer reads; under bf16
    autocast some of the codes came out different from the fp32 ones that ``extract_tokens`` stores (how many:
    bench/RESULTS.md), so training saw other inputs than the tokens it was scored on. VAR computes all of this in
    fp32 too.
    """

    def cast(x):
        if torch.is_tensor(x) and x.dtype in (torch.float16, torch.bfloat16):
            return x.float()
        if isinstance(x, list | tuple):
            return type(x)(cast(item) for item in x)
        return x

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with torch.autocast(self.phi.convs[0].weight.device.type, enabled=False):
            return method(self, *[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})

    return wrapper


def _sample_rows(x_NC: torch.Tensor, k: int) -> torch.Tensor:
    return x_NC if len(x_NC) <= k else x_NC[torch.randperm(len(x_NC), device=x_NC.device)[:k]]


Quantize = Literal["vq", "continuous"]


class Tokenizer(nn.Module):
    """Encoder, decoder, one codebook (vq) and φ; ``order`` decides how many maps are detail maps."""

    def __init__(self, cfg: TokenizerModelConfig, order: int, quantize: Quantize = "vq"):
        super().__init__()
        self.cfg, self.order, self.quantize_mode = cfg, order, quantize
        self.layout = TokenLayout(cfg.scales, order, cfg.detail_depth, cfg.layout)
        latent = self.layout.latent_side
        # Continuous: the full-resolution map that ends a component carries the residual as it is (see above).
        self.carrying = (
            {end - 1 for end in self.layout.component_ends() if self.layout.maps[end - 1].side == latent}
            if quantize == "continuous"
            else set()
        )
        args = (
            cfg.channels,
            cfg.channel_multipliers,
            cfg.res_blocks,
            cfg.attention_levels,
            cfg.mid_attention,
            cfg.latent_channels,
            cfg.min_group_channels,
        )
        self.encoder, self.decoder = Encoder(*args), Decoder(*args)
        C = cfg.latent_channels
        self.quant_conv = nn.Conv2d(C, C, 3, padding=1) if cfg.quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(C, C, 3, padding=1) if cfg.quant_conv else nn.Identity()
        if quantize == "vq":
            self.codebook = nn.Embedding(cfg.codebook_size, cfg.latent_channels)
            nn.init.uniform_(self.codebook.weight, -1 / cfg.codebook_size, 1 / cfg.codebook_size)
        self.phi = Phi(cfg.latent_channels, cfg.phi_convs, cfg.phi_ratio, self.layout.phi_choice(cfg.phi_convs))

    @property
    def continuous(self) -> bool:
        return self.quantize_mode == "continuous"

    # -- pixels ↔ latents ------------------------------------------------------------------------------------

    def encode_levels(self, image_B3HW: torch.Tensor, bases_BK3HW: torch.Tensor) -> list[torch.Tensor]:
        """[f_{B_0} = E(I), f_{B_1}, …, f_{B_n}] from images in [0, 1], all levels in one encoder pass."""
        B = image_B3HW.shape[0]
        levels = torch.cat([image_B3HW.unsqueeze(1), bases_BK3HW[:, : self.order]], dim=1)
        f = self.encode(levels.flatten(0, 1))
        return list(f.unflatten(0, (B, self.order + 1)).unbind(1))

    def encode(self, image_B3HW: torch.Tensor) -> torch.Tensor:
        """Image in [0, 1] → latent f (VAR's networks work on [−1, 1])."""
        return self.quant_conv(self.encoder(image_B3HW * 2 - 1))

    def decode(self, f_BChw: torch.Tensor) -> torch.Tensor:
        """Latent → image in [0, 1] (unclamped: losses see the raw output)."""
        return (self.decoder(self.post_quant_conv(f_BChw)) + 1) / 2

    # -- Algorithm 1 -------------------------------------------------------------------------------------------

    def nearest_codes(self, r_BChw: torch.Tensor) -> torch.Tensor:
        """idx_Bhw of the nearest codes, with VAR's arithmetic: ‖r‖² + ‖e‖² − 2 r·e in one fused GEMM."""
        r_NC = r_BChw.permute(0, 2, 3, 1).reshape(-1, r_BChw.shape[1])
        codes_VC = self.codebook.weight.detach()
        distance_NV = r_NC.square().sum(1, keepdim=True) + codes_VC.square().sum(1)
        distance_NV = torch.addmm(distance_NV, r_NC, codes_VC.T, alpha=-2)
        B, _, h, w = r_BChw.shape
        return distance_NV.argmin(1).view(B, h, w)

    @full_precision
    def map_contribution(self, tokens: torch.Tensor, map_index: int) -> torch.Tensor:
        """φ_m(up(z)) for map m's tokens (codes idx_Bhw, or continuous z_BChw): what the map adds to f̂ at full
        latent size. A carrying map (continuous) adds z_BChw itself."""
        z_BChw = tokens if self.continuous else self.codebook(tokens).permute(0, 3, 1, 2)
        if map_index in self.carrying:
            return z_BChw.contiguous()
        latent = self.layout.latent_side
        if z_BChw.shape[-1] != latent:
            z_BChw = F.interpolate(z_BChw, size=(latent, latent), mode="bicubic")
        # Standard layout whatever the path (a permuted lookup, or a 1×1 map PyTorch upsamples as channels-last):
        # a channels-last f̂ would take other conv kernels, and the same tokens would decode to different pixels.
        return self.phi(z_BChw.contiguous(), map_index)

    def quantize_map(self, residual_BChw: torch.Tensor, map_index: int):
        """One step of Algorithm 1: the residual at map m's size, its nearest codes (continuous: the resized
        residual itself), and what they add to f̂.

        Returns (the map's tokens, h_BChw at full latent size, the resized residual the tokens were chosen for).
        """
        side = self.layout.maps[map_index].side
        r_BChw = (
            residual_BChw
            if side == residual_BChw.shape[-1]
            else F.interpolate(residual_BChw, (side, side), mode="area")
        )
        tokens = r_BChw if self.continuous else self.nearest_codes(r_BChw)
        return tokens, self.map_contribution(tokens, map_index), r_BChw

    @torch.no_grad()
    @full_precision
    def tokenize_base(self, f_BChw: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The base part of Algorithm 1 for any latent f (e.g. a crop of an upsampled one): VAR's multi-scale
        residual quantisation over the base scales. Returns the base maps and their composition f̂."""
        residual, f_hat, tokens = f_BChw, torch.zeros_like(f_BChw), []
        for m in range(self.layout.num_base):
            map_tokens, h_BChw, _ = self.quantize_map(residual, m)
            tokens.append(map_tokens)
            f_hat, residual = f_hat + h_BChw, residual - h_BChw
        return tokens, f_hat

    @full_precision
    def quantize(self, f_levels: list[torch.Tensor], beta: float = 0.25) -> Quantized:
        """Algorithm 1 on encodings f_{B_0} … f_{B_n}: token maps, component prefixes and the VQ loss."""
        n = self.order
        f_hat = torch.zeros_like(f_levels[0])
        tokens, prefixes, losses, seen = [], [], [], []
        start = 0
        for component, end in enumerate(self.layout.component_ends()):
            target = f_levels[n - component]  # base: f_{B_n}; detail D_t: f_{B_{t−1}}
            if component == 0 or self.cfg.detail_error_feedback:
                residual = target.detach() - f_hat.detach()
            else:
                residual = (target - f_levels[n - component + 1]).detach()  # f_{D_t} alone
            for m in range(start, end):
                map_tokens, h_BChw, r = self.quantize_map(residual, m)
                if self.training and not self.continuous:
                    seen.append(_sample_rows(r.detach().permute(0, 2, 3, 1).flatten(0, 2), self.cfg.codebook_size))
                f_hat = f_hat + h_BChw
                residual = residual - h_BChw.detach()
                losses.append(beta * F.mse_loss(f_hat.detach(), target) + F.mse_loss(f_hat, target.detach()))
                tokens.append(map_tokens)
            start = end
            # Straight-through: the decoder sees f̂, the gradient of what it decodes reaches this level's encoder.
            prefixes.append(f_hat.detach() + (target - target.detach()))
        residual_sample = torch.cat(seen) if seen else f_hat.new_zeros(0, f_hat.shape[1])
        latent_ms = torch.stack([f.square().mean() for f in f_levels]).mean()
        return Quantized(tokens, prefixes, torch.stack(losses).mean(), residual_sample, latent_ms)

    @torch.no_grad()
    def tokenize(self, image_B3HW: torch.Tensor, bases_BK3HW: torch.Tensor) -> list[torch.Tensor]:
        """Algorithm 1: images (and their bases) → token maps in generation order: idx_Bhw (vq) or z_BChw
        (continuous)."""
        return self.quantize(self.encode_levels(image_B3HW, bases_BK3HW)).tokens

    # -- Algorithm 2 -------------------------------------------------------------------------------------------

    @full_precision
    def compose(self, tokens: list[torch.Tensor], num_maps: int | None = None) -> torch.Tensor:
        """f̂ = Σ φ_k(z_k) over the first ``num_maps`` maps (all by default)."""
        count = len(tokens) if num_maps is None else num_maps
        f_hat = self.map_contribution(tokens[0], 0)
        for m in range(1, count):
            f_hat = f_hat + self.map_contribution(tokens[m], m)
        return f_hat

    @torch.no_grad()
    def reconstruct(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """Algorithm 2: token maps → image in [0, 1]."""
        return self.decode(self.compose(tokens)).clamp(0, 1)

    @torch.no_grad()
    def decode_prefix(self, tokens: list[torch.Tensor], num_maps: int) -> torch.Tensor:
        """The image the first ``num_maps`` maps describe: ≈ B_n after the base maps, … , ≈ I after all."""
        return self.decode(self.compose(tokens, num_maps)).clamp(0, 1)

    # -- what the transformer sees ---------------------------------------------------------------------------

    @full_precision
    def next_input(self, f_hat_BChw: torch.Tensor, map_index: int) -> torch.Tensor:
        """The transformer's input for map m: f̂ after maps < m, at map m's size (base) or full size (detail)."""
        side = self.layout.maps[map_index].side
        if side == self.layout.latent_side:
            return f_hat_BChw
        return F.interpolate(f_hat_BChw, size=(side, side), mode="area")

    @torch.no_grad()
    @full_precision
    def teacher_forcing_inputs(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """Inputs for maps 1 … M−1 (map 0 starts from the class token), flattened: x_B(L−1)C."""
        f_hat = torch.zeros_like(self.map_contribution(tokens[0], 0))
        inputs = []
        for m in range(1, len(tokens)):
            f_hat = f_hat + self.map_contribution(tokens[m - 1], m - 1)
            inputs.append(self.next_input(f_hat, m).flatten(2).transpose(1, 2))
        return torch.cat(inputs, dim=1)

    # -- training forward ------------------------------------------------------------------------------------

    def forward(
        self,
        image_B3HW: torch.Tensor,
        bases_BK3HW: torch.Tensor,
        beta: float = 0.25,
        decode: list[int] | None = None,
        autoencode: torch.Tensor | None = None,
    ):
        """Encode, quantise (Algorithm 1) and decode component prefixes in one decoder pass.

        ``decode`` lists the prefixes to decode (0: ≈ B_n, …, n − 1: ≈ B_1, n: ≈ I; all by default). Returns
        (decoded_BP3HW, quantized) with decoded[:, j] the image of prefix ``decode[j]``. ``autoencode``: other
        images (e.g. at another size) also encoded and decoded, unquantised, in ``quantized.autoencoded`` — in the
        same forward, so that DDP sees one.
        """
        quantized = self.quantize(self.encode_levels(image_B3HW, bases_BK3HW), beta)
        chosen = range(self.order + 1) if decode is None else decode
        prefixes = torch.stack([quantized.prefixes[p] for p in chosen], dim=1)
        decoded = self.decode(prefixes.flatten(0, 1)).unflatten(0, prefixes.shape[:2])
        if autoencode is not None:
            quantized.autoencoded = self.decode(self.encode(autoencode))
        return decoded, quantized


def save_tokenizer(stem: str | Path, model: Tokenizer, resolution: int) -> None:
    """``<stem>.safetensors`` + ``<stem>.json`` (architecture, order, quantisation, resolution, token layout)."""
    config = {
        "model": dataclasses.asdict(model.cfg),
        "order": model.order,
        **({"quantize": model.quantize_mode} if model.continuous else {}),
        "resolution": resolution,
        "layout": model.layout.to_json(),
    }
    save_weights(stem, model, config)


def load_tokenizer(stem: str | Path, device: torch.device | str = "cpu") -> tuple[Tokenizer, dict]:
    """The tokenizer saved at ``stem`` (in eval mode) and its config."""
    config = load_config(stem)
    # Saved before min_group_channels existed: those networks normalised with the old rule, which 1 reproduces.
    config["model"].setdefault("min_group_channels", 1)
    model = Tokenizer(TokenizerModelConfig(**config["model"]), config["order"], config.get("quantize", "vq"))
    model.load_state_dict(load_state(stem, device))
    return model.to(device).eval(), config


def init_tokenizer_from(model: Tokenizer, stem: str | Path) -> list[str]:
    """Copy every tensor of the tokenizer saved at ``stem`` into ``model``; return what was copied, by part.

    A tokenizer's weights do not depend on its order (that only decides how maps are laid out), so VAR's VQVAE can
    start a CART tokenizer of any order. Any missing, extra or differently shaped tensor is a ``ConfigError`` naming
    the key: a partial copy would silently train a different network than the one asked for.
    """
    config, state = load_init_source(stem, "tokenizer.init_from")
    ours = model.state_dict()
    # GroupNorm's grouping leaves no trace in the tensors' shapes: compare it from the configs. Every tokenizer a
    # user can have records min_group_channels (no release predates the key; `cart import-var` writes it too), so
    # a file without it is reported, not read with a guessed rule: only files this repository wrote before the key
    # existed lacked it.
    source_min = config.get("model", {}).get("min_group_channels")
    if source_min is None:
        problems = [f"{stem}: its config has no model.min_group_channels (not a tokenizer this version saved)"]
    else:
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
