"""Sampling speed of trained runs: images/s of guided, KV-cached sampling plus decoding, as `evaluate` samples.

    python bench/sampling.py --run DIR [DIR ...] --threads 2 --batch 64 --repeats 3 --diffusion-steps 10 25 50 100

Each DIR is a directory laid out as the repository after `train_transformer` (`params.yaml`, `models/transformer`,
`models/tokenizer`): the workspace itself, a `dvc exp` checkout, or a `train_transformer-*` job directory of
`cart tables`. The run's own `transformer.sampling` settings are used (guidance, top-k/top-p, the moving average
of the weights where there is one); a diffusion head is timed at each of --diffusion-steps, a softmax head once.
One batch of --batch images (labels cycling over the classes) is drawn per measurement with `sample_chunk`, the
function `evaluate` and `sample-fid` draw with: the transformer's maps, then the tokenizer's decoder. Median of
--repeats after one warm-up batch. Prints markdown rows for bench/RESULTS.md; measure on an idle machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

from pipeline.evaluation.sampling import sample_chunk
from pipeline.models.tokenizer import load_tokenizer
from pipeline.models.transformer import load_transformer, sampling_stem
from pipeline.params import load_params
from pipeline.runtime import resolve_device


def describe(params) -> str:
    """The row's name: order, quantisation and head, the coarse-to-fine and self-correction options."""
    name = f"order {params.decompose.order}"
    if params.tokenizer.quantize == "continuous":
        name += ", continuous, diffusion head"
    if params.transformer.coarse.clusters:
        name += f", coarse-to-fine K {params.transformer.coarse.clusters}"
    if params.transformer.train.self_correction.p:
        name += f", self-correction p {params.transformer.train.self_correction.p}"
    return name


def time_batches(model, tokenizer, label_B: torch.Tensor, sampling, repeats: int) -> float:
    """Median seconds of one batch over ``repeats`` runs, after one warm-up run."""
    seconds = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        sample_chunk(model, tokenizer, label_B, sampling, i)
        if label_B.device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", nargs="+", type=Path, required=True, help="run directories (see above)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--batch", type=int, default=64, help="images per batch (evaluate's default batch_size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--diffusion-steps", nargs="+", type=int, default=[10, 25, 50, 100])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    print(
        f"<!-- {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {device}, "
        f"torch {torch.__version__}, {datetime.date.today()} -->"
    )
    print("| run | tokens | reverse steps | ms per batch | images/s |")
    print("|---|---|---|---|---|")
    for run in args.run:
        params = load_params(run / "params.yaml")
        sampling = params.transformer.sampling.resolved()
        stem, _ = sampling_stem(run / "models/transformer/transformer", sampling.weights)
        model, config = load_transformer(stem, device)
        tokenizer, _ = load_tokenizer(run / "models/tokenizer/tokenizer", device)
        label_B = torch.arange(args.batch, device=device) % len(config["classes"])
        steps = args.diffusion_steps if model.diffusion is not None else [None]
        for n in steps:
            cfg = sampling if n is None else dataclasses.replace(sampling, diffusion_steps=n)
            seconds = time_batches(model, tokenizer, label_B, cfg, args.repeats)
            print(
                f"| {describe(params)} | {model.layout.num_tokens} | {'–' if n is None else n} | "
                f"{seconds * 1e3:.0f} | {args.batch / seconds:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
