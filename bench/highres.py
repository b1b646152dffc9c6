"""Where 2× generation without retraining loses its FID: an ablation on the trained demo models.

    python bench/highres.py --per-class 16

Run after `dvc repro` (it reads models/ and data/shards). Every row is FID_ref (the reference classifier's
features) of 2× images against val images upsampled bilinearly, the metric `evaluate` reports as
`highres_fid_ref`, plus the mean absolute difference between the 2× image area-downsampled back to the trained
size and the plain sample: how much of the sample's content the route changed. Rows:

* bilinear — the plain sample upsampled in pixels (the evaluate stage's baseline);
* autoencoder at 2× — that bilinear image through the tokenizer's encoder and decoder, unquantised: what the
  autoencoder alone costs at a resolution it never saw;
* latent upsampling — the base latent upsampled bicubically and decoded, no detail (order 0's route);
* CART tiles — `pipeline.highres.generate_highres`: latent upsampling plus generated detail per tile;
* CART tiles, re-quantised base — each tile's latent is its re-quantised base plus detail (what the decoder saw
  in training) instead of the upsampled base plus detail;
* CART tiles, image-space base — the base decoded, upsampled in pixels and re-encoded before tiling.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.evaluation import load_val_images, to_uint8
from pipeline.highres import generate_highres, generate_tiles, join_tiles, upsample
from pipeline.metrics import fidelity_metrics, reference_extractor
from pipeline.params import load_params
from pipeline.tokenizer import Tokenizer, load_tokenizer
from pipeline.transformer import CART, SamplingConfig, generate, load_transformer


def detail_over(base_BChw, model: CART, tokenizer: Tokenizer, labels_B, cfg, scale, generator, requantised: bool):
    """Tile ``base_BChw``, generate every tile's detail maps from its re-quantised base, reassemble."""
    base_hat_NChw, full_NChw = generate_tiles(model, tokenizer, base_BChw, labels_B, cfg, scale, generator)
    if requantised:
        return join_tiles(full_NChw, len(labels_B), scale)
    return base_BChw + join_tiles(full_NChw - base_hat_NChw, len(labels_B), scale)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--per-class", type=int, default=16, help="2× images per class")
    parser.add_argument("--scale", type=int, default=2)
    args = parser.parse_args()

    params = load_params(Path(args.params))
    cfg: SamplingConfig = params.transformer.sampling
    model, config = load_transformer("models/transformer/transformer", torch.device("cpu"))
    tokenizer, _ = load_tokenizer("models/tokenizer/tokenizer", "cpu")
    extractor = reference_extractor("models/evaluator/evaluator")
    val_uint8, _ = load_val_images(Path("data/shards"))
    s = args.scale
    val_up = to_uint8(upsample(val_uint8.float() / 255, s))
    labels_B = torch.arange(len(config["classes"])).repeat_interleave(args.per_class)

    # The same plain samples for every route: generate_highres draws them first from a generator seeded by cfg.
    result = generate_highres(model, tokenizer, labels_B, cfg, s)
    generator = torch.Generator().manual_seed(cfg.seed)
    plain_maps = generate(model, tokenizer, labels_B, cfg, generator)
    plain_B3HW = tokenizer.reconstruct(plain_maps)
    assert torch.equal(plain_B3HW, result.plain_N3HW), "the routes must start from the same samples"
    side = model.layout.latent_side
    f_base = tokenizer.compose(plain_maps, model.layout.num_base)
    f_latent_up = F.interpolate(f_base, size=(s * side, s * side), mode="bicubic")
    f_image_up = tokenizer.encoder(upsample(tokenizer.decode(f_base), s) * 2 - 1)

    routes = {
        "bilinear": upsample(plain_B3HW, s),
        "autoencoder at 2×": tokenizer.decode(tokenizer.encoder(upsample(plain_B3HW, s) * 2 - 1)),
        "latent upsampling": tokenizer.decode(f_latent_up),
        "CART tiles": result.images_N3HW,
        "CART tiles, re-quantised base": tokenizer.decode(
            detail_over(f_latent_up, model, tokenizer, labels_B, cfg, s, generator, requantised=True)
        ),
        "CART tiles, image-space base": tokenizer.decode(
            detail_over(f_image_up, model, tokenizer, labels_B, cfg, s, generator, requantised=False)
        ),
    }
    print(f"machine: {platform.processor() or platform.machine()}; {len(labels_B)} images per route, scale {s}")
    print("| route | FID_ref vs val ×2 | mean abs change at the trained size |")
    print("|---|---|---|")
    rows = {}
    for name, images in routes.items():
        images = images.clamp(0, 1)
        fid = fidelity_metrics(to_uint8(images), val_up, extractor)["fid_ref"]
        change = float((F.interpolate(images, scale_factor=1 / s, mode="area") - plain_B3HW).abs().mean())
        rows[name] = {"fid_ref": fid, "change": change}
        print(f"| {name} | {fid:.2f} | {change:.3f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
