"""Self-correction training (DetailFlow, 2025), adapted to next-map prediction over the base–detail token maps.

A whole map is drawn at once in sampling, so its errors reach every later map through f̂. With probability p a
training sample gets one map m (any but the last) whose tokens are partly replaced by other codes: a fraction
``ratio`` of them, each by a code drawn uniformly from the other V − 1. The inputs of the maps after m are then
composed from that perturbed prefix, and their targets are the codes that steer back: Algorithm 1's maps after m
re-quantise the residual between where the clean tokens lead and the perturbed composition. Algorithm 1 quantises
each component towards its own target (the base maps towards f_{B_n}, D_t's maps towards f_{B_{t−1}}); from tokens
alone the best stand-in for that target is the clean composition at the component's end, so a map after m in
component c re-quantises (clean f̂ after component c) − (perturbed f̂ so far), and the last component's target is
the clean full f̂. Map m itself keeps its clean target (its input, the maps before it, is clean).

Uniform codes rather than the model's own predictions: they cost no extra forward pass, they do not depend on the
state of the model (so a perturbation is the same whatever the run did before, and an early, near-uniform model
would draw much the same), and the corrected targets teach the steering back whatever the error was.
"""

from __future__ import annotations

import torch

from pipeline.config import Field, section
from pipeline.models.tokenizer import Tokenizer


@section
class SelfCorrectionConfig:
    p: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Probability that a training sample has one map (any but the last) perturbed and the maps after "
        "it re-quantised to correct it (DetailFlow's self-correction). 0: off, today's training exactly. Needs "
        "transformer.model.prediction: next_map.",
    )
    ratio: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Fraction of the perturbed map's tokens replaced by other codes, drawn uniformly (at least one "
        "token).",
    )


def replace_codes(idx_Bhw: torch.Tensor, ratio: float, codebook_size: int) -> torch.Tensor:
    """``idx_Bhw`` with round(ratio·h·w) (at least one) tokens per sample, at random places, replaced by a code
    drawn uniformly among the other codebook_size − 1."""
    idx_Bl = idx_Bhw.flatten(1)
    B, l = idx_Bl.shape
    count = max(1, round(ratio * l))
    places_Bl = torch.rand(B, l, device=idx_Bl.device).argsort(1)[:, :count]
    replaced_Bl = torch.zeros_like(idx_Bl, dtype=torch.bool).scatter_(1, places_Bl, True)
    other_Bl = (idx_Bl + torch.randint(1, codebook_size, (B, l), device=idx_Bl.device)) % codebook_size
    return torch.where(replaced_Bl, other_Bl, idx_Bl).view_as(idx_Bhw)


@torch.no_grad()
def self_correct(
    tokenizer: Tokenizer, indices: list[torch.Tensor], cfg: SelfCorrectionConfig
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Perturb the token maps ``indices`` (idx_Bhw per map) of each sample with probability ``cfg.p``.

    Returns (inputs, targets), per map: the maps the transformer's inputs are composed from (perturbed map m,
    corrected maps after it) and the maps it is to predict (clean up to m, corrected after). Samples left alone
    get their maps back in both. Draws from the global torch RNG (checkpointed by the training loop).
    """
    layout = tokenizer.layout
    B, M, device = len(indices[0]), layout.num_maps, indices[0].device
    chosen_B = torch.rand(B, device=device) < cfg.p
    perturbed_B = torch.where(chosen_B, torch.randint(0, M - 1, (B,), device=device), M)  # M: no map
    with torch.autocast(device.type, enabled=False):  # codes decide tokens: fp32, as Algorithm 1
        clean, f_hat_BChw = [], 0
        for m, idx_Bhw in enumerate(indices):
            f_hat_BChw = f_hat_BChw + tokenizer.map_contribution(idx_Bhw, m)
            clean.append(f_hat_BChw)
        component_end = [next(end for end in layout.component_ends() if end > m) for m in range(M)]
        inputs, targets, f_hat_BChw = [], [], 0
        for m, idx_Bhw in enumerate(indices):
            after_B11 = (perturbed_B < m).view(B, 1, 1)
            if after_B11.any():
                corrected_Bhw, _, _ = tokenizer.quantize_map(clean[component_end[m] - 1] - f_hat_BChw, m)
                idx_Bhw = torch.where(after_B11, corrected_Bhw, idx_Bhw)
            targets.append(idx_Bhw)
            at_B11 = (perturbed_B == m).view(B, 1, 1)
            if at_B11.any():
                idx_Bhw = torch.where(at_B11, replace_codes(idx_Bhw, cfg.ratio, tokenizer.cfg.codebook_size), idx_Bhw)
            inputs.append(idx_Bhw)
            f_hat_BChw = f_hat_BChw + tokenizer.map_contribution(idx_Bhw, m)
    return inputs, targets
