"""A tiny but real pipeline workspace for stage tests: demo shards at 16 px, decomposed, and small params."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY: dict[str, Any] = {
    "data": {"resolution": 16, "demo_train_per_class": 8, "demo_val_per_class": 4, "workers": 1, "shard_size": 24},
    "decompose": {
        "order": 2,
        "outer_iterations": 4,
        "outer_tol": 1.0e-3,
        "cg_max_iterations": 30,
        "cg_tol": 1.0e-3,
        "batch_size": 32,
        "preview_count": 2,
    },
    "tokenizer": {
        "model": {
            "channels": 8,
            "channel_multipliers": [1, 2],
            "latent_channels": 8,
            "codebook_size": 64,
            "scales": [1, 2, 4, 6, 8],
            "attention_levels": [],
            "mid_attention": False,
        },
        "loss": {"restart_every": 4},
        "train": {
            "steps": 12,
            "batch_size": 8,
            "warmup_steps": 2,
            "checkpoint_every": 4,
            "log_every": 2,
            "eval_every": 0,
            "num_workers": 0,
            "shuffle_buffer": 32,
            "device": "cpu",
        },
        "compare": False,
        "eval_images": 16,
    },
    "transformer": {
        "model": {"depth": 1, "width": 32, "heads": 2},
        "train": {
            "steps": 30,
            "batch_size": 8,
            "lr": 3.0e-3,
            "warmup_steps": 2,
            "checkpoint_every": 10,
            "log_every": 5,
            "eval_every": 0,
            "num_workers": 0,
            "shuffle_buffer": 32,
            "device": "cpu",
        },
    },
    "evaluator": {
        "model": {"channels": 8, "stages": 2, "feature_dim": 16},
        "train": {"steps": 10, "batch_size": 16, "warmup_steps": 2, "checkpoint_every": 5, "device": "cpu"},
    },
    # The FID network at 299² is most of a tiny evaluate's time: on only where a test is about it.
    "evaluate": {
        "samples_per_class": 4,
        "highres_scale": 2,  # the demo skips it (time); the tests keep it
        "highres_per_class": 1,
        "figure_per_class": 2,
        "device": "cpu",
        "inception": False,
    },
}


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_params(root: Path, override: dict | None = None) -> Path:
    """params.yaml in ``root``: the shipped file with the tiny settings (and ``override``) applied."""
    values = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), merge(TINY, override or {}))
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def add_tokens(root: Path) -> Path:
    """An untrained tokenizer saved where train_tokenizer puts it, and the token shards extract_tokens makes."""
    import torch

    from pipeline.data.tokens import extract_tokens
    from pipeline.models.tokenizer import Tokenizer, save_tokenizer
    from pipeline.params import load_params

    params = load_params(root / "params.yaml")
    torch.manual_seed(0)
    model = Tokenizer(params.tokenizer.model, params.decompose.order, params.tokenizer.quantize).eval()
    if not model.continuous:
        with torch.no_grad():  # codes spread like real encoder outputs, so that images get varied tokens
            model.codebook.weight.normal_(0, 0.5)
    stem = root / "models" / "tokenizer" / "tokenizer"
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_tokenizer(stem, model, params.data.resolution)
    extract_tokens(stem, root / "data" / "decomposed", root / "data" / "tokens", params.tokens)
    return stem


def build_data(root: Path, override: dict | None = None) -> Path:
    """Shards and decomposed shards under ``root/data`` as the stages would write them."""
    from pipeline.data.decomposed import decompose_splits
    from pipeline.data.ingest import build_shards
    from pipeline.params import load_params

    params = load_params(write_params(root, override))
    build_shards(params.data, root / "data" / "shards")
    decompose_splits(root / "data" / "shards", root / "data" / "decomposed", params.decompose)
    return root
