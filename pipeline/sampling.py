"""From a trained transformer to images: sampling token maps, decoding them, and decoding every prefix."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.tokenizer import Tokenizer
from pipeline.transformer import CART, SamplingConfig, generate


@dataclass
class Samples:
    images_N3HW: torch.Tensor  # in [0, 1]
    labels_N: torch.Tensor
    indices: list[torch.Tensor]  # idx_Nhw per map
    prefixes_NM3HW: torch.Tensor | None = None  # decode after each map (the paper's Figure 1), when asked


@torch.no_grad()
def sample_images(
    model: CART,
    tokenizer: Tokenizer,
    labels_N: torch.Tensor,
    cfg: SamplingConfig,
    batch_size: int = 64,
    progressive: bool = False,
) -> Samples:
    """Sample one image per label, in batches of ``batch_size``.

    One generator seeded with ``cfg.seed`` draws all batches in order: the same labels, batch size and seed give
    the same images.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(cfg.seed)
    images, indices, prefixes = [], [], []
    for start in range(0, len(labels_N), batch_size):
        label_B = labels_N[start : start + batch_size].to(device)
        maps = generate(model, tokenizer, label_B, cfg, generator)
        images.append(tokenizer.reconstruct(maps).cpu())
        indices.append([m.cpu() for m in maps])
        if progressive:
            steps = [tokenizer.decode_prefix(maps, m + 1).cpu() for m in range(len(maps))]
            prefixes.append(torch.stack(steps, dim=1))
    return Samples(
        images_N3HW=torch.cat(images),
        labels_N=labels_N.cpu(),
        indices=[torch.cat(per_map) for per_map in zip(*indices, strict=True)],
        prefixes_NM3HW=torch.cat(prefixes) if progressive else None,
    )
