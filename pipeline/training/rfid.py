"""Training a tokenizer until its rFID stops improving.

rFID is the field's FID (``pipeline.evaluation.inception``: TensorFlow's Inception-v3, TF 1 bilinear resize) of a
tokenizer's reconstructions of val images (every map of the token sequence, decoded) against reference statistics:
a ``cart reference-stats`` file (for CIFAR-10: the training set's), or, by default, the same val images' own. The
training loop measures it every ``every`` steps and at the last step (``RfidMeter``); ``RfidState`` keeps the
history and the weights of the best measurement as checkpointed state, so a run killed and resumed measures,
keeps and stops exactly as one never killed. The stage then saves the best weights, not the last ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import atomic
from pipeline.config import Field, section
from pipeline.evaluation.tokenizer import psnr
from pipeline.models.tokenizer import Tokenizer
from pipeline.training.train import ema_copy, ema_update

REFERENCE_KEY = "tokenizer.rfid.reference_stats"
FEATURE_BATCH = 50  # images per Inception forward pass: 299² inputs, ~0.2 GB of activations per 50 on a CPU


@section
class RfidConfig:
    every: int = Field(
        0,
        ge=0,
        description="Optimiser steps between rFID measurements (Inception FID of the val reconstructions, also "
        "measured at the last step); the stage then saves the weights of the best measurement, not the last. "
        "0: off (no FID network needed; the last weights are saved).",
    )
    images: int = Field(
        1000,
        ge=4,
        description="Val images reconstructed for each rFID measurement (the first ones of the val split; fewer "
        "if val holds fewer). Each costs an Inception pass at 299×299 (bench/RESULTS.md).",
    )
    patience: int = Field(
        0,
        ge=0,
        description="Stop training after this many rFID measurements without a lower rFID than the best so far "
        "(0: never stop early; train tokenizer.train.steps).",
    )
    reference_stats: str | None = Field(
        None,
        description="The rFID's reference: an .npz of Inception statistics that `cart reference-stats` wrote (for "
        "CIFAR-10: of the training set, as the field's rFID). Null: the statistics of the same val images' "
        "originals, computed once and cached beside the checkpoints. The FID network is evaluate.inception_weights'.",
    )


class RfidState(nn.Module):
    """The checkpointed part of early stopping: every measurement (``fid_K``, ``step_K``; NaN: not yet taken) and
    the weights of the best one (``best``, a frozen copy of the tokenizer)."""

    def __init__(self, model: Tokenizer, measurements: int):
        super().__init__()
        self.best = ema_copy(model)
        self.register_buffer("fid_K", torch.full((measurements,), math.nan, dtype=torch.float64))
        self.register_buffer("step_K", torch.zeros(measurements, dtype=torch.long))

    @property
    def taken(self) -> int:
        return int((~self.fid_K.isnan()).sum())

    def best_index(self) -> int | None:
        if not self.taken:
            return None
        # The first of equal values: a later measurement must be lower to count as an improvement.
        return int(self.fid_K[: self.taken].argmin())

    def since_best(self) -> int:
        best = self.best_index()
        return 0 if best is None else self.taken - 1 - best

    @torch.no_grad()
    def record(self, step: int, fid: float, model: Tokenizer) -> None:
        if not math.isfinite(fid):  # NaN marks a measurement not yet taken; and NaN reconstructions are a failure
            raise FloatingPointError(f"step {step}: the rFID is {fid} (are the reconstructions finite?)")
        k = self.taken
        self.fid_K[k], self.step_K[k] = fid, step
        if self.best_index() == k:
            ema_update(self.best, model, 0.0)  # decay 0: an exact copy

    def summary(self) -> dict[str, Any]:
        best = self.best_index()
        return {
            "rfid_inception": float(self.fid_K[best]),
            "rfid_step": int(self.step_K[best]),
            "rfid_measurements": self.taken,
            "steps_trained": int(self.step_K[self.taken - 1]),  # the last measurement is at the last step
        }


def first_images(batches: Iterator, max_images: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(image_B3HW, bases_BK3HW) of the first ``max_images`` of (image, bases, label) batches."""
    count = 0
    for image_B3HW, bases_BK3HW, _ in batches:
        n = min(len(image_B3HW), max_images - count)
        yield image_B3HW[:n], bases_BK3HW[:n]
        count += n
        if count >= max_images:
            return


class RfidMeter:
    """The FID network and the reference statistics, loaded once; ``measure`` gives a tokenizer's rFID and the
    PSNR of the same reconstructions. Built before training: a bad reference file or weights file stops the stage
    (exit 2 naming it) before any step is taken."""

    def __init__(
        self,
        cfg: RfidConfig,
        inception_weights: str | None,
        val_batches: Callable[[], Iterator],
        val_count: int,
        val_files: Path,
        cache: Path,
        device: torch.device,
    ):
        # Lazy: torch-fidelity and the evaluation modules are only imported when rFID is on.
        from pipeline.evaluation.inception import NETWORK, RESIZE
        from pipeline.evaluation.sample_fid import inception, load_reference_stats, statistics, write_statistics

        self.cfg, self.val_batches = cfg, val_batches
        self.images = min(cfg.images, val_count)  # val may hold fewer
        self.reference = load_reference_stats(cfg.reference_stats, REFERENCE_KEY) if cfg.reference_stats else None
        self.net = inception(inception_weights, device)  # checked now: MissingWeights or InvalidInput
        if self.reference is not None:
            self.reference_name = str(cfg.reference_stats)
            return
        # The val originals' own statistics, cached by what they depend on (val shards, network, image count).
        key = atomic.fingerprint(atomic.files_fingerprint(val_files), NETWORK, RESIZE, cfg.images)
        path = cache / f"val-{key}.npz"
        if not path.is_file():
            features_ND = self._features(image for image, _ in first_images(val_batches(), cfg.images))
            write_statistics(path, statistics(features_ND), len(features_ND), f"val originals ({val_files})")
        self.reference = load_reference_stats(path, REFERENCE_KEY)
        self.reference_name = f"val ({int(self.reference['count'])} originals)"

    def _features(self, images: Iterator[torch.Tensor]) -> np.ndarray:
        from pipeline.evaluation.evaluation import to_uint8
        from pipeline.evaluation.metrics import batched, features

        chunks = [features(self.net, batched(to_uint8(img_B3HW), FEATURE_BATCH)).numpy() for img_B3HW in images]
        return np.concatenate(chunks)

    @torch.no_grad()
    def measure(self, model: Tokenizer) -> dict[str, float]:
        from pipeline.evaluation.sample_fid import frechet_distance, statistics

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        squared, count, recons = 0.0, 0, []
        for image_B3HW, bases_BK3HW in first_images(self.val_batches(), self.cfg.images):
            image_B3HW = image_B3HW.to(device)
            # Algorithms 1 and 2: the full token sequence, decoded.
            recon_B3HW = model.reconstruct(model.tokenize(image_B3HW, bases_BK3HW.to(device)))
            squared += (recon_B3HW - image_B3HW).square().mean((1, 2, 3)).sum().item()
            count += len(image_B3HW)
            recons.append(recon_B3HW)
        model.train(was_training)
        features_ND = self._features(iter(recons))
        fid = frechet_distance(statistics(features_ND), self.reference)
        return {"fid": fid, "psnr": psnr(squared / count), "images": count}


class RfidTracking:
    """What the training loop runs after each step: a measurement every ``cfg.every`` steps and after the last one
    (taken by the main process, whose ``meter`` is set, and broadcast so that every DDP rank stops together),
    recorded in ``state``; ``stopped`` once ``cfg.patience`` measurements in a row have not improved on the best."""

    def __init__(self, cfg: RfidConfig, steps: int, model: Tokenizer, meter: RfidMeter | None):
        self.cfg, self.steps, self.meter = cfg, steps, meter
        self.state = RfidState(model, -(-steps // cfg.every))

    def measure(self, done: int, model: Tokenizer) -> dict[str, float]:
        if done % self.cfg.every and done != self.steps:
            return {}
        result = self.meter.measure(model) if self.meter is not None else {"fid": math.nan, "psnr": math.nan}
        values = torch.tensor([result["fid"], result["psnr"]], dtype=torch.float64, device=self.state.fid_K.device)
        if torch.distributed.is_initialized():
            torch.distributed.broadcast(values, src=0)
        fid, value_psnr = values.tolist()
        self.state.record(done, fid, model)
        return {"val/rfid_inception": fid, "val/rfid_psnr": value_psnr}

    def stopped(self) -> bool:
        return self.cfg.patience > 0 and self.state.since_best() >= self.cfg.patience

    def summary(self) -> dict[str, Any]:
        """The best measurement, where it was taken, and what it was measured against."""
        out = self.state.summary()
        if self.meter is not None:
            out |= {"rfid_reference": self.meter.reference_name, "rfid_images": self.meter.images}
        return out
