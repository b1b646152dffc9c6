"""What trained tokenizers keep of the val images: PSNR and colour saturation of their reconstructions, per prefix.

    python bench/reconstructions.py --run DIR [DIR ...] --images 256 --figure reconstructions.png

Each DIR is laid out as the repository after `train_tokenizer` (`models/tokenizer`, `data/decomposed`): the
workspace, a `dvc exp` checkout, or a `train_tokenizer-*` job directory of `cart tables`. The first --images val
images of the run's own decomposed shards go through Algorithm 1 and 2 (`tokenize`, then `compose` of the first k
maps and the decoder), and through the encoder and decoder alone (no quantisation: what the autoencoder itself
keeps). Saturation is HSV's, (max − min) / max over the three channels, averaged over pixels: a tokenizer that
loses colour shows it there long before PSNR says which error it is. Prints markdown rows for bench/RESULTS.md; with
--figure, draws the val images above each run's full reconstructions.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.data import shards
from pipeline.data.decomposed import decode_training_sample, split_shards
from pipeline.models.tokenizer import load_tokenizer


def saturation(image_B3HW: torch.Tensor) -> float:
    high, low = image_B3HW.max(1).values, image_B3HW.min(1).values
    return ((high - low) / high.clamp_min(1e-3)).mean().item()


def psnr(image_B3HW: torch.Tensor, reference_B3HW: torch.Tensor) -> float:
    """Mean over images of each image's PSNR (images in [0, 1])."""
    mse_B = (image_B3HW - reference_B3HW).square().mean((1, 2, 3))
    return (10 * torch.log10(1 / mse_B.clamp_min(1e-10))).mean().item()


def val_images(run: Path, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images_B3HW, bases_BK3HW) of the first ``count`` val images of the run's decomposed shards."""
    images, bases = [], []
    for raw in shards.read_samples(split_shards(run / "data" / "decomposed" / "val")):
        image_3HW, bases_K3HW, _ = decode_training_sample(raw)
        images.append(image_3HW)
        bases.append(bases_K3HW)
        if len(images) == count:
            break
    return torch.stack(images), torch.stack(bases)


@torch.no_grad()
def measure(run: Path, count: int) -> dict:
    tokenizer, config = load_tokenizer(run / "models" / "tokenizer" / "tokenizer")
    image_B3HW, bases_BK3HW = val_images(run, count)
    tokens = tokenizer.tokenize(image_B3HW, bases_BK3HW)
    prefixes = []
    for k in range(1, len(tokens) + 1):
        decoded = tokenizer.decode(tokenizer.compose(tokens, k)).clamp(0, 1)  # k = all maps: the reconstruction
        prefixes.append((k, psnr(decoded, image_B3HW), saturation(decoded)))
    autoencoded = tokenizer.decode(tokenizer.encode(image_B3HW)).clamp(0, 1)
    return {
        "run": run,
        "min_group_channels": config["model"].get("min_group_channels", 1),
        "order": config["order"],
        "images": image_B3HW,
        "reconstructions": decoded,
        "prefixes": prefixes,
        "autoencoder": (psnr(autoencoded, image_B3HW), saturation(autoencoded)),
    }


def figure(path: Path, results: list[dict], columns: int = 16, zoom: int = 2) -> None:
    """The val images on the first row, each run's reconstructions below, in --run order."""
    rows = [results[0]["images"][:columns]] + [r["reconstructions"][:columns] for r in results]
    grid_3HW = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)
    pixels = (grid_3HW.permute(1, 2, 0).numpy()[:, :, ::-1] * 255).round().astype(np.uint8)
    cv2.imwrite(str(path), cv2.resize(pixels, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs="+", type=Path, required=True, help="run directories (see above)")
    parser.add_argument("--images", type=int, default=256, help="val images measured")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    parser.add_argument("--figure", type=Path, help="PNG of the val images above each run's reconstructions")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [measure(run, args.images) for run in args.run]
    real = saturation(results[0]["images"])
    print(f"{args.images} val images, saturation of the originals {real:.3f}, {datetime.date.today()}")
    print("| run | order | min_group_channels | PSNR | saturation | autoencoder PSNR / saturation | PSNR per prefix |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        k, full_psnr, full_saturation = r["prefixes"][-1]
        per_prefix = " / ".join(f"{p:.1f}" for _, p, _ in r["prefixes"])
        ae_psnr, ae_saturation = r["autoencoder"]
        print(
            f"| {r['run'].name} | {r['order']} | {r['min_group_channels']} | {full_psnr:.2f} dB | "
            f"{full_saturation:.3f} | {ae_psnr:.2f} dB / {ae_saturation:.3f} | {per_prefix} |"
        )
    if args.figure:
        figure(args.figure, results)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
