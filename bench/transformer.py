"""Transformer speed: a training step, and KV-cached sampling with guidance (no VAE decode).

    python bench/transformer.py --config var-reference --device cpu --steps 10
    python bench/transformer.py --config d16-256 --device cuda --steps 20
    python bench/transformer.py --config demo --params params/cifar10.yaml --threads 1 --compile

Training step: forward, cross-entropy over every token, backward and a fused AdamW step (--precision: auto is
bf16 autocast where bf16 is native, on CUDA and on CPUs with AVX512-BF16 or AMX, else fp32, as in the training
stages), on teacher-forcing inputs built by the tokenizer from random codes.
Sampling: ``generate`` for a batch of random labels with VAR's evaluation setting (cfg 1.5, i.e. guidance weight
2.5, 2B rows per forward; top-k 900, top-p 0.96) for var-reference and d16-256; the time spent in the
tokenizer's ``map_contribution`` / ``next_input`` is reported separately (on CUDA, each call is synchronised to
time it). The tokenizer is randomly initialised with a tiny conv net: only its codebook, φ and layout are used.

Each row is the median of --steps runs after --warmup runs. A measurement whose runs are predicted (from its FLOPs
and the FLOP rate this process last achieved) to exceed --budget seconds runs once or is skipped, and says so.
Model FLOPs count the matmuls of every token (6·N·tokens for training, 2·N·tokens for sampling, N without the
per-image class/AdaLN weights; guided sampling runs the head on B rows only) plus attention over the keys each token
may see; MFU is against the dense bf16 peak of an H100 (989 TFLOP/s). Prints markdown rows for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from pipeline.data.sources import DEMO_PHOTOGRAPHS
from pipeline.models.tokenizer import Tokenizer, TokenizerModelConfig
from pipeline.models.transformer import CART, SamplingConfig, TransformerModelConfig, forward_flops, generate
from pipeline.training.train import decay_groups, uses_bf16

PEAK_FLOPS = 989e12  # H100 SXM dense bf16
VAR_SAMPLING = SamplingConfig(guidance=2.5, top_k=900, top_p=0.96)  # VAR's FID setting: cfg 1.5 = weight 2.5
VAR_256_SCALES = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]


@dataclass(frozen=True)
class Setup:
    name: str
    model: TransformerModelConfig
    scales: list[int]
    order: int
    detail_depth: int
    batch: int
    sample_batch: int
    codebook_size: int
    latent_channels: int
    num_classes: int
    sampling: SamplingConfig


def setups(config: str, device: torch.device, params: Path) -> list[Setup]:
    if config == "var-reference":
        var = TransformerModelConfig(depth=4)
        return [Setup("var-reference", var, [1, 2, 3, 4], 0, 1, 8, 8, 4096, 32, 1000, VAR_SAMPLING)]
    if config == "d16-256":
        batch = 64 if device.type == "cuda" else 8
        d16 = TransformerModelConfig(depth=16)
        return [
            Setup(f"d16-256 order {order}", d16, VAR_256_SCALES, order, 1, batch, 64, 4096, 32, 1000, VAR_SAMPLING)
            for order in (0, 3)
        ]
    return [demo_setup(params)]


def demo_setup(path: Path) -> Setup:
    """The transformer of a params file (its ``transformer`` section if any) on the tokenizer's layout, with the
    demo's class count (the class embedding's few rows do not change the timings)."""
    params = yaml.safe_load(path.read_text()) if path.is_file() else {}
    tokenizer = params.get("tokenizer", {}).get("model", {})
    section = params.get("transformer") or {}
    model = TransformerModelConfig(**section.get("model", {"depth": 4}))
    sampling = section.get("sampling") or section.get("sample") or {}
    sampling = SamplingConfig(**{k: v for k, v in sampling.items() if k in SamplingConfig.__pydantic_fields__})
    batch = (section.get("train") or {}).get("batch_size", 32)
    return Setup(
        "demo" if path == Path("params.yaml") else str(path),
        model,
        tokenizer.get("scales", [1, 2, 3, 4, 5, 6, 8]),
        params.get("decompose", {}).get("order", 3),
        tokenizer.get("detail_depth", 1),
        batch,
        batch,
        tokenizer.get("codebook_size", 512),
        tokenizer.get("latent_channels", 16),
        len(DEMO_PHOTOGRAPHS),
        sampling,
    )


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


# ---------------------------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedTokenizer:
    """Forwards the calls ``generate`` makes and adds up their time per sampling run (``runs``)."""

    def __init__(self, tokenizer: Tokenizer, device: torch.device):
        self.tokenizer, self.device, self.seconds, self.runs = tokenizer, device, 0.0, []

    def _timed(self, fn, *args):
        sync(self.device)
        start = time.perf_counter()
        out = fn(*args)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        return out

    def map_contribution(self, idx_Bhw: torch.Tensor, map_index: int) -> torch.Tensor:
        return self._timed(self.tokenizer.map_contribution, idx_Bhw, map_index)

    def next_input(self, f_hat_BChw: torch.Tensor, map_index: int) -> torch.Tensor:
        return self._timed(self.tokenizer.next_input, f_hat_BChw, map_index)


class Runner:
    """Runs measurements within a time budget, predicting their length from the last FLOP rate achieved."""

    def __init__(self, device: torch.device, steps: int, warmup: int, budget: float):
        self.device, self.steps, self.warmup, self.budget = device, steps, warmup, budget
        self.rate = calibrate(device)

    def measure(self, fn, flops: float) -> tuple[list[float], str]:
        """Seconds of each timed run of ``fn`` (empty if skipped) and a note on what was left out."""
        predicted = flops / self.rate
        runs, warmup, note = self.steps, self.warmup, ""
        if predicted > self.budget:
            return [], f"skipped: one run predicted to take {predicted:.0f} s > budget {self.budget:.0f} s"
        if predicted * (runs + warmup) > self.budget:
            runs, warmup = 1, 0
            note = f"1 run, no warm-up: {self.steps + self.warmup} runs predicted > budget {self.budget:.0f} s"
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(runs):
            sync(self.device)
            start = time.perf_counter()
            fn()
            sync(self.device)
            times.append(time.perf_counter() - start)
        self.rate = flops / statistics.median(times)
        return times, note


def calibrate(device: torch.device) -> float:
    """FLOP rate of a 1024³ matmul: the first guess of how long a measurement takes."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(1024, 1024, device=device, dtype=dtype)
    a @ a
    sync(device)
    start = time.perf_counter()
    for _ in range(4):
        a @ a
    sync(device)
    return 4 * 2 * 1024**3 / (time.perf_counter() - start)


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(precision, device))


def precision_name(device: torch.device, precision: str) -> str:
    return "bf16" if uses_bf16(precision, device) else "fp32"


def row(
    setup: Setup,
    what: str,
    device: torch.device,
    batch: int,
    times: list[float],
    images: int,
    tokens: int,
    flops: float,
    note: str,
) -> str:
    if not times:
        return f"| {setup.name} | {what} | {device.type} | {batch} | – | – | – | – | {note} |"
    seconds = statistics.median(times)
    mfu = f"{flops / seconds / PEAK_FLOPS:.1%}" if device.type == "cuda" else "–"
    return (
        f"| {setup.name} | {what} | {device.type} | {batch} | {seconds * 1e3:.1f} (median of {len(times)}) | "
        f"{images / seconds:.1f} | {tokens / seconds:.0f} | {mfu} | {note} |"
    )


# ---------------------------------------------------------------------------------------------------------------
# Measurements


def build(setup: Setup, device: torch.device, compile_model: bool) -> tuple[CART, Tokenizer, object]:
    torch.manual_seed(0)
    tokenizer_cfg = TokenizerModelConfig(
        channels=4,
        channel_multipliers=[1],
        attention_levels=[],
        mid_attention=False,
        latent_channels=setup.latent_channels,
        codebook_size=setup.codebook_size,
        scales=setup.scales,
        detail_depth=setup.detail_depth,
    )
    tokenizer = Tokenizer(tokenizer_cfg, setup.order).to(device).eval()
    model = CART(setup.model, tokenizer.layout, setup.num_classes, setup.codebook_size, setup.latent_channels)
    model = model.to(device)
    return model, tokenizer, torch.compile(model) if compile_model else model


def bench_training(setup: Setup, runner: Runner, precision: str, compile_model: bool) -> str:
    device = runner.device
    model, tokenizer, step_model = build(setup, device, compile_model)
    model.train()
    layout, B = model.layout, setup.batch
    indices = [torch.randint(0, setup.codebook_size, (B, m.side, m.side), device=device) for m in layout.maps]
    x_BlC = tokenizer.teacher_forcing_inputs(indices)
    target_BL = torch.cat([i.flatten(1) for i in indices], dim=1)
    label_B = torch.randint(0, setup.num_classes, (B,), device=device)
    optimizer = torch.optim.AdamW(decay_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)

    def step():
        with autocast(device, precision):
            logits_BLV = step_model(label_B, x_BlC)
        loss = F.cross_entropy(logits_BLV.float().flatten(0, 1), target_BL.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = 3 * forward_flops(model, B, B)
    times, note = runner.measure(step, flops)
    what = f"train step, {precision_name(device, precision)}"
    return row(setup, what, device, B, times, B, B * layout.num_tokens, flops, note)


def bench_sampling(setup: Setup, runner: Runner, precision: str) -> str:
    device = runner.device
    model, tokenizer, _ = build(setup, device, False)  # KV-cache shapes change every map: no compile
    model.eval()
    B = setup.sample_batch
    timed = TimedTokenizer(tokenizer, device)
    label_B = torch.randint(0, setup.num_classes, (B,), device=device)
    generator = torch.Generator(device).manual_seed(0)

    def sample():
        timed.seconds = 0.0
        with autocast(device, precision):
            generate(model, timed, label_B, setup.sampling, generator)
        timed.runs.append(timed.seconds)

    rows = 2 * B if setup.sampling.guidance != 1.0 else B  # guidance: [cond; uncond] rows, the head on B
    flops = forward_flops(model, rows, B)
    times, note = runner.measure(sample, flops)
    if times:
        tokenizer_ms = statistics.median(timed.runs[-len(times) :]) * 1e3
        note = f"{note + '; ' if note else ''}tokenizer calls {tokenizer_ms:.1f} ms of it"
    s = setup.sampling
    what = f"sample, {precision_name(device, precision)}, w={s.guidance:g}, top-k {s.top_k}, top-p {s.top_p:g}"
    return row(setup, what, device, B, times, B, B * model.layout.num_tokens, flops, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["var-reference", "demo", "d16-256"], default="var-reference")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="Timed runs per measurement (median reported).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed runs first.")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default).")
    parser.add_argument("--budget", type=float, default=120.0, help="Seconds a measurement may take at most.")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for training steps.")
    parser.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="--config demo: the params file whose model to time."
    )
    parser.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], default="auto", help="Autocast: auto is bf16 where native."
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    versions = f"torch {torch.__version__} · python {sys.version.split()[0]}"
    print(f"<!-- {datetime.date.today()} · {versions} · {hardware} · compile={args.compile} -->")
    print("| config | measurement | device | batch | ms | images/s | tokens/s | MFU | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    runner = Runner(device, args.steps, args.warmup, args.budget)
    for setup in setups(args.config, device, args.params):
        print(bench_training(setup, runner, args.precision, args.compile), flush=True)
        print(bench_sampling(setup, runner, args.precision), flush=True)


if __name__ == "__main__":
    main()
