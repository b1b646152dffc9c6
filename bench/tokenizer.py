"""Tokenizer speed: one training step of a params file's tokenizer, as the tokenizer stage takes it.

    python bench/tokenizer.py --params params/cifar10.yaml --set tokenizer.model.channels=64 \\
        tokenizer.train.batch_size=128 --steps 3

The step is ``TokenizerTask.generator_loss`` (encode the image and its n bases, quantise, decode, reconstruction
and VQ loss) under the training stages' autocast, backward and an AdamW step, on random images and bases at the
data resolution (the timings do not depend on the pixels). Prints a markdown row, or with --json a JSON object
(``bench/speedup.py`` reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import yaml
from transformer import override  # bench/transformer.py: dotted --set overrides

import pipeline
from pipeline.config import build
from pipeline.models.tokenizer import Tokenizer
from pipeline.training.tokenizer_stage import TokenizerConfig
from pipeline.training.tokenizer_training import TokenizerTask
from pipeline.training.train import autocast_context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--set", nargs="*", default=[], help="key.path=value overrides of --params.")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps (median reported).")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default).")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    params = override(yaml.safe_load(args.params.read_text()), args.set)
    cfg = build(TokenizerConfig, params["tokenizer"], source=str(args.params), prefix="tokenizer")
    order, size, B = params["decompose"]["order"], params["data"]["resolution"], cfg.train.batch_size
    torch.manual_seed(0)
    model = Tokenizer(cfg.model, order, cfg.quantize)
    task = TokenizerTask(model, cfg.loss, lambda: iter(()), 0, codes_from_data=False)
    task.wrap({"tokenizer": model})
    (phase,) = [p for p in task.phases(cfg.train) if p.name == "tokenizer"]
    batch = (torch.rand(B, 3, size, size), torch.rand(B, max(order, 1), 3, size, size))

    def step(i: int) -> None:
        with autocast_context(cfg.train, torch.device("cpu")):
            loss, _ = phase.loss(batch, i)
        loss.backward()
        phase.optimizer.step()
        phase.optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    out = {
        "config": " ".join([str(args.params), *args.set]),
        "measurement": "tokenizer train step",
        "batch": B,
        "seconds": seconds,
        "runs": len(times),
        "images_per_s": B / seconds,
        "note": f"load average {os.getloadavg()[0]:.1f}",
        "code": str(Path(pipeline.__file__).resolve().parent.parent),  # the tree ``pipeline`` came from
    }
    if args.json:
        print(json.dumps(out))
    else:
        print("| config | measurement | batch | ms | images/s | notes |\n|---|---|---|---|---|---|")
        print(
            f"| {out['config']} | {out['measurement']} | {B} | {seconds * 1e3:.0f} (median of {len(times)}) | "
            f"{B / seconds:.1f} | {out['note']} |"
        )


if __name__ == "__main__":
    main()
