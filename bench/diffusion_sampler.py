"""The diffusion head's sampler fed the exact denoiser of known 2-D distributions: sample mean and standard deviation
against the truth, per reverse-step count, with the fixed posterior variance (the sampler before
docs/diffusion-sampler.md) and with the learned one given its exact value.

    python bench/diffusion_sampler.py                    # 40 000 draws, seed 0, steps 10 25 50 100 250
    python bench/diffusion_sampler.py --temperature 0.9
    python bench/diffusion_sampler.py --trained          # heads trained on the test's known mixture instead

The distributions are the test's (tests/test_continuous.py: a Gaussian and a symmetric two-mode mixture) and an
asymmetric mixture (weights 0.3 / 0.7, unequal spreads), whose reverse steps are far from Gaussian at few steps.
``--trained``: a head of each variance kind trained as the test trains it (400 steps, seed 0) on the test's
two-class mixture, sampled per class: what a learned denoiser and variance make of the same sampler.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.models.diffusion import DiffusionConfig, DiffusionHead  # noqa: E402
from tests.test_continuous import EXACT, ExactHead, mixture  # noqa: E402

DISTRIBUTIONS = EXACT | {"asymmetric mixture": ([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.5]], [[0.3, 0.6], [0.5, 0.2]])}


def trained(steps: list[int], draws: int, temperature: float) -> None:
    """Heads trained on `mixture` (class 0: modes at (±1.5, 0.5), std 0.3; class 1: (0, −1), std 0.5)."""
    truth = {0: ([0.0, 0.5], [1.5297, 0.3]), 1: ([0.0, -1.0], [0.5, 0.5])}
    print("| class | variance | " + " | ".join(f"{s} steps" for s in steps) + " |")
    print("|---|---|" + "---|" * len(steps))
    for variance in ("fixed", "learned"):
        torch.manual_seed(0)
        cfg = DiffusionConfig(width=64, depth=2, draws=4, timesteps=1000, variance=variance)
        head = DiffusionHead(cfg, channels=2, cond_width=4)
        conditions = torch.eye(4)[:2]
        optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0)
        g = torch.Generator().manual_seed(1)
        for _ in range(400):
            label_N = torch.randint(2, (256,), generator=g)
            loss = head.loss(conditions[label_N], mixture(label_N, g)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for label, (mean, std) in truth.items():
            cells = []
            for s in steps:
                x_NC = head.sample(conditions[label].expand(draws, 4), s, temperature, torch.Generator().manual_seed(2))
                ratio = " / ".join(f"{r:.3f}" for r in (x_NC.std(0) / torch.tensor(std)).tolist())
                error = ((x_NC.mean(0) - torch.tensor(mean)).abs() / torch.tensor(std)).max().item()
                cells.append(f"{ratio} ({error:.3f})")
            print(f"| {label} | {variance} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="*", default=[10, 25, 50, 100, 250])
    parser.add_argument("--draws", type=int, default=40_000)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--trained", action="store_true", help="heads trained on the test's mixture")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{args.draws} draws, seed 0, temperature {args.temperature}; std relative to the truth, mean error / std")
    if args.trained:
        trained(args.steps, args.draws, args.temperature)
        return
    print("| distribution | variance | " + " | ".join(f"{s} steps" for s in args.steps) + " |")
    print("|---|---|" + "---|" * len(args.steps))
    for name, (w_K, mu_KC, sd_KC) in DISTRIBUTIONS.items():
        head = ExactHead(w_K, mu_KC, sd_KC)
        w, mu, sd = head.w_K[:, None], head.mu_KC, head.sd_KC
        mean = (w * mu).sum(0)
        std = ((w * (sd**2 + mu**2)).sum(0) - mean**2).sqrt()
        for variance in ("fixed", "learned"):
            head.cfg = dataclasses.replace(head.cfg, variance=variance)
            cells = []
            for steps in args.steps:
                z = torch.zeros(args.draws, 1)
                x_NC = head.sample(z, steps, args.temperature, torch.Generator().manual_seed(0)).double()
                ratio = " / ".join(f"{r:.3f}" for r in (x_NC.std(0) / std).tolist())
                error = ((x_NC.mean(0) - mean).abs() / std).max().item()
                cells.append(f"{ratio} ({error:.3f})")
            print(f"| {name} | {variance} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
