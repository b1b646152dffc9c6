"""Generation above the trained resolution without retraining (CART paper §4.2.1, Figure 6).

The base is generated as usual at the trained latent size s and upsampled to scale·s (``HighresConfig``: bilinear
as the paper, or bicubic; in latent space, or decoded, upsampled in pixels and encoded again). Detail is then
generated patch by patch: the large latent is cut into tiles of the trained size s (overlapping by
``overlap`` latent cells), each tile's crop of the upsampled base is tokenized into base maps (Algorithm 1's base
part), and the transformer, given those base maps as its prefix, samples the tile's detail maps exactly as it does
at the trained size. Tiles are generated independently of one another (one batch): what ties them together is the
shared upsampled base. The tiles' detail contributions are blended where they overlap with weights that ramp
linearly across the overlap and sum to one everywhere (so a field on which tiles agree passes unchanged), added to
the upsampled base, and the result decoded by the fully convolutional decoder.

With order 0 (VAR) there are no detail maps: the result is the decoded upsampled base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.config import Field, section
from pipeline.models.tokenizer import Tokenizer
from pipeline.models.transformer import CART, SamplingConfig, generate


@section
class HighresConfig:
    upsample: Literal["bilinear", "bicubic"] = Field(
        "bicubic", description="How the generated base is enlarged (the paper: bilinear)."
    )
    space: Literal["latent", "pixel"] = Field(
        "pixel",
        description="latent: the base's f̂ is upsampled; pixel: the base is decoded, upsampled as an image and "
        "encoded at the larger size (the default: 6 FID_ref_2x points better on the demo, bench/RESULTS.md).",
    )
    overlap: int = Field(
        2, ge=0, description="Latent cells by which neighbouring detail tiles overlap, their seams blended (0: none)."
    )


@dataclass
class HighRes:
    images_N3HW: torch.Tensor  # at scale × the trained resolution, in [0, 1]
    plain_N3HW: torch.Tensor  # the same samples generated at the trained resolution (same base tokens)


# ---------------------------------------------------------------------------------------------------------------
# Tiles


def tile_starts(size: int, side: int, overlap: int) -> list[int]:
    """Top-left offsets of tiles of ``side`` covering ``size`` with at least ``overlap`` shared cells."""
    if size <= side:
        return [0]
    stride = max(1, side - overlap)
    starts = list(range(0, size - side, stride))
    return starts + [size - side]


def tile_weights(side: int, overlap: int) -> torch.Tensor:
    """One axis of the blending window: 1 inside, ramping linearly to ~0 across ``overlap`` cells at each end."""
    i = torch.arange(side, dtype=torch.float32) + 0.5
    if overlap == 0:
        return torch.ones(side)
    return torch.minimum(torch.ones(side), torch.minimum(i, side - i) / overlap)


def cut_tiles(f_BChw: torch.Tensor, side: int, overlap: int = 0) -> torch.Tensor:
    """Every tile of every image in one batch: tile t of image b is row t·B + b (tiles in raster order)."""
    H, W = f_BChw.shape[-2:]
    rows, cols = tile_starts(H, side, overlap), tile_starts(W, side, overlap)
    return torch.cat([f_BChw[..., y : y + side, x : x + side] for y in rows for x in cols])


def join_tiles(tiles_NChw: torch.Tensor, batch: int, size: int, overlap: int = 0) -> torch.Tensor:
    """The inverse of ``cut_tiles``: tiles blended into a size × size field (a weighted mean where they overlap)."""
    side = tiles_NChw.shape[-1]
    starts = tile_starts(size, side, overlap)
    w_1s = tile_weights(side, overlap).to(tiles_NChw)
    w_hw = w_1s[:, None] * w_1s[None, :]
    out = tiles_NChw.new_zeros(batch, tiles_NChw.shape[1], size, size)
    total = tiles_NChw.new_zeros(size, size)
    tiles = tiles_NChw.unflatten(0, (len(starts) * len(starts), batch))
    for t, (y, x) in enumerate((y, x) for y in starts for x in starts):
        out[..., y : y + side, x : x + side] += w_hw * tiles[t]
        total[y : y + side, x : x + side] += w_hw
    return out / total


# ---------------------------------------------------------------------------------------------------------------
# Generation


def upsampled_base(tokenizer: Tokenizer, f_base_BChw: torch.Tensor, scale: int, cfg: HighresConfig) -> torch.Tensor:
    """The generated base's latent at scale × the trained latent side, the way ``cfg`` says."""
    size = scale * f_base_BChw.shape[-1]
    if cfg.space == "latent":
        return F.interpolate(f_base_BChw, size=(size, size), mode=cfg.upsample, align_corners=False)
    image = tokenizer.decode(f_base_BChw).clamp(0, 1)
    big = F.interpolate(image, scale_factor=scale, mode=cfg.upsample, align_corners=False).clamp(0, 1)
    return tokenizer.encode(big)


@torch.no_grad()
def generate_highres(
    model: CART,
    tokenizer: Tokenizer,
    label_B: torch.Tensor,
    sampling: SamplingConfig,
    scale: int,
    cfg: HighresConfig | None = None,
    generator: torch.Generator | None = None,
) -> HighRes:
    cfg = cfg or HighresConfig()
    layout = model.layout
    if generator is None:
        generator = torch.Generator(label_B.device).manual_seed(sampling.seed)
    B, s, nb = len(label_B), layout.latent_side, layout.num_base
    plain_maps = generate(model, tokenizer, label_B, sampling, generator)
    f_big_BChw = upsampled_base(tokenizer, tokenizer.compose(plain_maps, nb), scale, cfg)
    if layout.num_maps > nb:
        base_hat_NChw, full_NChw = generate_tiles(model, tokenizer, f_big_BChw, label_B, sampling, cfg, generator)
        detail_NChw = full_NChw - base_hat_NChw  # the detail maps' contributions alone
        f_big_BChw = f_big_BChw + join_tiles(detail_NChw, B, scale * s, cfg.overlap)
    return HighRes(
        images_N3HW=tokenizer.decode(f_big_BChw).clamp(0, 1),
        plain_N3HW=tokenizer.reconstruct(plain_maps),
    )


def generate_tiles(
    model: CART,
    tokenizer: Tokenizer,
    f_big_BChw: torch.Tensor,
    label_B: torch.Tensor,
    sampling: SamplingConfig,
    cfg: HighresConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a large latent into trained-size tiles, re-quantise each tile's base and sample its detail maps.

    Returns, tiles batched as ``cut_tiles`` does, each tile's quantised base f̂ and its full latent (base + detail).
    """
    tiles_NChw = cut_tiles(f_big_BChw, model.layout.latent_side, cfg.overlap)
    base_maps, base_hat_NChw = tokenizer.tokenize_base(tiles_NChw)
    labels = label_B.repeat(len(tiles_NChw) // len(label_B))
    maps = generate(model, tokenizer, labels, sampling, generator, prefix=base_maps)
    return base_hat_NChw, tokenizer.compose(maps)


@torch.no_grad()
def reconstruct_highres(
    tokenizer: Tokenizer, image_B3HW: torch.Tensor, bases_BK3HW: torch.Tensor, overlap: int
) -> torch.Tensor:
    """The tokenizer's own route at a larger size, the ceiling of generation there: the image and its bases are
    encoded whole, cut into trained-size tiles, quantised by Algorithm 1 tile by tile, blended and decoded."""
    side = tokenizer.layout.latent_side
    levels = tokenizer.encode_levels(image_B3HW, bases_BK3HW)
    quantized = tokenizer.quantize([cut_tiles(f, side, overlap) for f in levels])
    f_hat_BChw = join_tiles(quantized.prefixes[-1], len(image_B3HW), levels[0].shape[-1], overlap)
    return tokenizer.decode(f_hat_BChw).clamp(0, 1)


def upsample(images_N3HW: torch.Tensor, scale: int, mode: str = "bilinear") -> torch.Tensor:
    """The baselines every high-resolution result is compared with: bilinear (or bicubic) upsampling."""
    return F.interpolate(images_N3HW, scale_factor=scale, mode=mode, align_corners=False).clamp(0, 1)


def highres_figure(
    model, tokenizer, labels_N, sampling: SamplingConfig, scale: int, path, cfg: HighresConfig | None = None
) -> HighRes:
    """Figure 6: the plain sample upsampled bilinearly beside CART's generation at ``scale``× per sample."""
    # lazy: pipeline.params imports this module, and matplotlib would slow every stage's start (bench/RESULTS.md)
    from pipeline.evaluation.figures import image_grid

    device = next(model.parameters()).device
    result = generate_highres(model, tokenizer, labels_N.to(device), sampling, scale, cfg)
    image_grid(
        [
            ("sample (trained size)", result.plain_N3HW.cpu()),
            (f"bilinear ×{scale}", upsample(result.plain_N3HW, scale).cpu()),
            (f"CART ×{scale}", result.images_N3HW.cpu()),
        ],
        path,
        title=f"Generation at {scale}× the trained resolution without retraining",
    )
    return result
