"""Decomposition throughput, and speed-up over the SciPy sparse-direct reference at equal accuracy.

    python bench/decompose.py --device cpu --sizes 256 --batch-sizes 1 4 16 --repeats 3 --scipy-images 2
    python bench/decompose.py --device cuda --compile --batch-sizes 1 16 64 --scipy-images 0

Throughput: the same photographs (whole scikit-image photographs and crops of them, resized to size × size RGB)
are decomposed at order 3 with the default parameters, in batches of each batch size; median of --repeats after
one warm-up run. On CUDA it also reports the memory traffic that the CG iterations must move at least (each
iteration reads and writes x, r and p once and reads its coefficient arrays; iterations counted per image) as a
fraction of the memory-bandwidth roofline.

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
import statistics
import sys
import time

import numpy as np
import torch

from pipeline.data.decompose import DecomposeConfig, decompose, solve_at, solve_at_scipy
from pipeline.data.sources import DEMO_PHOTOGRAPHS, demo_photograph, resize_square
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

    for size in args.sizes:
        count = max(args.batch_sizes + [args.scipy_images])
        images = photographs(count, size).to(device)
        for batch_size in args.batch_sizes:
            cfg = DecomposeConfig(order=args.order, batch_size=batch_size, device=args.device, compile=args.compile)
            t = median_seconds(functools.partial(decompose, images, cfg), device, args.repeats)
            megapixels = count * size * size / 1e6
            value = f"{megapixels / t:.3f} MP/s, {count / t:.2f} images/s ({count} images in {t:.2f} s)"
            if device.type == "cuda":
                moved = cg_bytes(images, cfg)
                value += f"; CG moves ≥ {moved / t / 1e9:.0f} GB/s = {moved / t / peak_bandwidth(device):.0%} of peak"
            row(f"decompose {size}×{size} RGB, order {args.order}, batch {batch_size}, {device.type} {mode}", value)

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
