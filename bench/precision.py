"""bf16 autocast against fp32 on this CPU: one training step of the demo transformer and of the reference classifier.

    python bench/precision.py --threads 2 --repeats 5

`precision: auto` trains in bf16 on CPUs with AVX512-BF16 or AMX (pipeline.training.train.uses_bf16); this measures what
that buys. The two precisions alternate step by step (after an untimed step each), so a change in the machine's
load affects both alike; the median of --repeats is reported. The transformer is the demo's (params.yaml: its
width, depth and token layout; random codes as teacher-forcing inputs), the classifier the reference network of
`evaluator.model` at batch 128 on random 32 px images. Prints markdown rows for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from transformer import build, demo_setup  # noqa: E402  (bench/transformer.py: the demo transformer's setup)

from pipeline.models.evaluator import ReferenceNet  # noqa: E402
from pipeline.params import load_params  # noqa: E402
from pipeline.training.train import decay_groups  # noqa: E402


def transformer_step(params: Path) -> Callable[[bool], None]:
    setup = demo_setup(params)
    model, tokenizer, _ = build(setup, torch.device("cpu"), compile_model=False)
    model.train()
    indices = [torch.randint(0, setup.codebook_size, (setup.batch, m.side, m.side)) for m in model.layout.maps]
    x_BlC = tokenizer.teacher_forcing_inputs(indices)
    target_BL = torch.cat([i.flatten(1) for i in indices], dim=1)
    label_B = torch.randint(0, setup.num_classes, (setup.batch,))
    optimizer = torch.optim.AdamW(decay_groups(model, 0.05), lr=1e-4, fused=True)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits_BLV = model.head(model.hidden(label_B, x_BlC))
        F.cross_entropy(logits_BLV.float().flatten(0, 1), target_BL.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def classifier_step(params: Path, batch: int = 128) -> Callable[[bool], None]:
    net = ReferenceNet(load_params(params).evaluator.model, num_classes=10, input_size=32).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    image_B3HW = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    label_B = torch.randint(0, 10, (batch,))

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, logits_BK = net(image_B3HW)
        F.cross_entropy(logits_BK.float(), label_B).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def compare(step: Callable[[bool], None], repeats: int) -> dict[bool, float]:
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repeats):
        for bf16 in (False, True):
            step(bf16)  # untimed: the other precision's kernels ran last
            start = time.perf_counter()
            step(bf16)
            seconds[bf16].append(time.perf_counter() - start)
    return {bf16: statistics.median(times) * 1e3 for bf16, times in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default).")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    native = torch.cpu._is_avx512_bf16_supported()
    print(f"threads {torch.get_num_threads()}, native bf16 (AVX512-BF16/AMX): {native}, {datetime.date.today()}")
    print("| step | fp32 ms | bf16 ms | speed-up |\n|---|---|---|---|")
    for name, step in (
        ("demo transformer, batch 32", transformer_step(args.params)),
        ("reference classifier, batch 128", classifier_step(args.params)),
    ):
        ms = compare(step, args.repeats)
        print(f"| {name} | {ms[False]:.0f} | {ms[True]:.0f} | {ms[False] / ms[True]:.2f}× |")


if __name__ == "__main__":
    main()
