"""From a trained transformer to images: sampling token maps, decoding them, and decoding every prefix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.models.tokenizer import Tokenizer
from pipeline.models.transformer import CART, SamplingConfig, generate
from pipeline.runtime import Dist, share


@dataclass
class Samples:
    images_N3HW: torch.Tensor  # in [0, 1]
    labels_N: torch.Tensor
    tokens: list[torch.Tensor]  # per map: idx_Nhw (vq) or z_NChw (continuous)
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
    images, tokens, prefixes = [], [], []
    for start in range(0, len(labels_N), batch_size):
        label_B = labels_N[start : start + batch_size].to(device)
        maps = generate(model, tokenizer, label_B, cfg, generator)
        images.append(tokenizer.reconstruct(maps).cpu())
        tokens.append([m.cpu() for m in maps])
        if progressive:
            steps = [tokenizer.decode_prefix(maps, m + 1).cpu() for m in range(len(maps))]
            prefixes.append(torch.stack(steps, dim=1))
    return Samples(
        images_N3HW=torch.cat(images),
        labels_N=labels_N.cpu(),
        tokens=[torch.cat(per_map) for per_map in zip(*tokens, strict=True)],
        prefixes_NM3HW=torch.cat(prefixes) if progressive else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# Sampling in chunks, each with its own random stream: what `evaluate` and `sample-fid` share, so that a chunk's
# images depend on nothing but the seed, the chunk's index and its labels: not on the rank that draws it, how many
# ranks there are, or which chunks were drawn before (a resumed run draws the missing ones alone).


def chunk_generator(seed: int, chunk: int, device: torch.device | str) -> torch.Generator:
    """The generator of chunk ``chunk``: seeded from (seed, chunk) through NumPy's SeedSequence, which mixes the
    pair, so no two chunks (and so no two ranks) draw the same stream."""
    high, low = np.random.SeedSequence([seed, chunk]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device).manual_seed((int(high) << 32) | int(low))


def chunk_labels(labels_N: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    """``labels_N`` cut into consecutive chunks of ``chunk_size`` (the last may be shorter)."""
    return [labels_N[start : start + chunk_size] for start in range(0, len(labels_N), chunk_size)]


@torch.no_grad()
def sample_chunk(model: CART, tokenizer: Tokenizer, label_B: torch.Tensor, cfg: SamplingConfig, chunk: int) -> Samples:
    """The images of one chunk, drawn with ``chunk_generator(cfg.seed, chunk)``."""
    device = next(model.parameters()).device
    maps = generate(model, tokenizer, label_B.to(device), cfg, chunk_generator(cfg.seed, chunk, device))
    return Samples(tokenizer.reconstruct(maps).cpu(), label_B.cpu(), [m.cpu() for m in maps])


def sample_sharded(
    model: CART, tokenizer: Tokenizer, labels_N: torch.Tensor, cfg: SamplingConfig, batch_size: int, dist: Dist
) -> Samples | None:
    """One image per label, in chunks of ``batch_size``, each rank drawing its share of the chunks; rank 0
    gathers them and returns all in label order (other ranks return None). The same on any number of ranks."""
    chunks = chunk_labels(labels_N, batch_size)
    mine = {i: sample_chunk(model, tokenizer, chunks[i], cfg, i) for i in share(range(len(chunks)), dist)}
    if dist.enabled:
        gathered: list[dict[int, Samples]] | None = [{} for _ in range(dist.world_size)] if dist.is_main else None
        torch.distributed.gather_object(mine, gathered, dst=0)
        if not dist.is_main:
            return None
        mine = {i: chunk for part in gathered for i, chunk in part.items()}
    drawn = [mine[i] for i in range(len(chunks))]
    return Samples(
        images_N3HW=torch.cat([c.images_N3HW for c in drawn]),
        labels_N=labels_N.cpu(),
        tokens=[torch.cat(per_map) for per_map in zip(*(c.tokens for c in drawn), strict=True)],
    )
