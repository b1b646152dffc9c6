"""Features/s of the FID network (pipeline.evaluation.inception) on this CPU, variants timed alternately.

    python -m bench.inception --images 64 --rounds 3

Variants: ``plain`` (the module as converted: conv, batch norm, ReLU, contiguous NCHW), ``folded`` (batch norm folded
into the convolutions), ``folded_cl`` (folded + channels-last: what the metrics use), ``folded_cl_bf16`` (the same
under bf16 autocast; not used: see bench/RESULTS.md for what it does to FID). Input: random 32×32 uint8 images
(CIFAR-10's size), resized to 299 inside the timed region, as in evaluation. Results in bench/RESULTS.md.

``--roofline`` also prints the ceiling this CPU puts on any fp32 implementation: the network's FLOPs per image
(torch's FLOP counter, one multiply-add = 2 FLOPs) against the fp32 rate of a large matrix product on the same
threads (the best rate oneDNN/MKL reach here; a convolution cannot beat it).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from pipeline.evaluation.inception import fold_batch_norm, load_inception, preprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="Images per timed pass.")
    parser.add_argument("--batch", type=int, nargs="+", default=[32], help="Batch sizes to time.")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating rounds (median reported).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--roofline", action="store_true", help="Also the fp32 ceiling: FLOPs/image vs GEMM rate.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain = load_inception()
    if args.roofline:
        roofline(plain)
    folded = fold_batch_norm(copy.deepcopy(plain))
    folded_cl = copy.deepcopy(folded).to(memory_format=torch.channels_last)
    variants = {
        "plain": (plain, False, False),
        "folded": (folded, False, False),
        "folded_cl": (folded_cl, True, False),
        "folded_cl_bf16": (folded_cl, True, True),
    }
    img_uint8_N3HW = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)

    def rate(net, channels_last: bool, bf16: bool, batch: int) -> float:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            start = time.perf_counter()
            for i in range(0, len(img_uint8_N3HW), batch):
                x_B3HW = preprocess(img_uint8_N3HW[i : i + batch])
                if channels_last:
                    x_B3HW = x_B3HW.contiguous(memory_format=torch.channels_last)
                net(x_B3HW)
            return len(img_uint8_N3HW) / (time.perf_counter() - start)

    for net, cl, bf16 in variants.values():  # warm-up: oneDNN picks its kernels on the first call
        rate(net, cl, bf16, 8)
    rates: dict[tuple[str, int], list[float]] = {(v, b): [] for v in variants for b in args.batch}
    for _ in range(args.rounds):
        for (name, batch), seen in rates.items():
            seen.append(rate(*variants[name], batch))
    print(f"| variant | batch | images/s (median of {args.rounds}) | min | max |")
    print("|---|---|---|---|---|")
    for (name, batch), seen in rates.items():
        print(f"| {name} | {batch} | {statistics.median(seen):.1f} | {min(seen):.1f} | {max(seen):.1f} |")


def roofline(net: torch.nn.Module, side: int = 2048, repeats: int = 5) -> None:
    """Print the network's FLOPs per 299² image, this CPU's fp32 GEMM rate and the images/s they allow at most."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(preprocess(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)))
    flops = counter.get_total_flops()
    a_NN, b_NN = torch.randn(side, side), torch.randn(side, side)
    a_NN @ b_NN  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        a_NN @ b_NN
        seconds.append(time.perf_counter() - start)
    gemm = 2 * side**3 / min(seconds)
    print(f"FLOPs per image: {flops / 1e9:.2f} G; fp32 GEMM {side}³: {gemm / 1e9:.0f} GFLOP/s (best of {repeats});"
          f" ceiling {gemm / flops:.1f} images/s")


if __name__ == "__main__":
    main()
