"""Transformer speed: a training step, and KV-cached sampling with guidance (no VAE decode).

    python bench/transformer.py --config var-reference --device cpu --steps 10
    python bench/transformer.py --config d16-256 --device cuda --steps 20
    python bench/transformer.py --config demo --params params/cifar10.yaml --threads 1 --compile
    python bench/transformer.py --config demo --params params/cifar10.yaml --threads 2 --no-sampling \
        --set decompose.order=0 transformer.model.depth=8 transformer.model.width=384 transformer.model.heads=6 \
        transformer.train.batch_size=128

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

The CPU has no published peak worth comparing with, so a training row also reports the rate at which this machine
multiplies matrices of the step's own shapes (every linear layer's (B·L × in) · (in × out), timed one after another,
in bf16 and in fp32) and "CPU MFU": the step's model FLOP rate over that of the step's precision. --json prints one
JSON object per row instead (``bench/speedup.py`` reads it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

import pipeline
from pipeline.data.sources import DEMO_PHOTOGRAPHS
from pipeline.models.tokenizer import Tokenizer, TokenizerModelConfig
from pipeline.models.transformer import CART, SamplingConfig, TransformerModelConfig, forward_flops, generate
from pipeline.training.train import decay_groups, uses_bf16

PEAK_FLOPS = 989e12  # H100 SXM dense bf16
MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
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


def setups(config: str, device: torch.device, params: Path, assignments: list[str]) -> list[Setup]:
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
    return [demo_setup(params, assignments)]


def override(params: dict, assignments: list[str]) -> dict:
    """``params`` with dotted ``key.path=value`` assignments applied (values parsed as YAML), as ``dvc exp -S``:
    the key must exist in the params file, so a typo stops the run instead of timing an unchanged setup."""
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise SystemExit(f"--set {assignment!r}: expected key.path=value")
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise SystemExit(f"--set {key}: no such key in the params file (--params names it)")
        node[leaf] = yaml.safe_load(value)
    return params


def demo_setup(path: Path, assignments: list[str] = ()) -> Setup:
    """The transformer of a params file (its ``transformer`` section if any, with ``assignments`` applied) on the
    tokenizer's layout, with the demo's class count (the class embedding's few rows do not change the timings)."""
    params = override(yaml.safe_load(path.read_text()) if path.is_file() else {}, list(assignments))
    tokenizer = params.get("tokenizer", {}).get("model", {})
    section = params.get("transformer") or {}
    model = TransformerModelConfig(**section.get("model", {"depth": 4}))
    sampling = section.get("sampling") or section.get("sample") or {}
    sampling = SamplingConfig(**{k: v for k, v in sampling.items() if k in SamplingConfig.__pydantic_fields__})
    batch = (section.get("train") or {}).get("batch_size", 32)
    name = "demo" if path == Path("params.yaml") else str(path)
    return Setup(
        " ".join([name, *assignments]),
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
# The machine's own matmul rate


def step_gemms(model: CART, rows: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every matrix product a forward pass over ``rows`` tokens makes with a weight matrix."""
    parts = [*model.blocks, model.input_embed, model.head]
    linears = [m for part in parts for m in part.modules() if isinstance(m, nn.Linear)]
    return [(rows, m.in_features, m.out_features) for m in linears]


def matmul_rate(gemms: list[tuple[int, int, int]], dtype: torch.dtype, device: torch.device, repeats: int = 1) -> float:
    """FLOP/s of multiplying matrices of these shapes (distinct shapes timed once each, weighted by their count):
    the rate a step made of nothing but its matmuls would reach."""
    counts: dict[tuple[int, int, int], int] = {}
    for gemm in gemms:
        counts[gemm] = counts.get(gemm, 0) + 1
    flops = seconds = 0.0
    for (M, K, N), count in counts.items():
        a, b = torch.randn(M, K, device=device, dtype=dtype), torch.randn(K, N, device=device, dtype=dtype)
        a @ b  # warm-up: kernel choice, page faults
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        seconds += count * (time.perf_counter() - start) / repeats
        flops += count * 2 * M * K * N
    return flops / seconds


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

    def map_contribution(self, tokens: torch.Tensor, map_index: int) -> torch.Tensor:
        return self._timed(self.tokenizer.map_contribution, tokens, map_index)

    def next_input(self, f_hat_BChw: torch.Tensor, map_index: int) -> torch.Tensor:
        return self._timed(self.tokenizer.next_input, f_hat_BChw, map_index)


class Runner:
    """Runs measurements within a time budget, predicting their length from the last FLOP rate achieved."""

    def __init__(self, device: torch.device, steps: int, warmup: int, budget: float):
        self.device, self.steps, self.warmup, self.budget = device, steps, warmup, budget
        self.rate = calibrate(device)
        self.cpu_times: list[float] = []  # CPU seconds of this process in each timed run of the last measurement

    def measure(self, fn, flops: float, between=None) -> tuple[list[float], str]:
        """Seconds of each timed run of ``fn`` (empty if skipped) and a note on what was left out; ``between`` runs
        untimed after each timed run (a reference measurement that should see the same machine load)."""
        predicted = flops / self.rate
        runs, warmup, note = self.steps, self.warmup, ""
        if predicted > self.budget:
            return [], f"skipped: one run predicted to take {predicted:.0f} s > budget {self.budget:.0f} s"
        if predicted * (runs + warmup) > self.budget:
            runs, warmup = 1, 0
            note = f"1 run, no warm-up: {self.steps + self.warmup} runs predicted > budget {self.budget:.0f} s"
        for _ in range(warmup):
            fn()
        times, self.cpu_times = [], []
        for _ in range(runs):
            sync(self.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            sync(self.device)
            times.append(time.perf_counter() - start)
            self.cpu_times.append(time.process_time() - cpu_start)
            if between is not None:
                between()
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


def result(
    setup: Setup,
    what: str,
    device: torch.device,
    batch: int,
    times: list[float],
    images: int,
    tokens: int,
    flops: float,
    note: str,
    matmul: dict[str, float] | None = None,
    cpu_times: list[float] = (),
) -> dict:
    """One measurement: the median seconds and the rates derived from it (None where it was skipped), and the
    median CPU seconds of the process: on a shared CPU the wall clock counts other jobs' turns, the CPU time not."""
    out = {"config": setup.name, "measurement": what, "device": device.type, "batch": batch, "note": note}
    if not times:
        return out | {"seconds": None}
    seconds = statistics.median(times)
    out |= {"seconds": seconds, "runs": len(times), "images_per_s": images / seconds, "tokens_per_s": tokens / seconds}
    out |= {"model_flops_per_s": flops / seconds}
    if cpu_times:
        out["cpu_seconds"] = statistics.median(cpu_times)
    if device.type == "cuda":
        out["mfu"] = flops / seconds / PEAK_FLOPS
    for dtype, rate in (matmul or {}).items():
        out[f"matmul_{dtype}_flops_per_s"] = rate
    if matmul and device.type == "cpu":  # the step's rate over its own precision's matmul rate
        out["cpu_mfu"] = flops / seconds / matmul[what.split(", ")[1]]
    return out


HEADER = (
    "| config | measurement | device | batch | ms | images/s | tokens/s | model TFLOP/s | MFU | "
    "matmul bf16 / fp32 TFLOP/s | CPU MFU | notes |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def markdown(r: dict) -> str:
    if r["seconds"] is None:
        return f"| {r['config']} | {r['measurement']} | {r['device']} | {r['batch']} |{' – |' * 7} {r['note']} |"
    matmul = (
        f"{r['matmul_bf16_flops_per_s'] / 1e12:.3f} / {r['matmul_fp32_flops_per_s'] / 1e12:.3f}"
        if "matmul_bf16_flops_per_s" in r
        else "–"
    )
    cpu_mfu = f"{r['cpu_mfu']:.0%}" if r.get("cpu_mfu") is not None else "–"
    mfu = f"{r['mfu']:.1%}" if "mfu" in r else "–"
    cpu = f"CPU {r['cpu_seconds'] * 1e3:.1f} ms; " if r["device"] == "cpu" and "cpu_seconds" in r else ""
    return (
        f"| {r['config']} | {r['measurement']} | {r['device']} | {r['batch']} | "
        f"{r['seconds'] * 1e3:.1f} (median of {r['runs']}) | {r['images_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
        f"{r['model_flops_per_s'] / 1e12:.3f} | {mfu} | {matmul} | {cpu_mfu} | {cpu}{r['note']} |"
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


def training_step(setup: Setup, device: torch.device, precision: str, compile_model: bool):
    """The model and a closure that runs one training step of it on a fixed random batch."""
    model, tokenizer, step_model = build(setup, device, compile_model)
    model.train()
    layout, B = model.layout, setup.batch
    indices = [torch.randint(0, setup.codebook_size, (B, m.side, m.side), device=device) for m in layout.maps]
    x_BlC = tokenizer.teacher_forcing_inputs(indices)
    target_BL = torch.cat([i.flatten(1) for i in indices], dim=1)
    label_B = torch.randint(0, setup.num_classes, (B,), device=device)
    optimizer = torch.optim.AdamW(decay_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)

    def step():
        with autocast(device, precision):  # the training loop's forward: the trunk and the head's loss
            loss = step_model(label_B, x_BlC, target_BL).loss_BL.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def fitting_batch(setup: Setup, device: torch.device, precision: str) -> Setup:
    """CUDA: ``setup`` with the largest batch, halving from its own, whose eager training step fits in memory
    (compiled steps need less)."""
    while True:
        try:
            step = training_step(setup, device, precision, False)[1]
            step()
            sync(device)
            return setup
        except torch.cuda.OutOfMemoryError:
            if setup.batch == 1:
                raise
            setup = dataclasses.replace(setup, batch=setup.batch // 2)
        finally:
            step = None  # free the attempt's memory before the next
            torch.cuda.empty_cache()


def bench_training(setup: Setup, runner: Runner, precision: str, compile_model: bool) -> dict:
    device = runner.device
    model, step = training_step(setup, device, precision, compile_model)
    layout, B = model.layout, setup.batch
    flops = 3 * forward_flops(model, B, B)
    # The matmul rate of the step's own precision is taken after every timed step, so that both see the same load
    # on a shared machine; the other precision's once at the end.
    name = precision_name(device, precision)
    gemms = step_gemms(model, B * layout.num_tokens)
    rates = []
    times, note = runner.measure(step, flops, lambda: rates.append(matmul_rate(gemms, MATMUL_DTYPES[name], device)))
    matmul = None
    if times:
        matmul = {name: statistics.median(rates)}
        matmul |= {other: matmul_rate(gemms, dtype, device) for other, dtype in MATMUL_DTYPES.items() if other != name}
    load = f"load average {os.getloadavg()[0]:.1f}" if device.type == "cpu" else ""
    note = "; ".join(part for part in (note, load) if part)
    cpu_times = runner.cpu_times
    return result(
        setup, f"train step, {name}", device, B, times, B, B * layout.num_tokens, flops, note, matmul, cpu_times
    )


def bench_sampling(setup: Setup, runner: Runner, precision: str) -> dict:
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
    load = f"load average {os.getloadavg()[0]:.1f}" if device.type == "cpu" else ""
    note = "; ".join(part for part in (note, load) if part)
    return result(setup, what, device, B, times, B, B * model.layout.num_tokens, flops, note, None, runner.cpu_times)


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
    parser.add_argument("--set", nargs="*", default=[], help="--config demo: key.path=value overrides of --params.")
    parser.add_argument("--no-sampling", action="store_true", help="Time the training step only.")
    parser.add_argument("--batch", type=int, default=0, help="Training batch (0: the config's).")
    parser.add_argument("--sample-batch", type=int, default=0, help="Sampling batch (0: the config's).")
    parser.add_argument("--depth", type=int, default=0, help="Blocks (0: the config's; width and heads follow it).")
    parser.add_argument(
        "--fit-batch", action="store_true", help="CUDA: halve the training batch until an eager step fits in memory."
    )
    parser.add_argument("--json", action="store_true", help="One JSON object per measurement, not markdown.")
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
    code = str(Path(pipeline.__file__).resolve().parent.parent)  # the tree ``pipeline`` came from (bench/speedup.py)
    show = (lambda r: json.dumps(r | {"hardware": hardware, "code": code})) if args.json else markdown
    if not args.json:
        print(f"<!-- {datetime.date.today()} · {versions} · {hardware} · compile={args.compile} -->")
        print(HEADER)
    runner = Runner(device, args.steps, args.warmup, args.budget)
    for setup in setups(args.config, device, args.params, args.set):
        if args.depth:  # e.g. a d1 "d16-256" for a smoke test: same layout, 1/16 of the blocks and width
            setup = dataclasses.replace(setup, model=dataclasses.replace(setup.model, depth=args.depth))
        setup = dataclasses.replace(
            setup, batch=args.batch or setup.batch, sample_batch=args.sample_batch or setup.sample_batch
        )
        if args.fit_batch and device.type == "cuda":
            setup = fitting_batch(setup, device, args.precision)
        print(show(bench_training(setup, runner, args.precision, args.compile)), flush=True)
        if not args.no_sampling:
            print(show(bench_sampling(setup, runner, args.precision)), flush=True)


if __name__ == "__main__":
    main()
