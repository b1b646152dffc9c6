"""The reference classifier: a small ResNet trained on the train shards, the feature network of the metrics.

FID, KID and precision/recall need an embedding of images, and the Inception Score a classifier. The standard
one (Inception-v3) needs weights that may not be at hand; this network is trained by the project
(``pipeline.training.evaluator_training``), in about a minute on a CPU, on the same classes the generator learns.
Its penultimate layer (``features``) feeds FID, KID and PRC, its ``logits`` the Inception Score and the class
consistency of conditional samples. Numbers it produces are only comparable between runs that use the same
reference weights: ``pipeline.evaluation.metrics`` names them ``*_ref``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Field, section
from pipeline.models.weights import load_config, load_state, save_weights


@section
class ReferenceNetConfig:
    channels: int = Field(32, ge=4, description="Width of the first stage; each later stage doubles it.")
    stages: int = Field(3, ge=1, le=5, description="Resolution stages; every stage after the first halves the side.")
    blocks: int = Field(1, ge=1, description="Residual blocks per stage.")
    feature_dim: int = Field(128, ge=2, description="Dimension of the embedding that FID, KID and PRC compare.")


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
        # Channels-last: oneDNN's CPU convolutions run faster on it (bench/RESULTS.md); the weights keep their
        # layout, so checkpoints do not change.
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
