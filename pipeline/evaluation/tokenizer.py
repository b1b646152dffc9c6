"""Measuring a tokenizer (paper Figure 7): reconstruction quality at every quantisation depth, codebook health."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.tokenizer import Tokenizer


def psnr(mse: float) -> float:
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def perplexity(counts: torch.Tensor) -> float:
    p = counts.float() / counts.sum().clamp(min=1)
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


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
        tokens = model.tokenize(image, bases)
        if model.continuous:
            latent_ms += model.encode(image).square().mean((1, 2, 3)).sum().item()
        else:
            for idx in tokens:
                usage += torch.bincount(idx.flatten(), minlength=usage.numel())
        ends = model.layout.component_ends()
        for m in range(1, M + 1):
            decoded = model.decode_prefix(tokens, m)
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
