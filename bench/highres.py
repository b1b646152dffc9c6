"""Generation at 2× without retraining, route by route, against the real 2× val images (`hr.png`).

    python bench/highres.py --per-class 16 --seeds 0 1

Run after `dvc repro` (it reads models/ and data/shards). Every row is FID_ref_2x (the reference classifier
trained on the real 2× train images) of 2× images against the real 2× val images, the metric `evaluate` reports
as `fid_ref_2x`, plus the mean absolute difference between the 2× image area-downsampled back to the trained size
and the plain sample: how much of the sample's content the route changed. Routes start from the same plain
samples (the same sampling seed):

* bilinear, bicubic — the plain sample upsampled in pixels (the baselines);
* autoencoder at 2× — the bicubic image through the tokenizer's encoder and decoder, unquantised: what the
  autoencoder alone costs at that size;
* latent upsampling — the base latent upsampled (bicubic) and decoded, no detail (order 0's route);
* CART tiles with each `evaluate.highres` setting tried: upsampling mode, latent or pixel space, tile overlap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.evaluation.evaluation import load_val_images, to_uint8
from pipeline.evaluation.highres import HighresConfig, generate_highres, upsample, upsampled_base
from pipeline.evaluation.metrics import fidelity_metrics, reference_extractor
from pipeline.models.tokenizer import load_tokenizer
from pipeline.models.transformer import SamplingConfig, generate, load_transformer
from pipeline.params import load_params

ROUTES = {  # name: HighresConfig overrides
    "CART tiles, bicubic latent base, overlap 2": {},
    "CART tiles, bicubic latent base, no overlap": {"overlap": 0},
    "CART tiles, bilinear latent base, overlap 2": {"upsample": "bilinear"},
    "CART tiles, bicubic pixel base, overlap 2": {"space": "pixel"},
}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--per-class", type=int, default=16, help="2× images per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds (a row per seed)")
    args = parser.parse_args()

    params = load_params(Path(args.params))
    s = params.evaluate.highres_scale
    model, config = load_transformer("models/transformer/transformer", torch.device("cpu"))
    tokenizer, _ = load_tokenizer("models/tokenizer/tokenizer", "cpu")
    extractor = reference_extractor("models/evaluator/evaluator_2x")
    val_uint8, _ = load_val_images(Path("data/shards"), highres=True)
    labels_B = torch.arange(len(config["classes"])).repeat_interleave(args.per_class)
    print(f"machine: {platform.processor() or platform.machine()}; {len(labels_B)} images per route, scale {s}, ")
    print(f"{len(val_uint8)} real {s}× val images")
    print("| route | " + " | ".join(f"FID_ref_{s}x seed {seed}" for seed in args.seeds) + " | mean | change |")
    print("|---|" + "---|" * (len(args.seeds) + 2))
    rows: dict[str, dict] = {}
    for seed in args.seeds:
        cfg: SamplingConfig = dataclasses.replace(params.transformer.sampling.resolved(), seed=seed)
        plain_maps = generate(model, tokenizer, labels_B, cfg)
        plain_B3HW = tokenizer.reconstruct(plain_maps)
        f_base = tokenizer.compose(plain_maps, model.layout.num_base)
        routes = {
            "bilinear": upsample(plain_B3HW, s, "bilinear"),
            "bicubic": upsample(plain_B3HW, s, "bicubic"),
            "autoencoder at 2×": tokenizer.decode(tokenizer.encode(upsample(plain_B3HW, s, "bicubic"))),
            "latent upsampling": tokenizer.decode(upsampled_base(tokenizer, f_base, s, HighresConfig())),
        }
        for name, changes in ROUTES.items():
            highres_cfg = dataclasses.replace(params.evaluate.highres, **changes)
            result = generate_highres(model, tokenizer, labels_B, cfg, s, highres_cfg)
            assert torch.equal(result.plain_N3HW, plain_B3HW), "the routes must start from the same samples"
            routes[name] = result.images_N3HW
        for name, images in routes.items():
            images = images.clamp(0, 1)
            fid = fidelity_metrics(to_uint8(images), val_uint8, extractor)["fid_ref"]
            change = float((F.interpolate(images, scale_factor=1 / s, mode="area") - plain_B3HW).abs().mean())
            rows.setdefault(name, {"fid_ref_2x": [], "change": []})
            rows[name]["fid_ref_2x"].append(fid)
            rows[name]["change"].append(change)
    for name, row in rows.items():
        fids = row["fid_ref_2x"]
        spread = f" ± {statistics.pstdev(fids):.2f}" if len(fids) > 1 else ""
        cells = " | ".join(f"{f:.2f}" for f in fids)
        print(f"| {name} | {cells} | {statistics.mean(fids):.2f}{spread} | {statistics.mean(row['change']):.3f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
