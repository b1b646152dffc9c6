"""Decomposition throughput, and speed-up over the SciPy sparse-direct reference at equal accuracy.

    python bench/decompose.py --device cpu --sizes 256 --batch-sizes 1 4 16 --repeats 3 --scipy-images 2
    python bench/decompose.py --device cuda --compile --batch-sizes 1 16 64 --scipy-images 0
    python bench/decompose.py --params params/cifar10.yaml --folder /tmp/cifar10/train --count 640 --sizes 32 \
        --batch-sizes 64 --repeats 1 --scipy-images 0 --threads 1

Throughput: the same photographs (whole scikit-image photographs and crops of them, resized to size × size RGB)
are decomposed at order 3 with the default parameters, in batches of each batch size; median of --repeats after
one warm-up run. On CUDA it also reports the memory traffic that the CG iterations must move at least (each
iteration reads and writes x, r and p once and reads its coefficient arrays; iterations counted per image) as a
fraction of the memory-bandwidth roofline. --params takes the decomposition parameters (and order) of a params
file's ``decompose`` section instead of the defaults; --folder decomposes --count images drawn (seed 0) from an
ImageFolder tree (e.g. CIFAR-10's), resized to each size, instead of the photographs: the CG's iterations depend on
the pixels. Each throughput row also gives the CPU seconds of this process per image (the wall clock counts other
jobs' turns on a shared machine).

Reference: ``solve_at_scipy`` (every half-step an exact sparse LU solve) applied recursively to the first
--scipy-images photographs, against ``decompose`` one image at a time on the same photographs. Both use the same
parameters, hence the same alternation and the same outer stopping rule; the row states the largest |B_k − B_k^ref|
over all levels and pixels. Prints markdown rows for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.data.decompose import DecomposeConfig, decompose, solve_at, solve_at_scipy
from pipeline.data.sources import DEMO_PHOTOGRAPHS, decode_rgb, demo_photograph, resize_square
from pipeline.runtime import resolve_device


def photographs(count: int, size: int) -> torch.Tensor:
    """``count`` distinct RGB images in [0, 1]: the demo photographs whole, then their centre halves, quarters…"""
    images, zoom = [], 1
    while len(images) < count:
        for name in DEMO_PHOTOGRAPHS[: count - len(images)]:
            photo = demo_photograph(name)
            side = min(photo.shape[:2]) // zoom
            top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
            images.append(resize_square(photo[top : top + side, left : left + side], size))
        zoom *= 2
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def folder_sample(root: Path, count: int, size: int) -> torch.Tensor:
    """``count`` images drawn at random (seed 0) from an ImageFolder tree, resized to size × size, in [0, 1]."""
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if len(paths) < count:
        raise SystemExit(f"--folder {root}: {len(paths)} images, fewer than --count {count}")
    chosen = random.Random(0).sample(paths, count)
    images = [resize_square(decode_rgb(path.read_bytes()), size) for path in chosen]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: compilation, allocator, caches
    return statistics.median(seconds(fn, device) for _ in range(repeats))


def cg_bytes(images_NCHW: torch.Tensor, cfg: DecomposeConfig) -> int:
    """Least bytes the CG iterations of a decomposition must move (float32).

    Per iteration and image, x, r and p are each read and written once (6 C H W floats) and the coefficients
    read once: pair weights and preconditioner in the u-step (3 H W), diagonal and preconditioner in the s-step
    (2 H W). Images count only while they iterate, so the real kernels move more: the fraction is a lower bound.
    """
    _, channels, height, width = images_NCHW.shape
    pixels, total, base = height * width, 0, images_NCHW
    for _ in range(cfg.order):
        level = solve_at(base, cfg)
        total += int(level.u_cg_iterations_N.sum()) * 4 * pixels * (6 * channels + 3)
        total += int(level.s_cg_iterations_N.sum()) * 4 * pixels * (6 + 2)
        base = level.u_NCHW
    return total


def peak_bandwidth(device: torch.device) -> float:
    """Bytes/s of the device memory: double data rate × clock × bus width."""
    props = torch.cuda.get_device_properties(device)
    return 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8


def scipy_decompose(image_CHW: np.ndarray, cfg: DecomposeConfig) -> np.ndarray:
    bases, base = [], image_CHW
    for _ in range(cfg.order):
        base, _ = solve_at_scipy(base, cfg)
        bases.append(base)
    return np.stack(bases)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    return f"{os.cpu_count()}-core CPU ({model}, {torch.get_num_threads()} threads), torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256], help="image side(s) in pixels")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 4, 16], help="none: skip throughput")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the median counts")
    parser.add_argument("--scipy-images", type=int, default=2, help="photographs timed against the reference")
    parser.add_argument("--order", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile the CG iteration")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--params", type=Path, help="decompose section of this params file (default: the defaults)")
    parser.add_argument("--folder", type=Path, help="ImageFolder tree to draw the images from")
    parser.add_argument("--count", type=int, default=0, help="--folder: images to draw (0: the largest batch)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    command = "python " + " ".join(sys.argv)
    where = machine(device)
    today = datetime.date.today().isoformat()
    mode = "compiled" if args.compile else "eager"
    print(f"# {where}; device {device}; {command}")
    print("| Figure | Value | Command | Machine | Date |")
    print("|---|---|---|---|---|")

    def row(figure: str, value: str) -> None:
        print(f"| {figure} | {value} | `{command}` | {where} | {today} |", flush=True)

    settings = {"order": args.order}
    if args.params:
        settings = yaml.safe_load(args.params.read_text())["decompose"]
    for size in args.sizes:
        count = max(args.batch_sizes + [args.scipy_images, args.count])
        images = folder_sample(args.folder, count, size) if args.folder else photographs(count, size)
        images = images.to(device)
        for batch_size in args.batch_sizes:
            chosen = settings | {"batch_size": batch_size, "device": args.device, "compile": args.compile}
            cfg = DecomposeConfig(**chosen)
            cpu_start = time.process_time()
            t = median_seconds(functools.partial(decompose, images, cfg), device, args.repeats)
            cpu = (time.process_time() - cpu_start) / (args.repeats + 1)  # the warm-up run included
            megapixels = count * size * size / 1e6
            value = f"{megapixels / t:.3f} MP/s, {count / t:.2f} images/s ({count} images in {t:.2f} s"
            value += f"; {cpu / count * 1e3:.1f} CPU ms per image, load average {os.getloadavg()[0]:.1f})"
            if device.type == "cuda":
                moved = cg_bytes(images, cfg)
                value += f"; CG moves ≥ {moved / t / 1e9:.0f} GB/s = {moved / t / peak_bandwidth(device):.0%} of peak"
            order = cfg.order
            row(f"decompose {size}×{size} RGB, order {order}, batch {batch_size}, {device.type} {mode}", value)

        if args.scipy_images and device.type == "cpu":
            cfg = DecomposeConfig(order=args.order, batch_size=1, device="cpu", compile=args.compile)
            ours, reference, error = [], [], 0.0
            for image in images[: args.scipy_images]:
                ours.append(median_seconds(functools.partial(decompose, image[None], cfg), device, args.repeats))
                start = time.perf_counter()
                bases_ref = scipy_decompose(image.numpy(), cfg)
                reference.append(time.perf_counter() - start)
                bases = decompose(image[None], cfg).bases_NKCHW[0].numpy()
                error = max(error, float(np.abs(bases - bases_ref).max()))
            n = args.scipy_images
            row(
                f"speed-up over SciPy splu reference, {size}×{size} RGB, order {args.order}, {n} photographs",
                f"{sum(reference) / sum(ours):.1f}× ({sum(ours) / n:.2f} s vs {sum(reference) / n:.1f} s per image; "
                f"max abs(B_k − B_k_ref) = {error:.1e} on [0, 1] intensities, same parameters and outer stopping rule)",
            )


if __name__ == "__main__":
    main()
