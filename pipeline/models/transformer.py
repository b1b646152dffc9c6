"""The next-detail transformer (CART paper §3.3): VAR's decoder-only transformer over the base–detail token maps.

The sequence is every token map of an image in generation order (``TokenLayout``): the base maps r_1 … r_B, then
the detail maps of D_n … D_1. Map 0 starts from the class token; map m > 0 reads f̂ after maps < m at map m's size
(``Tokenizer.next_input``) and predicts map m's codes, all of them at once. A token sees its own map and every
earlier map (block-causal attention). As in VAR, every block is conditioned on the class by adaptive layer norm and
each token carries a learned position embedding plus an embedding of its map's level (every base scale and every
detail level its own).

Sampling goes map by map with a KV cache: map m's tokens attend to the cached keys and values of maps < m and to
one another, so no mask is needed. Classifier-free guidance runs conditional and unconditional rows as one batch.

The head (``pipeline.models.heads``) is a softmax over the codebook, coarse-to-fine prediction over clusters of
the codebook (``pipeline.models.coarse``) or, for a continuous tokenizer, MAR's diffusion head
(``pipeline.models.diffusion``): the trunk's output z of a token conditions a small denoiser that draws the token's
vector, standardised by its map's token RMS. Each head owns its loss and its sampler; everything else (inputs,
cache, guidance rows) is the same for all.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from pipeline.config import Field, section
from pipeline.models.coarse import FineHead
from pipeline.models.diffusion import DiffusionConfig, DiffusionHead
from pipeline.models.heads import CoarseToFineHead, ContinuousHead, Head, SoftmaxHead, TokenLoss
from pipeline.models.tokenizer import Tokenizer, TokenLayout
from pipeline.models.weights import load_config, load_state, save_weights, weights_path


@section
class TransformerModelConfig:
    depth: int = Field(4, ge=1, description="Transformer blocks.")
    width: int = Field(0, ge=0, description="Embedding width (0: 64 × depth, VAR's mapping).")
    heads: int = Field(0, ge=0, description="Attention heads (0: depth, as in VAR).")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width / embedding width.")
    qk_norm: bool = Field(True, description="Cosine attention: L2-normalised q, k with a learned per-head scale.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the attention and MLP outputs when training.")
    class_dropout: float = Field(
        0.1, ge=0, le=1, description="Probability that a training label becomes the unconditional class (for CFG)."
    )
    norm_eps: float = Field(1e-6, gt=0, description="Layer-norm epsilon.")
    drop_path: float = Field(
        -1.0,
        lt=1,
        description="Stochastic depth: the rate rises linearly from 0 (first block) to this (last block); negative: "
        "VAR's 0.1·depth/24.",
    )
    init_std: float = Field(
        -1.0, description="Std of the truncated-normal init of every matrix and embedding; negative: VAR's √(1/(3C))."
    )
    init_adaln: float = Field(0.5, ge=0, description="Scale of the initial AdaLN shift/scale weights (VAR: 0.5).")
    init_gate: float = Field(1e-5, ge=0, description="Scale of the initial AdaLN gate weights (VAR: 1e-5).")
    init_head: float = Field(0.02, ge=0, description="Scale of the initial output-head weights (VAR: 0.02).")
    prediction: Literal["next_map", "next_token"] = Field(
        "next_map",
        description="next_map: every token of a map at once, from f̂ of the maps before (VAR, CART); next_token: "
        "one token at a time in sequence (raster) order, each reading the code vector of the token before it, "
        "under a token-causal mask (VQGAN-style AR; the paper's Table-3 'AR' row with one full-resolution map).",
    )
    decay_class_embedding: bool = Field(
        True,
        description="Weight decay on the class embedding, as VAR applies it (position and level embeddings, norms "
        "and biases are never decayed).",
    )

    def __post_init__(self):
        if self.resolved_width % self.resolved_heads:
            raise ValueError(
                f"width {self.resolved_width} (configured {self.width}) is not divisible by heads "
                f"{self.resolved_heads} (configured {self.heads})"
            )

    @property
    def resolved_width(self) -> int:
        return self.width or 64 * self.depth

    @property
    def resolved_heads(self) -> int:
        return self.heads or self.depth

    @property
    def resolved_drop_path(self) -> float:
        return self.drop_path if self.drop_path >= 0 else 0.1 * self.depth / 24

    @property
    def resolved_init_std(self) -> float:
        return self.init_std if self.init_std >= 0 else math.sqrt(1 / (3 * self.resolved_width))


@section
class SamplingConfig:
    guidance: float = Field(
        1.5,
        ge=0,
        description="Classifier-free guidance weight w: logits = uncond + w·(cond − uncond); 1 = no guidance. "
        "VAR's cfg = c is w = 1 + c.",
    )
    guidance_schedule: Literal["linear_scales", "linear", "constant"] = Field(
        "linear_scales",
        description="linear_scales: VAR's ramp over VAR's scale schedule, from 1 at the first scale to w at the last; "
        "every map gets the weight VAR gives the map in its place, so detail maps appended after the last scale get w "
        "(order 0: exactly VAR's; docs/cifar10.md says why). linear: the ramp over every map, details included, "
        "which guides an appended layout's base maps less than VAR's at the same w (order 0: VAR's as well). "
        "constant: w on every map.",
    )
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest codes (0: all).")
    top_p: float = Field(0.0, ge=0, le=1, description="Nucleus sampling: the likeliest codes covering p (0 or 1: off).")
    temperature: float = Field(
        1.0,
        gt=0,
        description="Logits are divided by this before filtering; diffusion head: the noise of every reverse step is "
        "multiplied by it (MAR's τ).",
    )
    diffusion_steps: int = Field(
        50, ge=1, description="Diffusion head only: reverse steps per token, evenly spaced over the noise levels."
    )
    seed: int = Field(0, ge=0, description="Seed of the sampling generator when none is passed.")
    weights: Literal["ema", "raw"] = Field(
        "ema",
        description="ema: the moving average of the weights where training kept one (transformer.train.ema_decay > "
        "0), else the weights; raw: the trained weights always.",
    )
    preset: Literal["none", "var_fid"] = Field(
        "none",
        description="var_fid: VAR's FID recipe (its cfg 1.5 = guidance 2.5, linear schedule, top-k 900, top-p 0.96, "
        "temperature 1), replacing those keys; none: the keys as written.",
    )

    def resolved(self) -> SamplingConfig:
        """The settings sampling uses: the preset's values where a preset is chosen."""
        if self.preset == "var_fid":
            return dataclasses.replace(self, **VAR_FID_SAMPLING, preset="none")
        return self


# VAR's released FID/IS numbers use cfg = 1.5 (our guidance 1 + 1.5), top-k 900, top-p 0.96 (its README, demo).
VAR_FID_SAMPLING = {
    "guidance": 2.5,
    "guidance_schedule": "linear_scales",
    "top_k": 900,
    "top_p": 0.96,
    "temperature": 1.0,
}


# ---------------------------------------------------------------------------------------------------------------
# The network


class KVCache:
    """One layer's keys and values of the tokens generated so far, filled map by map."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.k_BHLc: torch.Tensor | None = None
        self.v_BHLc: torch.Tensor | None = None

    def extend(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a map's keys and values; return those of every token so far."""
        if self.k_BHLc is None:  # allocated once at the first map's dtype: no concatenation per map
            B, H, _, c = k_BHlc.shape
            self.k_BHLc = k_BHlc.new_empty(B, H, self.capacity, c)
            self.v_BHLc = v_BHlc.new_empty(B, H, self.capacity, c)
        end = self.length + k_BHlc.shape[2]
        self.k_BHLc[:, :, self.length : end] = k_BHlc
        self.v_BHLc[:, :, self.length : end] = v_BHlc
        self.length = end
        return self.k_BHLc[:, :, :end], self.v_BHLc[:, :, :end]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.qk_norm = heads, qk_norm
        # Biases on q and v only, as in VAR: a k bias adds q·b_k to every score of a query, which softmax ignores
        # in plain attention, so VAR fixes it at zero (and we keep its parameterisation under q/k normalisation).
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("k_bias", torch.zeros(width), persistent=False)
        self.proj = nn.Linear(width, width)
        if qk_norm:
            # Per-head temperature of cosine attention, learned in log space from 4 and capped at 100 (VAR).
            self.log_scale_H = nn.Parameter(torch.full((heads,), math.log(4.0)))

    def forward(
        self, x_BLC: torch.Tensor, mask_LL: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        B, L, C = x_BLC.shape
        H = self.heads
        bias = torch.cat([self.q_bias, self.k_bias, self.v_bias])
        q, k, v = F.linear(x_BLC, self.qkv.weight, bias).view(B, L, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        scale = 0.25 / math.sqrt(C // H)  # VAR's temperature without q/k normalisation: 4× SDPA's 1/√c
        if self.qk_norm:
            scale_H11 = self.log_scale_H.clamp_max(math.log(100.0)).exp().view(H, 1, 1)
            q = F.normalize(q, dim=-1) * scale_H11.to(q.dtype)  # an fp32 scale must not promote bf16 q
            k = F.normalize(k, dim=-1)
            scale = 1.0
        if cache is not None:
            k, v = cache.extend(k, v)
        y_BHLc = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_LL, scale=scale)
        return self.proj(y_BHLc.transpose(1, 2).reshape(B, L, C))


class Block(nn.Module):
    """VAR's AdaLNSelfAttn: pre-norm attention and tanh-GELU MLP, each shifted, scaled and gated by the class."""

    def __init__(self, cfg: TransformerModelConfig, drop_path: float = 0.0):
        super().__init__()
        width = cfg.resolved_width
        self.eps, self.dropout, self.drop_path = cfg.norm_eps, cfg.dropout, drop_path
        self.attn = Attention(width, cfg.resolved_heads, cfg.qk_norm)
        self.fc1 = nn.Linear(width, round(width * cfg.mlp_ratio))
        self.fc2 = nn.Linear(round(width * cfg.mlp_ratio), width)

    def forward(
        self, x_BLC: torch.Tensor, mod_B16C: torch.Tensor, mask_LL: torch.Tensor | None, cache: KVCache | None
    ) -> torch.Tensor:
        gate1, gate2, scale1, scale2, shift1, shift2 = mod_B16C.unbind(2)  # each B1C
        C = x_BLC.shape[-1]
        h = torch.addcmul(shift1, F.layer_norm(x_BLC, (C,), eps=self.eps), scale1 + 1)
        h = F.dropout(self.attn(h, mask_LL, cache), self.dropout, self.training)
        x_BLC = torch.addcmul(x_BLC, self._keep_B11(x_BLC) * gate1, h)
        h = torch.addcmul(shift2, F.layer_norm(x_BLC, (C,), eps=self.eps), scale2 + 1)
        h = F.dropout(self.fc2(F.gelu(self.fc1(h), approximate="tanh")), self.dropout, self.training)
        return torch.addcmul(x_BLC, self._keep_B11(x_BLC) * gate2, h)

    def _keep_B11(self, x_BLC: torch.Tensor) -> torch.Tensor | float:
        """Stochastic depth: per sample, drop the branch with probability p and scale the kept ones by 1/(1 − p)."""
        if not self.training or self.drop_path == 0:
            return 1.0
        keep = 1 - self.drop_path
        return x_BLC.new_empty(x_BLC.shape[0], 1, 1).bernoulli_(keep) / keep


def block_causal_mask(lengths: list[int]) -> torch.Tensor:
    """mask_LL[i, j]: token i may attend to token j, i.e. j's map is i's map or an earlier one."""
    map_L = torch.repeat_interleave(torch.arange(len(lengths), device="cpu"), torch.tensor(lengths, device="cpu"))
    return map_L[None, :] <= map_L[:, None]


class CART(nn.Module):
    """Class-conditional decoder-only transformer over a ``TokenLayout``, its head (``self.head``) turning the trunk's
    output of a token into the token: a ``SoftmaxHead`` over the codebook; with ``clusters`` > 0 a
    ``CoarseToFineHead`` (its fine head registered as ``self.fine``); with ``diffusion`` (continuous tokens) a
    ``ContinuousHead`` (its denoiser registered as ``self.diffusion``, its per-map scales as ``token_rms_M``).
    """

    def __init__(
        self,
        cfg: TransformerModelConfig,
        layout: TokenLayout,
        num_classes: int,
        codebook_size: int,
        latent_channels: int,
        *,
        clusters: int = 0,
        diffusion: DiffusionConfig | None = None,
    ):
        super().__init__()
        self.cfg, self.layout = cfg, layout
        self.num_classes, self.codebook_size, self.latent_channels = num_classes, codebook_size, latent_channels
        C = cfg.resolved_width
        # Embeddings are nn.Embedding (tables, not matrices) so that decay_groups leaves them undecayed.
        self.class_embed = nn.Embedding(num_classes + 1, C)  # the last row is the unconditional class
        self.start_embed = nn.Embedding(layout.lengths[0], C)  # VAR's pos_start: map 0 = class + this
        self.input_embed = nn.Linear(latent_channels, C)
        self.pos_embed = nn.Embedding(layout.num_tokens, C)
        level_ids = layout.map_level_ids()
        self.level_embed = nn.Embedding(max(level_ids) + 1, C)
        # Index buffers are made on the CPU whatever the default device: a model built on the meta device (sizes
        # without memory, as `cart plan` builds a d30) then still has its mask, which forward_flops counts.
        lengths = torch.tensor(layout.lengths, device="cpu")
        level_L = torch.repeat_interleave(torch.tensor(level_ids, device="cpu"), lengths)
        self.register_buffer("level_L", level_L, persistent=False)
        # The tokens predicted at once, step by step: every map's (next-map) or one (next-token). A token sees
        # its own step and the ones before it.
        self.step_lengths = layout.lengths if cfg.prediction == "next_map" else [1] * layout.num_tokens
        self.step_ends = set(itertools.accumulate(self.step_lengths))
        self.register_buffer("mask_LL", block_causal_mask(self.step_lengths), persistent=False)
        # One GEMM yields every block's six AdaLN vectors and the head's two: the class is all they depend on.
        self.ada_lin = nn.Linear(C, (6 * cfg.depth + 2) * C)
        rates = torch.linspace(0, cfg.resolved_drop_path, cfg.depth, device="cpu").tolist()  # VAR's linear rule
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)
        # The head. Weight files name its tensors head.*, fine.* (the fine head), diffusion.* (the denoiser) and
        # token_rms_M, so those parts are registered here, in this order (the order of the init's random draws).
        if clusters and diffusion is not None:
            raise ValueError("coarse-to-fine prediction needs a codebook: clusters > 0 and a diffusion head exclude")
        self.fine: FineHead | None = None
        self.diffusion: DiffusionHead | None = None
        self.head: Head
        if diffusion is not None:
            self.head = ContinuousHead(self)
        elif clusters:
            self.head = CoarseToFineHead(C, codebook_size, clusters)
            self.fine = self.head.fine
        else:
            self.head = SoftmaxHead(C, codebook_size)
        # Training recomputes each block's activations in the backward pass instead of keeping them (set by the
        # training task; not part of the architecture or the weights).
        self.checkpoint_activations = False
        self._init_weights()
        if diffusion is not None:  # built after the trunk's init, which it must not draw from
            self.diffusion = DiffusionHead(diffusion, latent_channels, C)
            # Every map's token RMS (the manifest's token_rms): the head models tokens divided by it.
            self.register_buffer("token_rms_M", torch.ones(layout.num_maps))

    def decayed_embeddings(self) -> list[nn.Parameter]:
        """Embedding tables that weight decay applies to all the same (VAR decays its class embedding)."""
        return [self.class_embed.weight] if self.cfg.decay_class_embedding else []

    @property
    def unconditional(self) -> int:
        """The class index of unconditional generation (classifier-free guidance)."""
        return self.num_classes

    def _init_weights(self):
        """VAR's init: blocks start as near-identity (tiny gates), residual projections scaled by 1/√(2·depth)."""
        cfg = self.cfg
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=cfg.resolved_init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        C, depth = cfg.resolved_width, cfg.depth
        with torch.no_grad():
            self.head.scale_init(cfg.init_head)
            factor_K = torch.full((6 * depth + 2,), cfg.init_adaln)
            factor_K[: 6 * depth].view(depth, 6)[:, :2] = cfg.init_gate  # gate1, gate2 of every block
            self.ada_lin.weight.view(6 * depth + 2, C, C).mul_(factor_K.view(-1, 1, 1))
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * depth))
                block.fc2.weight.div_(math.sqrt(2 * depth))

    # -- pieces shared by teacher forcing and sampling -------------------------------------------------------

    def condition(self, label_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class embeddings and every AdaLN vector: (cond_BC, mod_B1KC) with K = 6·depth + 2."""
        cond_BC = self.class_embed(label_B)
        K = 6 * self.cfg.depth + 2
        return cond_BC, self.ada_lin(F.silu(cond_BC)).view(len(label_B), 1, K, -1)

    def position(self, start: int, end: int) -> torch.Tensor:
        """Position plus level embedding of tokens start … end − 1: pos_lC."""
        return self.pos_embed.weight[start:end] + self.level_embed(self.level_L[start:end])

    @property
    def start_length(self) -> int:
        """Tokens predicted from the class alone: map 0's (next-map), or the first token (next-token)."""
        return self.step_lengths[0]

    def start_tokens(self, cond_BC: torch.Tensor) -> torch.Tensor:
        """The first inputs: the class embedding at every position of the first map (or the first token)."""
        L0 = self.start_length
        return cond_BC[:, None] + (self.start_embed.weight[:L0] + self.position(0, L0))

    def trunk(
        self,
        x_BLC: torch.Tensor,
        mod_B1KC: torch.Tensor,
        mask_LL: torch.Tensor | None,
        caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        """Blocks and the head's AdaLN: h_BLC, which ``self.head`` turns into tokens."""
        recompute = self.checkpoint_activations and caches is None and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            mod_B16C = mod_B1KC[:, :, 6 * i : 6 * i + 6]
            if recompute:
                # The RNG state is replayed in the recomputation: the same stochastic-depth and dropout draws.
                x_BLC = torch.utils.checkpoint.checkpoint(block, x_BLC, mod_B16C, mask_LL, None, use_reentrant=False)
            else:
                x_BLC = block(x_BLC, mod_B16C, mask_LL, None if caches is None else caches[i])
        scale, shift = mod_B1KC[:, :, -2:].unbind(2)
        return torch.addcmul(shift, F.layer_norm(x_BLC, x_BLC.shape[-1:], eps=self.cfg.norm_eps), scale + 1)

    # -- teacher forcing ---------------------------------------------------------------------------------------

    def hidden(self, label_B: torch.Tensor, x_BlC: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: the trunk's output h_BLC of every token from the class and the inputs of maps 1 … M−1,
        which the head turns into tokens (e.g. ``self.head(h_BLC)``, the softmax head's logits).

        ``x_BlC`` is ``teacher_forcing_inputs``; the inputs of maps 1 … m only (any whole-map prefix) give the
        outputs of maps 0 … m, the same as the full sequence would (the mask is block-causal). Next-token
        prediction reads the code vectors of tokens 0 … L−2 and any prefix of them.
        """
        if self.training and self.cfg.class_dropout > 0:
            dropped_B = torch.rand(label_B.shape, device=label_B.device) < self.cfg.class_dropout
            label_B = torch.where(dropped_B, self.unconditional, label_B)
        L0 = self.start_length
        L = L0 + x_BlC.shape[1]
        if L not in self.step_ends:
            raise ValueError(f"{x_BlC.shape[1]} input tokens are not the inputs of whole maps 1 … m")
        cond_BC, mod_B1KC = self.condition(label_B)
        with torch.autocast(x_BlC.device.type, enabled=False):  # embeddings in fp32 whatever the precision, as VAR
            x_BLC = torch.cat([self.start_tokens(cond_BC), self.input_embed(x_BlC) + self.position(L0, L)], dim=1)
        return self.trunk(x_BLC, mod_B1KC, self.mask_LL[:L, :L])

    def forward(self, label_B: torch.Tensor, x_BlC: torch.Tensor, target_BL: torch.Tensor) -> TokenLoss:
        """The head's loss of every token under teacher forcing (``hidden``), the targets ``target_BL`` the codes
        idx_BL (or continuous tokens z_BLC) of the tokens whose outputs ``x_BlC`` gives. The head's loss is computed
        here, so that DDP sees the head in its forward."""
        return self.head.loss(self.hidden(label_B, x_BlC), target_BL)


def forward_flops(model: CART, trunk_rows: int, head_rows: int, diffusion_steps: int | None = None) -> float:
    """Forward FLOPs of whole sequences: 2 per weight each token multiplies (not the per-image class and AdaLN
    weights) plus QKᵀ and AV over the keys each query may see; the head runs on ``head_rows`` of them, a
    coarse-to-fine model's fine head on every trunk row (guidance mixes its logits, not its input). A diffusion
    head runs once per noise draw in training, or ``diffusion_steps`` times in sampling (``sampling_flops``).
    Training costs 3× the forward of its batch (forward and twice that backward)."""
    layout, C, depth = model.layout, model.cfg.resolved_width, model.cfg.depth
    trunk = sum(p.numel() for m in [*model.blocks, model.input_embed] for p in m.parameters() if p.ndim == 2)
    visible = int(model.mask_LL.sum())  # query-key pairs the mask lets through
    per_sequence = 2 * trunk * layout.num_tokens + 4 * C * visible * depth
    every_row, head = model.head.matrix_weights(diffusion_steps)
    return trunk_rows * (per_sequence + 2 * every_row * layout.num_tokens) + head_rows * 2 * head * layout.num_tokens


def sampling_flops(model: CART, guided: bool, diffusion_steps: int) -> float:
    """Forward FLOPs of sampling one image with the KV cache: every token through the trunk once, on two rows when
    guided (conditional and unconditional); a head that guidance mixes the input of runs on the mix only, a
    diffusion head on both rows, ``diffusion_steps`` times."""
    rows = 2 if guided else 1
    return forward_flops(model, rows, 1 if model.head.mixes_input else rows, diffusion_steps)


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def teacher_forcing_inputs(model: CART, tokenizer: Tokenizer, tokens: list[torch.Tensor]) -> torch.Tensor:
    """What ``model`` reads for the token maps ``tokens``: f̂ before every map (next-map), or the code vector of
    every token but the last, in sequence order (next-token: codes only)."""
    if model.cfg.prediction == "next_map":
        return tokenizer.teacher_forcing_inputs(tokens)
    idx_BL = torch.cat([idx.flatten(1) for idx in tokens], dim=1)
    return tokenizer.codebook.weight.detach()[idx_BL[:, :-1]]


def guidance_weight(cfg: SamplingConfig, map_index: int, layout: TokenLayout) -> float:
    """w at map m. linear_scales: VAR's t = cfg·m/(S−1) over its S scales, held at w after them (appended details).

    Why not the ramp over all M maps: appended, CART's base maps are VAR's maps, but a ramp over M > S maps gives
    them less guidance than VAR gives the same maps at the same w (the full-latent base map m = S−1 would get
    1 + (w−1)(S−1)/(M−1)), so the two orders would be compared at different effective guidance.
    """
    if cfg.guidance_schedule == "constant":
        return cfg.guidance
    ramp = layout.num_maps if cfg.guidance_schedule == "linear" else layout.num_scales
    ratio = min(map_index / (ramp - 1), 1.0) if ramp > 1 else 1.0
    return 1 + (cfg.guidance - 1) * ratio


@torch.no_grad()
def generate(
    model: CART,
    tokenizer: Tokenizer,
    label_B: torch.Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
    on_map: Callable[[int, list[torch.Tensor]], None] | None = None,
    prefix: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Sample token maps in generation order, map by map with a KV cache: idx_Bhw (codes), or z_BChw (continuous
    tokens).

    ``generator`` (default: seeded with cfg.seed on the labels' device) makes the draw deterministic;
    ``on_map(m, maps)`` is called after each map with the maps so far (e.g. to decode prefixes). ``prefix``
    gives the first maps instead of sampling them (e.g. base maps, to sample only the details): they are returned
    as they are and draw nothing from the generator.
    """
    cfg = cfg.resolved()
    if generator is None:
        generator = torch.Generator(label_B.device).manual_seed(cfg.seed)
    if model.cfg.prediction == "next_token":
        if prefix:
            raise ValueError("next-token prediction samples whole sequences: a prefix of maps is not supported")
        return _generate_tokens(model, tokenizer, label_B, cfg, generator, on_map)
    layout, B, head = model.layout, len(label_B), model.head
    prefix = prefix or []
    expected = [head.map_shape(B, m.side) for m in layout.maps[: len(prefix)]]
    if len(prefix) > layout.num_maps or [tuple(i.shape) for i in prefix] != expected:
        raise ValueError(f"prefix shapes {[tuple(i.shape) for i in prefix]}: expected the first maps, {expected}")
    guided = cfg.guidance != 1.0
    mod_B1KC, caches, x_BlC = _start_sampling(model, label_B, guided)
    f_hat_BChw, maps = None, []
    for m, token_map in enumerate(layout.maps):
        h_BlC = model.trunk(x_BlC, mod_B1KC, None, caches)  # a given map still fills the cache
        if m < len(prefix):
            tokens = prefix[m]
        else:
            weight = guidance_weight(cfg, m, layout) if guided else None
            tokens = head.as_map(head.sample(h_BlC, m, weight, cfg, generator), token_map.side)
        maps.append(tokens)
        if on_map is not None:
            on_map(m, list(maps))
        if m + 1 == layout.num_maps:
            break
        h_BChw = tokenizer.map_contribution(tokens, m)
        f_hat_BChw = h_BChw if f_hat_BChw is None else f_hat_BChw + h_BChw
        next_BlC = tokenizer.next_input(f_hat_BChw, m + 1).flatten(2).transpose(1, 2)
        x_BlC = model.input_embed(next_BlC) + model.position(layout.offsets[m + 1], layout.offsets[m + 2])
        if guided:
            x_BlC = x_BlC.repeat(2, 1, 1)
    return maps


def _start_sampling(
    model: CART, label_B: torch.Tensor, guided: bool
) -> tuple[torch.Tensor, list[KVCache], torch.Tensor]:
    """AdaLN vectors, empty KV caches and the first inputs; guided, the unconditional rows follow the others."""
    if guided:
        label_B = torch.cat([label_B, torch.full_like(label_B, model.unconditional)])
    cond_BC, mod_B1KC = model.condition(label_B)
    return mod_B1KC, [KVCache(model.layout.num_tokens) for _ in model.blocks], model.start_tokens(cond_BC)


def _generate_tokens(
    model: CART,
    tokenizer: Tokenizer,
    label_B: torch.Tensor,
    cfg: SamplingConfig,
    generator: torch.Generator,
    on_map: Callable[[int, list[torch.Tensor]], None] | None,
) -> list[torch.Tensor]:
    """Next-token sampling: one token per step in sequence order, each step reading the code drawn before it."""
    layout, B = model.layout, len(label_B)
    guided = cfg.guidance != 1.0
    mod_B1KC, caches, x_B1C = _start_sampling(model, label_B, guided)
    map_of_token = [m for m, length in enumerate(layout.lengths) for _ in range(length)]
    drawn: list[torch.Tensor] = []
    for i in range(layout.num_tokens):
        h_B1C = model.trunk(x_B1C, mod_B1KC, None, caches)
        weight = guidance_weight(cfg, map_of_token[i], layout) if guided else None
        drawn.append(model.head.sample(h_B1C, map_of_token[i], weight, cfg, generator))
        if i + 1 == layout.num_tokens:
            break
        z_B1C = tokenizer.codebook.weight.detach()[drawn[-1]]
        x_B1C = model.input_embed(z_B1C) + model.position(i + 1, i + 2)
        if guided:
            x_B1C = x_B1C.repeat(2, 1, 1)
    idx_BL = torch.cat(drawn, dim=1)
    maps = [
        idx_BL[:, start:end].view(B, m.side, m.side)
        for m, start, end in zip(layout.maps, layout.offsets, layout.offsets[1:], strict=False)
    ]
    if on_map is not None:
        for m in range(layout.num_maps):
            on_map(m, maps[: m + 1])
    return maps


# ---------------------------------------------------------------------------------------------------------------
# Weights


# The keys of <stem>.json in the order its files have always had them, the head's (``config``) among them.
CONFIG_KEYS = ("model", "diffusion", "num_classes", "codebook_size", "latent_channels", "layout", "coarse_labels")


def save_transformer(stem: str | Path, model: CART, extra: dict | None = None) -> None:
    """``<stem>.safetensors`` + ``<stem>.json``: architecture (and the head's: a diffusion head's settings, the coarse
    label of every code), class count, codebook, latent channels, layout."""
    entries = {
        "model": dataclasses.asdict(model.cfg),
        "num_classes": model.num_classes,
        "codebook_size": model.codebook_size,
        "latent_channels": model.latent_channels,
        "layout": model.layout.to_json(),
        **model.head.config(),
    }
    config = {key: entries.pop(key) for key in CONFIG_KEYS if key in entries} | entries | (extra or {})
    save_weights(stem, model, config)


def ema_stem(stem: str | Path) -> Path:
    """Where training saves the moving average of the weights saved at ``stem``: ``<stem>_ema``."""
    stem = Path(stem)
    return stem.with_name(f"{stem.name}_ema")


def sampling_stem(stem: str | Path, weights: Literal["ema", "raw"]) -> tuple[Path, Literal["ema", "raw"]]:
    """The weights to sample with (``SamplingConfig.weights``): the average at ``<stem>_ema`` when asked for and
    present, else ``stem`` itself; and which of the two it is."""
    if weights == "ema" and weights_path(ema_stem(stem)).is_file():
        return ema_stem(stem), "ema"
    return Path(stem), "raw"


def load_transformer(stem: str | Path, device: torch.device | str = "cpu") -> tuple[CART, dict]:
    """The transformer saved at ``stem`` (in eval mode) and its config."""
    config = load_config(stem)
    layout = TokenLayout.from_json(config["layout"])
    coarse_V = torch.tensor(config["coarse_labels"]) if "coarse_labels" in config else None
    model = CART(
        TransformerModelConfig(**config["model"]),
        layout,
        config["num_classes"],
        config["codebook_size"],
        config["latent_channels"],
        clusters=0 if coarse_V is None else int(coarse_V.max()) + 1,
        # A head saved before the learned variance existed has none: it loads, and samples, as "fixed".
        diffusion=DiffusionConfig(**{"variance": "fixed", **config["diffusion"]}) if "diffusion" in config else None,
    )
    if coarse_V is not None:
        model.fine.set_clusters(coarse_V)
    model.load_state_dict(load_state(stem, device))
    return model.to(device).eval(), config


def build_model(
    cfg: TransformerModelConfig,
    manifest: dict,
    seed: int,
    *,
    coarse_V: torch.Tensor | None = None,
    diffusion: DiffusionConfig | None = None,
) -> CART:
    """A fresh transformer for the tokens of ``manifest``, initialised from ``seed``; with ``coarse_V`` (the coarse
    label of every code) a coarse-to-fine one; with ``diffusion``, that diffusion head (continuous tokens), its
    per-map scales the manifest's token RMS."""
    torch.manual_seed(seed)
    model = CART(
        cfg,
        TokenLayout.from_json(manifest["layout"]),
        len(manifest["classes"]),
        manifest["codebook_size"],
        manifest["latent_channels"],
        clusters=0 if coarse_V is None else int(coarse_V.max()) + 1,
        diffusion=diffusion,
    )
    if coarse_V is not None:
        model.fine.set_clusters(coarse_V)
    if diffusion is not None:
        with torch.no_grad():
            model.token_rms_M.copy_(torch.tensor(manifest["token_rms"]))
    return model
