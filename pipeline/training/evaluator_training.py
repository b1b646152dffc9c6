"""Training the reference classifier (``pipeline.models.evaluator``) with the shared loop: augmented images,
label-smoothed cross-entropy, measured on val."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import atomic
from pipeline.config import Field, section
from pipeline.data import shards
from pipeline.data.labelled import decode_labelled, decode_labelled_highres, has_highres
from pipeline.data.loader import ShardLoader
from pipeline.models.evaluator import ReferenceNet, ReferenceNetConfig, save_evaluator
from pipeline.progress import Progress
from pipeline.runtime import dist_from_env
from pipeline.training.train import Phase, RunPaths, TrainConfig, adamw, decay_groups, shard_training_loader, train


@section
class EvaluatorConfig:
    model: ReferenceNetConfig = Field(default_factory=ReferenceNetConfig, description="Architecture.")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            steps=200,
            batch_size=64,
            lr=3e-3,
            warmup_steps=20,
            min_lr_ratio=0.05,
            weight_decay=5e-4,
            beta2=0.99,
            checkpoint_every=100,
            log_every=10,
            num_workers=0,
            shuffle_buffer=1000,
        ),
        description="Optimisation.",
    )
    flip: bool = Field(True, description="Augment with random horizontal flips.")
    max_shift: int = Field(
        3, ge=0, description="Augment with random translations of up to this many pixels (reflect-padded)."
    )
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Label smoothing of the cross-entropy.")


def augment(img_uint8_B3HW: torch.Tensor, flip: bool, max_shift: int) -> torch.Tensor:
    """Random horizontal flips and translations (reflect padding), drawn independently for every image."""
    B, _, H, W = img_uint8_B3HW.shape
    x = img_uint8_B3HW
    if flip:
        flipped_B = torch.rand(B, device=x.device) < 0.5
        x = torch.where(flipped_B[:, None, None, None], x.flip(-1), x)
    if max_shift:
        s = max_shift
        padded = F.pad(x.float(), (s, s, s, s), mode="reflect")  # reflect padding is not defined for uint8
        dy_B, dx_B = torch.randint(0, 2 * s + 1, (2, B), device=x.device)
        rows_BH = dy_B[:, None] + torch.arange(H, device=x.device)
        cols_BW = dx_B[:, None] + torch.arange(W, device=x.device)
        batch_B = torch.arange(B, device=x.device)
        x_BHW3 = padded[batch_B[:, None, None], :, rows_BH[:, :, None], cols_BW[:, None, :]]
        x = x_BHW3.permute(0, 3, 1, 2).to(torch.uint8)
    return x


class EvaluatorTask:
    """The reference classifier as the training loop sees it: one phase, cross-entropy on augmented images."""

    def __init__(self, model: ReferenceNet, cfg: EvaluatorConfig, val_batches: Callable[[], Iterator]):
        self.model, self.cfg, self.val_batches = model, cfg, val_batches
        self.net: nn.Module = model

    def modules(self) -> dict[str, nn.Module]:
        return {"evaluator": self.model}

    def wrap(self, wrapped: dict[str, nn.Module]) -> None:
        self.net = wrapped["evaluator"]

    def phases(self, cfg: TrainConfig) -> list[Phase]:
        optimizer = adamw(decay_groups(self.model, cfg.weight_decay), cfg)
        return [Phase("evaluator", optimizer, self.loss, list(self.model.parameters()))]

    def to_device(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        image, cls = batch
        return image.to(device, non_blocking=True), cls.to(device, non_blocking=True)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        image_B3HW, cls_B = batch
        _, logits_BK = self.net(augment(image_B3HW, self.cfg.flip, self.cfg.max_shift))
        loss = F.cross_entropy(logits_BK.float(), cls_B, label_smoothing=self.cfg.label_smoothing)
        accuracy = (logits_BK.argmax(1) == cls_B).float().mean()
        return loss, {"loss": loss.item(), "accuracy": accuracy.item()}

    def after_step(self, step: int, batch: Any) -> dict[str, float]:
        return {}

    def evaluate(self) -> dict[str, float]:
        result = evaluate_classifier(self.model, self.val_batches())
        return {f"val/{k}": v for k, v in result.items()}


@torch.no_grad()
def evaluate_classifier(model: ReferenceNet, batches: Iterator) -> dict[str, float]:
    """Accuracy and (unsmoothed) cross-entropy on labelled batches, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss_sum, count = 0, 0.0, 0
    for image_B3HW, cls_B in batches:
        image_B3HW, cls_B = image_B3HW.to(device), cls_B.to(device)
        _, logits_BK = model(image_B3HW)
        loss_sum += F.cross_entropy(logits_BK.float(), cls_B, reduction="sum").item()
        correct += int((logits_BK.argmax(1) == cls_B).sum())
        count += len(cls_B)
    model.train(was_training)
    if count == 0:
        raise ValueError("no val samples to evaluate the reference classifier on")
    return {"accuracy": correct / count, "loss": loss_sum / count}


def train_evaluator(
    cfg: EvaluatorConfig,
    train_shards: list[str],
    val_shards: list[str],
    num_classes: int,
    resolution: int,
    out_stem: str | Path,
    paths: RunPaths,
    progress: Progress | None = None,
    highres_count: int | None = None,
) -> dict[str, float]:
    """Train the reference classifier on labelled shards, save it at ``out_stem``, return its val metrics.

    With ``highres_count`` (how many train samples hold a 2× reference) it learns the 2× images (``hr.png``) at
    ``resolution`` instead: the feature network of the ``*_2x`` metrics, which must see real detail at that size.
    """
    if not train_shards or not val_shards:
        raise FileNotFoundError("the reference classifier needs train and val shards (it is measured on val)")
    if highres_count is None:
        decode, select, count = decode_labelled, None, sum(shards.count_samples(url) for url in train_shards)
    else:
        decode, select, count = decode_labelled_highres, has_highres, highres_count
    train_loader, per_epoch = shard_training_loader(train_shards, decode, count, cfg.train, select=select)
    val_loader = ShardLoader(val_shards, decode, batch_size=256, shuffle=False, select=select)
    torch.manual_seed(cfg.train.seed)
    model = ReferenceNet(cfg.model, num_classes, resolution)
    task = EvaluatorTask(model, cfg, lambda: iter(val_loader.epoch(0)))
    inputs = [(url, Path(url).stat().st_size, Path(url).stat().st_mtime_ns) for url in train_shards + val_shards]
    fingerprint = atomic.fingerprint(dataclasses.asdict(cfg), num_classes, resolution, highres_count, inputs)
    metrics = train(
        task, cfg.train, train_loader.epoch, paths, fingerprint, batches_per_epoch=per_epoch, progress=progress
    )
    if not dist_from_env().is_main:
        return {}
    save_evaluator(out_stem, model.eval())
    return {
        "val_accuracy": metrics["val/accuracy"],
        "val_loss": metrics["val/loss"],
        "chance_accuracy": 1 / num_classes,
    }
