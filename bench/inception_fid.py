"""Checks of the FID network on a real image folder (e.g. CIFAR-10's train/<class>/*.jpg), from its features:

    python -m bench.inception_fid --root /tmp/cifar10/train --n 4000 --out /tmp/incv
    python -m bench.inception_fid --features train_features.npy --out /tmp/incv50k   # `cart reference-stats --features`

- FID of a set against itself (0), and between disjoint random halves for 3 split seeds (mean ± std), with KID,
  precision and recall of the same features through torch-fidelity's formulas;
- how much FID moves with the resize: TF 1 bilinear (ours, the field's), torch bilinear with antialias, PIL bicubic;
- what folding batch norm and channels-last (the fast path) and bf16 autocast do to FID (fp32 unfolded on the first
  ``--subset`` images, as are the other resizes).

With ``--features`` (the ``.npy`` of ``cart reference-stats --features``: a whole folder in sorted path order) only
the checks of the features themselves run (self, halves, even/odd indices, KID/precision/recall), no extraction.
Features are saved per variant under ``--out`` (``<variant>.npy``) and reused when rerun, so a run cut short keeps
what it measured. The images are a random subset (``--seed``) of the folder's files in sorted path order.
Results: bench/RESULTS.md and docs/inception-fid.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import atomic
from pipeline.data.sources import decode_rgb
from pipeline.evaluation.inception import SIDE, fold_batch_norm, load_inception, preprocess
from pipeline.evaluation.metrics import metrics_from_features
from pipeline.evaluation.sample_fid import folder_images, frechet_distance, statistics


def resized(img_uint8_B3HW: torch.Tensor, method: str) -> torch.Tensor:
    """The network's input for a resize method: ours (TF 1 bilinear in float) or another, then x/128 − 1."""
    if method == "tf1":
        return preprocess(img_uint8_B3HW)
    if method == "torch_bilinear_aa":
        x_B3HW = F.interpolate(img_uint8_B3HW.float(), (SIDE, SIDE), mode="bilinear", antialias=True)
    elif method == "pil_bicubic":
        from PIL import Image

        x_B3HW = torch.stack(
            [
                torch.from_numpy(np.asarray(Image.fromarray(im.permute(1, 2, 0).numpy()).resize((SIDE, SIDE), 3)))
                .permute(2, 0, 1)
                .float()
                for im in img_uint8_B3HW
            ]
        )  # Image.BICUBIC, rounded to uint8 as PIL does
    else:
        raise ValueError(method)
    return x_B3HW / 128 - 1


VARIANTS = {  # name: (resize method, folded + channels-last, bf16 autocast)
    "tf1": ("tf1", True, False),
    "tf1_bf16": ("tf1", True, True),
    "tf1_plain": ("tf1", False, False),
    "pil_bicubic": ("pil_bicubic", True, False),
    "torch_bilinear_aa": ("torch_bilinear_aa", True, False),
}


def extract(images: torch.Tensor, variant: str, nets: dict, batch: int = 32) -> tuple[np.ndarray, float]:
    method, fast, bf16 = VARIANTS[variant]
    net = nets["fast" if fast else "plain"]
    out = []
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        for i in range(0, len(images), batch):
            x_B3HW = resized(images[i : i + batch], method)
            if fast:
                x_B3HW = x_B3HW.contiguous(memory_format=torch.channels_last)
            out.append(net(x_B3HW).float())
    return torch.cat(out).numpy(), len(images) / (time.perf_counter() - start)


def fid(a_ND: np.ndarray, b_ND: np.ndarray) -> float:
    return frechet_distance(statistics(a_ND), statistics(b_ND))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="The image folder (needed unless --features).")
    parser.add_argument("--features", type=Path, help="Features already extracted, in sorted path order.")
    parser.add_argument("--n", type=int, default=4000, help="Images of the folder used (a random subset).")
    parser.add_argument(
        "--subset", type=int, default=1000, help="The first this many images only for the unfolded net and the resizes."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extract-only", action="store_true", help="Save the features, compute no FID.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.features is not None:
        return checks({"tf1": np.load(args.features)}, {}, args.features, args.seed, args.out)
    if args.root is None:
        parser.error("--root or --features is needed")
    paths, _ = folder_images(args.root)
    pick = np.sort(np.random.default_rng(args.seed).choice(len(paths), min(args.n, len(paths)), replace=False))
    images = torch.stack([torch.from_numpy(decode_rgb(paths[i].read_bytes())).permute(2, 0, 1) for i in pick])
    plain = load_inception()
    nets = {"plain": plain, "fast": fold_batch_norm(copy.deepcopy(plain)).to(memory_format=torch.channels_last)}
    feats, speed = {}, {}
    for variant in args.variants:
        path = args.out / f"{variant}.npy"
        subset = images if variant in ("tf1", "tf1_bf16") else images[: args.subset]
        if not path.exists():
            features_ND, speed[variant] = extract(subset, variant, nets)
            with atomic.writing(path) as tmp, open(tmp, "wb") as f:  # a concurrent run may be reading the folder
                np.save(f, features_ND)
            print(f"{variant}: {len(subset)} images at {speed[variant]:.1f} images/s", flush=True)
        feats[variant] = np.load(path)
    if not args.extract_only:
        checks(feats, speed, args.root, args.seed, args.out)


def checks(feats: dict[str, np.ndarray], speed: dict, source: Path, seed: int, out: Path) -> None:
    """FID of the ``tf1`` features against themselves, between halves (3 split seeds, and even/odd indices), KID
    and precision/recall of the seed-0 halves; each other variant against ``tf1`` on the same images."""
    tf1 = feats["tf1"]
    rng_halves = [np.random.default_rng(s).permutation(len(tf1)) for s in (0, 1, 2)]
    n2 = len(tf1) // 2
    results: dict = {"images": len(tf1), "root": str(source), "seed": seed, "speed_images_per_s": speed}
    results["fid_self"] = fid(tf1, tf1)
    halves = [fid(tf1[p[:n2]], tf1[p[n2:]]) for p in rng_halves]
    results["fid_random_halves"] = halves
    results["fid_random_halves_mean_std"] = [float(np.mean(halves)), float(np.std(halves, ddof=1))]
    results["fid_even_odd"] = fid(tf1[0::2], tf1[1::2])
    p0 = rng_halves[0]
    results["kid_prc_halves_seed0"] = metrics_from_features(
        torch.from_numpy(tf1[p0[:n2]]), torch.from_numpy(tf1[p0[n2:]]), "inception"
    )
    for variant, features_ND in feats.items():
        if variant == "tf1":
            continue
        n = len(features_ND)
        if n < len(tf1):  # the same images' first n, halves by one split of those
            p = np.random.default_rng(0).permutation(n)
            ours = fid(tf1[:n][p[: n // 2]], tf1[:n][p[n // 2 :]])
        else:
            p, ours = p0, halves[0]
        theirs = fid(features_ND[p[: n // 2]], features_ND[p[n // 2 :]])
        results[variant] = {
            "images": n,
            "fid_halves_seed0": theirs,
            "fid_halves_seed0_tf1": ours,
            "fid_halves_change": theirs - ours,
            "fid_against_tf1_same_images": fid(features_ND, tf1[:n]),
            "feature_relative_difference": float(np.linalg.norm(features_ND - tf1[:n]) / np.linalg.norm(tf1[:n])),
        }
        print(variant, json.dumps(results[variant]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
