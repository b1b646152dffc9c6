"""Generation above the trained resolution without retraining (CART paper §4.2.1, Figure 6).

The base is generated as usual at the trained latent size s and its composition f̂_base upsampled (bicubic) to
scale·s. Detail is then generated patch by patch: the latent grid is cut into scale² tiles of s×s, each tile's
crop of the upsampled base is tokenized into base maps (Algorithm 1's base part), and the transformer, given
those base maps as its prefix, samples the tile's detail maps exactly as it does at the trained size. The large
latent is the upsampled base plus every tile's detail contributions, decoded by the (fully convolutional)
tokenizer decoder.

With order 0 (VAR) there are no detail maps: the result is the decoded upsampled base, i.e. latent upsampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.tokenizer import Tokenizer
from pipeline.transformer import CART, SamplingConfig, generate


@dataclass
class HighRes:
    images_N3HW: torch.Tensor  # at scale × the trained resolution, in [0, 1]
    plain_N3HW: torch.Tensor  # the same samples generated at the trained resolution (same base tokens)


@torch.no_grad()
def generate_highres(
    model: CART,
    tokenizer: Tokenizer,
    label_B: torch.Tensor,
    cfg: SamplingConfig,
    scale: int,
    generator: torch.Generator | None = None,
) -> HighRes:
    layout = model.layout
    device = label_B.device
    if generator is None:
        generator = torch.Generator(device).manual_seed(cfg.seed)
    B, s, nb = len(label_B), layout.latent_side, layout.num_base
    plain_maps = generate(model, tokenizer, label_B, cfg, generator)
    f_base_BChw = tokenizer.compose(plain_maps, nb)
    f_big_BChw = F.interpolate(f_base_BChw, size=(scale * s, scale * s), mode="bicubic")
    if layout.num_maps > nb:
        base_hat_NChw, full_NChw = generate_tiles(model, tokenizer, f_big_BChw, label_B, cfg, scale, generator)
        detail_NChw = full_NChw - base_hat_NChw  # the detail maps' contributions alone
        f_big_BChw = f_big_BChw + join_tiles(detail_NChw, B, scale)
    return HighRes(
        images_N3HW=tokenizer.decode(f_big_BChw).clamp(0, 1),
        plain_N3HW=tokenizer.reconstruct(plain_maps),
    )


def generate_tiles(
    model: CART,
    tokenizer: Tokenizer,
    f_big_BChw: torch.Tensor,
    label_B: torch.Tensor,
    cfg: SamplingConfig,
    scale: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a large latent into trained-size tiles, re-quantise each tile's base and sample its detail maps.

    Returns, tiles batched as ``cut_tiles`` does, each tile's quantised base f̂ and its full latent (base + detail).
    """
    base_maps, base_hat_NChw = tokenizer.tokenize_base(cut_tiles(f_big_BChw, model.layout.latent_side, scale))
    maps = generate(model, tokenizer, label_B.repeat(scale * scale), cfg, generator, prefix=base_maps)
    return base_hat_NChw, tokenizer.compose(maps)


def cut_tiles(f_BChw: torch.Tensor, side: int, scale: int) -> torch.Tensor:
    """The scale² tiles of side × side, every image's tiles in one batch: tile t of image b is row t·B + b."""
    rows = [f_BChw[..., i * side : (i + 1) * side, :] for i in range(scale)]
    return torch.stack([row[..., j * side : (j + 1) * side] for row in rows for j in range(scale)]).flatten(0, 1)


def join_tiles(tiles_NChw: torch.Tensor, batch: int, scale: int) -> torch.Tensor:
    """The inverse of ``cut_tiles``."""
    tiles_IJBChw = tiles_NChw.unflatten(0, (scale, scale, batch))
    return torch.cat([torch.cat(list(row), dim=-1) for row in tiles_IJBChw], dim=-2)


def upsample(images_N3HW: torch.Tensor, scale: int) -> torch.Tensor:
    """The baseline every high-resolution result is compared with: bilinear upsampling."""
    return F.interpolate(images_N3HW, scale_factor=scale, mode="bilinear", align_corners=False).clamp(0, 1)


def highres_figure(model, tokenizer, labels_N, cfg: SamplingConfig, scale: int, path) -> HighRes:
    """Figure 6: the plain sample upsampled bilinearly beside CART's generation at ``scale``× per sample."""
    from pipeline.figures import image_grid

    device = next(model.parameters()).device
    result = generate_highres(model, tokenizer, labels_N.to(device), cfg, scale)
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
