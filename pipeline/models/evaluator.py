"""The reference classifier: a small ResNet trained on the train shards, the feature network of the metrics.

FID, KID and precision/recall need an embedding of images, and the Inception Score a classifier. The standard
one (Inception-v3) needs weights that may not be at hand; this network is trained here, in about a minute on a
CPU, on the same classes the generator learns. Its penultimate layer (``features``) feeds FID, KID and PRC, its
``logits`` the Inception Score and the class consistency of conditional samples. Numbers it produces are only
comparable between runs that use the same reference weights: ``pipeline.evaluation.metrics`` names them ``*_ref``.
"""

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
from pipeline.models.weights import load_config, load_state, save_weights
from pipeline.progress import Progress
from pipeline.training.train import Phase, RunPaths, TrainConfig, adamw, decay_groups


@section
class ReferenceNetConfig:
    channels: int = Field(32, ge=4, description="Width of the first stage; each later stage doubles it.")
    stages: int = Field(3, ge=1, le=5, description="Resolution stages; every stage after the first halves the side.")
    blocks: int = Field(1, ge=1, description="Residual blocks per stage.")
    feature_dim: int = Field(128, ge=2, description="Dimension of the embedding that FID, KID and PRC compare.")


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


class BasicBlock(nn.Module):
    """ResNet's two-conv block (post-activation), with a strided 1×1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x_BChw)))
        return F.relu(self.skip(x_BChw) + self.bn2(self.conv2(h)))


class ReferenceNet(nn.Module):
    """uint8 images of any size (≥ 16 px) → (features_BD, logits_BK); inputs are resized to ``input_size``."""

    def __init__(self, cfg: ReferenceNetConfig, num_classes: int, input_size: int):
        super().__init__()
        if input_size < 16:
            raise ValueError(f"input_size {input_size}: the reference network needs images of 16 px or more")
        self.cfg, self.num_classes, self.input_size = cfg, num_classes, input_size
        c = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        for stage in range(cfg.stages):
            width = cfg.channels * 2**stage
            for block in range(cfg.blocks):
                layers.append(BasicBlock(c, width, stride=2 if stage > 0 and block == 0 else 1))
                c = width
        self.body = nn.Sequential(*layers)
        self.embed = nn.Linear(c, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, num_classes)
        for m in self.modules():  # He initialisation, as torchvision's ResNets: activations keep their scale
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def normalise(self, img_uint8_B3HW: torch.Tensor) -> torch.Tensor:
        x_B3HW = img_uint8_B3HW.float() / 127.5 - 1
        if x_B3HW.shape[-2:] != (self.input_size, self.input_size):
            # antialias: a large image shrunk without it aliases into features the training images never had
            x_B3HW = F.interpolate(
                x_B3HW, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True
            )
        return x_B3HW

    def forward(self, img_uint8_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if img_uint8_B3HW.dtype != torch.uint8 or img_uint8_B3HW.ndim != 4 or img_uint8_B3HW.shape[1] != 3:
            raise ValueError(f"expected uint8 B×3×H×W images, got {img_uint8_B3HW.dtype} {tuple(img_uint8_B3HW.shape)}")
        # Channels-last: oneDNN's CPU convolutions run 1.4× faster on it (1 thread, batch 128, fp32 and bf16); the
        # weights keep their layout, so checkpoints do not change.
        x_B3HW = self.normalise(img_uint8_B3HW).contiguous(memory_format=torch.channels_last)
        h_BC = self.body(x_B3HW).mean((2, 3))
        features_BD = F.relu(self.embed(h_BC))
        return features_BD, self.head(features_BD)


def save_evaluator(stem: str | Path, model: ReferenceNet) -> None:
    config = {"model": dataclasses.asdict(model.cfg), "num_classes": model.num_classes, "input_size": model.input_size}
    save_weights(stem, model, config)


def load_evaluator(stem: str | Path, device: torch.device | str = "cpu") -> ReferenceNet:
    """The reference network saved at ``stem`` (``.safetensors`` + ``.json``), in eval mode."""
    config = load_config(stem)
    model = ReferenceNet(ReferenceNetConfig(**config["model"]), config["num_classes"], config["input_size"])
    model.load_state_dict(load_state(stem, device))
    return model.to(device).eval().requires_grad_(False)


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


def decode_labelled(raw: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """(image_uint8_3HW, cls) of a ``data/shards`` sample."""
    return torch.from_numpy(shards.decode_png(raw["png"])).permute(2, 0, 1).contiguous(), int(raw["cls"])


def has_highres(raw: dict[str, Any]) -> bool:
    """Whether a ``data/shards`` sample holds the 2× (highres_scale×) reference ``hr.png``."""
    return "hr.png" in raw


def decode_labelled_highres(raw: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """(image_uint8_3HW at highres_scale × the resolution, cls) of a sample that has one."""
    return torch.from_numpy(shards.decode_png(raw["hr.png"])).permute(2, 0, 1).contiguous(), int(raw["cls"])


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
    from pipeline.data.loader import ShardLoader
    from pipeline.runtime import dist_from_env
    from pipeline.training.train import shard_training_loader, train

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
