"""Final model weights as ``<stem>.safetensors`` plus ``<stem>.json`` (its config): nothing is unpickled to load.

A model's *stem* is the path of its two files without their suffix (``models/transformer/transformer`` for
``transformer.safetensors`` and ``transformer.json`` there); ``weights_path`` and ``config_path`` turn it into
them, and are the only places that do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline import atomic
from pipeline.config import ConfigError


class MissingWeights(FileNotFoundError):
    """Pretrained weights a network needs are not on this machine (they are never downloaded at run time)."""


def weights_path(stem: str | Path) -> Path:
    """``<stem>.safetensors``: the tensors of the model saved at ``stem``."""
    return Path(stem).with_suffix(".safetensors")


def config_path(stem: str | Path) -> Path:
    """``<stem>.json``: the config of the model saved at ``stem``."""
    return Path(stem).with_suffix(".json")


def save_weights(stem: str | Path, module: nn.Module, config: dict[str, Any]) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic.writing(weights_path(stem)) as tmp:
        save_file(state, str(tmp))
    atomic.write_json(config_path(stem), config)


def load_config(stem: str | Path) -> dict[str, Any]:
    path = config_path(stem)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model config (train the model first)")
    return json.loads(path.read_text())


def load_init_source(stem: str | Path, key: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Config and tensors of the model a training starts from (``key``, e.g. ``tokenizer.init_from``): a missing
    or unreadable file is a bad parameter (``ConfigError``), reported before anything is written."""
    try:
        return load_config(stem), load_state(stem)
    except Exception as err:  # missing files, bad JSON, a truncated safetensors file: all a bad parameter here
        raise ConfigError(key, [f"{stem}: {err}"]) from None


def init_fingerprint(stem: str | Path | None) -> list:
    """What a run started from, for checkpoint fingerprints: another init file never resumes a stale run."""
    if stem is None:
        return []
    paths = [config_path(stem), weights_path(stem)]
    # A missing file fingerprints as absent: loading it reports the problem, with the parameter's name.
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) if p.exists() else (str(p),) for p in paths]


def load_state(stem: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    path = weights_path(stem)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file (train the model first)")
    return load_file(str(path), device=str(device))
