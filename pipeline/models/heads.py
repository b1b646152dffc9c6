"""The transformer's output heads, each owning its loss and its sampler (as MAR's diffusion loss does).

The trunk of ``pipeline.models.transformer.CART`` gives one hidden state h per token; a head turns it into a token:

- ``SoftmaxHead``: logits over the codebook (VAR, CART).
- ``CoarseToFineHead``: logits over K coarse labels, then the fine head's logits over the codes of the drawn label
  (``pipeline.models.coarse``).
- ``ContinuousHead``: MAR's diffusion head draws a continuous token from h (``pipeline.models.diffusion``).

Every head has the same interface, so that teacher forcing, sampling and the training loop never ask which one
they have: ``loss(h_BLC, target)`` gives a ``TokenLoss``; ``sample(h_BlC, map_index, weight, cfg, generator)``
draws the tokens of rows of h (guided: the conditional rows, then the unconditional ones, mixed with guidance
``weight``); ``as_map`` and ``map_shape`` give a map's tokens their map shape (idx_Bhw, or z_BChw for vectors).

Weight files name the heads' tensors as the transformer always registered them: ``head.*`` (the logits), ``fine.*``
(the fine head), ``diffusion.*`` (the denoiser) and ``token_rms_M``. So the fine head, the denoiser and the scales
stay registered on the transformer, and the head that uses them refers to them without owning them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.coarse import FineHead

if TYPE_CHECKING:
    from pipeline.models.diffusion import DiffusionHead
    from pipeline.models.transformer import CART, SamplingConfig


class TokenLoss(NamedTuple):
    """A head's loss of every token, loss_BL; whether its greedy prediction is the target, correct_BL (None: the head
    has no greedy prediction, as continuous tokens); and the mean of each term of a loss that has several."""

    loss_BL: torch.Tensor
    correct_BL: torch.Tensor | None
    parts: dict[str, torch.Tensor]


def refer(module: nn.Module, name: str, other: nn.Module) -> None:
    """Give ``module`` the attribute ``name`` = ``other`` without registering ``other`` as its submodule: ``other``
    is registered elsewhere, under the name weight files give its tensors (a copy of the whole model, as the moving
    average is, still refers to the copy of ``other``)."""
    object.__setattr__(module, name, other)


def sample_tokens(logits_BlV: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One code per token: temperature, top-k, top-p, then a draw with ``generator``: idx_Bl."""
    B, l, V = logits_BlV.shape
    logits_NV = logits_BlV.float().flatten(0, 1) / cfg.temperature
    candidates_NV = None  # codes of the kept columns when filtering narrowed them (descending logit order)
    if 0 < cfg.top_k < V:
        logits_NV, candidates_NV = logits_NV.topk(cfg.top_k, dim=-1)
    if 0 < cfg.top_p < 1:
        if candidates_NV is None:
            logits_NV, candidates_NV = logits_NV.sort(dim=-1, descending=True)
        probs_NV = logits_NV.softmax(-1)
        # Drop a code once the likelier ones already cover top_p: the likeliest always stays.
        logits_NV = logits_NV.masked_fill(probs_NV.cumsum(-1) - probs_NV >= cfg.top_p, -torch.inf)
    # Inverse-CDF draw: one uniform per token, where torch.multinomial would draw one per candidate code.
    cdf_NV = logits_NV.softmax(-1).cumsum(-1)
    total_N1 = cdf_NV[:, -1:]
    u_N1 = torch.rand(total_N1.shape, generator=generator, device=cdf_NV.device) * total_N1
    u_N1 = torch.minimum(u_N1, torch.nextafter(total_N1, torch.zeros_like(total_N1)))  # u < total despite rounding
    choice_N1 = torch.searchsorted(cdf_NV, u_N1, right=True)  # right: a code of probability 0 is never drawn
    idx_N1 = choice_N1 if candidates_NV is None else candidates_NV.gather(-1, choice_N1)
    return idx_N1.view(B, l)


def guide(rows: torch.Tensor, weight: float | None) -> torch.Tensor:
    """Classifier-free guidance of per-row predictions: the conditional rows, then the unconditional ones, mixed as
    uncond + w·(cond − uncond); unguided (``weight`` None) the rows as they are."""
    if weight is None:
        return rows
    cond, uncond = rows.chunk(2)
    return torch.lerp(uncond, cond, weight)


class CodeHead(nn.Linear):
    """A head whose tokens are codes: an affine map of h to logits. Guiding its input guides its logits (uncond +
    w·(cond − uncond)) at half the cost of a head over both halves."""

    mixes_input = True  # guidance mixes the head's input: it runs on one row per token, guided or not

    def scale_init(self, factor: float) -> None:
        """Scale the initial output weights (VAR's init_head)."""
        self.weight.mul_(factor)

    def map_shape(self, batch: int, side: int) -> tuple[int, ...]:
        return (batch, side, side)

    def as_map(self, idx_Bl: torch.Tensor, side: int) -> torch.Tensor:
        """A map's codes in its shape: idx_Bhw."""
        return idx_Bl.unflatten(1, (side, side))

    def sample(
        self,
        h_BlC: torch.Tensor,
        map_index: int,
        weight: float | None,
        cfg: SamplingConfig,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """One index per token of the rows of h (map ``map_index``'s), drawn from the guided logits: idx_Bl."""
        return sample_tokens(self(guide(h_BlC, weight)), cfg, generator)


class SoftmaxHead(CodeHead):
    """Logits over the codebook: the code's cross-entropy, and codes drawn from the guided logits."""

    description = "softmax head"

    def loss(self, h_BLC: torch.Tensor, idx_BL: torch.Tensor) -> TokenLoss:
        logits_BLV = self(h_BLC)
        loss_BL = F.cross_entropy(logits_BLV.float().transpose(1, 2), idx_BL, reduction="none")
        return TokenLoss(loss_BL, logits_BLV.argmax(-1) == idx_BL, {})

    def matrix_weights(self, steps: int | None = None) -> tuple[int, int]:
        """Weights one token multiplies (for FLOP counts): in every trunk row, and in the head's rows."""
        return 0, self.weight.numel()

    def config(self) -> dict[str, Any]:
        """What the model's JSON records of the head beside the architecture (nothing: the codebook size is there)."""
        return {}

    def options(self) -> dict[str, Any]:
        """The keyword arguments of ``build_model`` that build this head afresh."""
        return {}

    def metrics(self) -> dict[str, Any]:
        """What ``metrics/transformer.json`` records of the head (nothing)."""
        return {}


class CoarseToFineHead(CodeHead):
    """Logits over the K coarse labels, then the fine head's over the codes of the label (``pipeline.models.coarse``).

    The loss is the coarse label's cross-entropy plus the fine code's given the true label (teacher forcing), i.e.
    −log p(label)·p(code | label), the code's NLL as the softmax head's; the greedy prediction (likeliest label, then
    its likeliest code) is right exactly when both argmaxes are. Sampling draws the label from the guided label
    logits, then the code given it; the fine head is not affine in h, so its logits are guided themselves, from
    both halves.
    """

    description = "coarse-to-fine head"
    fine: FineHead

    def __init__(self, width: int, codebook_size: int, clusters: int):
        super().__init__(width, clusters)
        refer(self, "fine", FineHead(width, codebook_size, clusters))  # the transformer registers it as `fine`

    def scale_init(self, factor: float) -> None:
        super().scale_init(factor)
        self.fine.fc2.weight.mul_(factor)

    def loss(self, h_BLC: torch.Tensor, idx_BL: torch.Tensor) -> TokenLoss:
        coarse_BL = self.fine.cluster_V[idx_BL]
        logits_BLK, fine_BLV = self(h_BLC), self.fine(h_BLC, coarse_BL)
        fine_BLV = self.fine.restrict(fine_BLV.float(), coarse_BL)
        coarse_loss_BL = F.cross_entropy(logits_BLK.float().transpose(1, 2), coarse_BL, reduction="none")
        fine_loss_BL = F.cross_entropy(fine_BLV.transpose(1, 2), idx_BL, reduction="none")
        correct_BL = (logits_BLK.argmax(-1) == coarse_BL) & (fine_BLV.argmax(-1) == idx_BL)
        parts = {"loss_coarse": coarse_loss_BL.detach().mean(), "loss_fine": fine_loss_BL.detach().mean()}
        return TokenLoss(coarse_loss_BL + fine_loss_BL, correct_BL, parts)

    def sample(
        self,
        h_BlC: torch.Tensor,
        map_index: int,
        weight: float | None,
        cfg: SamplingConfig,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """One code per token, its label drawn first: idx_Bl."""
        coarse_Bl = super().sample(h_BlC, map_index, weight, cfg, generator)
        fine_BlV = guide(self.fine(h_BlC, coarse_Bl if weight is None else coarse_Bl.repeat(2, 1)), weight)
        return sample_tokens(self.fine.restrict(fine_BlV, coarse_Bl), cfg, generator)

    def matrix_weights(self, steps: int | None = None) -> tuple[int, int]:
        # The fine head runs on every trunk row: guidance mixes its logits, not its input.
        return sum(m.weight.numel() for m in (self.fine.fc1, self.fine.fc2)), self.weight.numel()

    def config(self) -> dict[str, Any]:
        # The coarse label of every code, i.e. the clustering the head was trained with.
        return {"coarse_labels": self.fine.cluster_V.tolist()}

    def options(self) -> dict[str, Any]:
        return {"coarse_V": self.fine.cluster_V}

    def metrics(self) -> dict[str, Any]:
        return {"coarse_clusters": self.fine.clusters}  # k-means may leave fewer than asked for


class ContinuousHead(nn.Module):
    """MAR's diffusion head over continuous tokens: the trunk's output h of a token is the condition z of the
    denoiser (``transformer.diffusion``), which models the token divided by its map's token RMS
    (``transformer.token_rms_M``, the manifest's), so that the small residuals of late maps meet the noise schedule
    at unit scale as the coarse maps do. The loss is the diffusion loss of every token; there is no greedy
    prediction. Sampling gives the denoiser both halves of guided rows: guidance combines its predictions."""

    description = "diffusion head"
    mixes_input = False  # the denoiser runs on both rows of guided sampling, once per reverse step
    transformer: CART

    def __init__(self, transformer: CART):
        super().__init__()
        refer(self, "transformer", transformer)  # which registers the denoiser and the scales under their names

    def scale_init(self, factor: float) -> None:
        """Nothing to scale: the denoiser, built after the transformer's init, initialises itself."""

    @property
    def denoiser(self) -> DiffusionHead:
        return self.transformer.diffusion

    def scale_L(self, length: int) -> torch.Tensor:
        """The scale of each of the first ``length`` tokens: its map's token RMS."""
        token_rms_M = self.transformer.token_rms_M
        lengths = torch.tensor(self.transformer.layout.lengths, device=token_rms_M.device)
        return torch.repeat_interleave(token_rms_M.clamp_min(1e-6), lengths)[:length]

    def loss(self, h_BLC: torch.Tensor, z_BLC: torch.Tensor) -> TokenLoss:
        B, L, _ = h_BLC.shape
        target_BLC = z_BLC / self.scale_L(L)[:, None]
        return TokenLoss(self.denoiser.loss(h_BLC.flatten(0, 1), target_BLC.flatten(0, 1)).view(B, L), None, {})

    def sample(
        self,
        h_BlC: torch.Tensor,
        map_index: int,
        weight: float | None,
        cfg: SamplingConfig,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Map ``map_index``'s continuous tokens z_BlC, each drawn by the denoiser from its h."""
        rows, l, _ = h_BlC.shape
        x_NC = self.denoiser.sample(h_BlC.flatten(0, 1), cfg.diffusion_steps, cfg.temperature, generator, weight)
        scale = self.transformer.token_rms_M[map_index].clamp_min(1e-6)
        return x_NC.view(rows if weight is None else rows // 2, l, -1) * scale

    def map_shape(self, batch: int, side: int) -> tuple[int, ...]:
        return (batch, self.transformer.latent_channels, side, side)

    def as_map(self, z_BlC: torch.Tensor, side: int) -> torch.Tensor:
        """A map's vectors in its shape: z_BChw."""
        return z_BlC.transpose(1, 2).unflatten(2, (side, side))

    def matrix_weights(self, steps: int | None = None) -> tuple[int, int]:
        """One denoising pass per noise draw in training, or per reverse step (``steps``) in sampling."""
        return 0, self.denoiser.matrix_weights() * (steps or self.denoiser.cfg.draws)

    def config(self) -> dict[str, Any]:
        return {"diffusion": dataclasses.asdict(self.denoiser.cfg)}

    def options(self) -> dict[str, Any]:
        return {"diffusion": self.denoiser.cfg}

    def metrics(self) -> dict[str, Any]:
        return {}


Head = SoftmaxHead | CoarseToFineHead | ContinuousHead
