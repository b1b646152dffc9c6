"""LPIPS (the perceptual distance of the tokenizer's loss and its evaluation), read from local files only."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from pipeline.models.weights import MissingWeights

# torchvision's file names for the LPIPS backbones, as torch.hub caches them.
LPIPS_BACKBONE_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def load_lpips(net: str, weights: str | None) -> nn.Module:
    """LPIPS with its torchvision backbone read from a local file: never downloaded.

    The small linear calibration layers ship inside the lpips wheel; the backbone is read from ``weights`` or
    from the torch hub cache, where torchvision itself would look.
    """
    # lazy: lpips and torchvision take seconds to import (bench/RESULTS.md); only LPIPS-weighted training needs them
    import lpips
    import torchvision

    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]
    if not path.is_file():
        raise MissingWeights(
            f"LPIPS ({net}) needs torchvision's pretrained backbone weights and they cannot be downloaded here: "
            f"put {LPIPS_BACKBONE_FILES[net]} at {path} (or set tokenizer.loss.lpips_weights to its path), "
            "or set tokenizer.loss.lambda_perceptual: 0"
        )
    backbone = {"vgg": torchvision.models.vgg16, "alex": torchvision.models.alexnet}.get(
        net, torchvision.models.squeezenet1_1
    )()
    # weights_only: the restricted unpickler that reads tensors and nothing executable.
    backbone.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    with warnings.catch_warnings():  # lpips still calls torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    for slice_ in (getattr(model.net, f"slice{i}") for i in range(1, 8) if hasattr(model.net, f"slice{i}")):
        for index, layer in slice_.named_children():
            layer.load_state_dict(backbone.features[int(index)].state_dict())
    return model.eval().requires_grad_(False)
