"""The `extract_tokens` stage: stored tokens are exactly the tokenizer's, in the layout the manifest states."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from pipeline.data import shards
from pipeline.data.decomposed import decode_training_sample, split_shards
from pipeline.data.tokens import decode_token_sample, flatten_maps, layout_from_manifest, split_maps
from pipeline.models.tokenizer import Tokenizer, load_tokenizer, save_tokenizer
from pipeline.params import load_params
from stages.cli import app

runner = CliRunner()


def random_tokenizer(root: Path) -> Path:
    """An untrained tokenizer with the workspace's params: exactness does not need a good one."""
    params = load_params(root / "params.yaml")
    torch.manual_seed(0)
    model = Tokenizer(params.tokenizer.model, params.decompose.order)
    stem = root / "models" / "tokenizer" / "tokenizer"
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_tokenizer(stem, model.eval(), params.data.resolution)
    return stem


def test_decoding_the_stored_tokens_gives_the_tokenizers_reconstruction_exactly(workspace):
    stem = random_tokenizer(workspace)
    result = runner.invoke(app, ["extract-tokens"])
    assert result.exit_code == 0, result.output
    tokenizer, _ = load_tokenizer(stem)
    manifest = json.loads(Path("data/tokens/manifest.json").read_text())
    layout = layout_from_manifest(manifest)
    raws = list(shards.read_samples(split_shards(Path("data/tokens/val"))))
    sources = list(shards.read_samples(split_shards(Path("data/decomposed/val"))))
    assert [r["__key__"] for r in raws] == [s["__key__"] for s in sources]
    stored = torch.stack([decode_token_sample(r)[0] for r in raws])
    image = torch.stack([decode_training_sample(s)[0] for s in sources])
    bases = torch.stack([decode_training_sample(s)[1] for s in sources])
    expected = tokenizer.tokenize(image, bases)
    assert torch.equal(stored, flatten_maps(expected))
    assert torch.equal(tokenizer.reconstruct(split_maps(stored, layout)), tokenizer.reconstruct(expected))
    assert [decode_token_sample(r)[1] for r in raws] == [int(s["cls"]) for s in sources]


def test_manifest_states_every_maps_size_and_kind_and_tokens_are_int16(workspace):
    random_tokenizer(workspace)
    assert runner.invoke(app, ["extract-tokens"]).exit_code == 0
    manifest = json.loads(Path("data/tokens/manifest.json").read_text())
    maps = manifest["layout"]["maps"]
    order = load_params(Path("params.yaml")).decompose.order
    assert [m["kind"] for m in maps] == ["base"] * (len(maps) - order) + ["detail"] * order
    assert [m["level"] for m in maps if m["kind"] == "detail"] == list(range(order, 0, -1))
    assert sum(m["h"] * m["w"] for m in maps) == manifest["layout"]["num_tokens"]
    raw = next(iter(shards.read_samples(split_shards(Path("data/tokens/train")))))
    tokens = shards.decode_npy(raw["tokens.npy"])
    assert tokens.dtype == np.int16 and tokens.shape == (manifest["layout"]["num_tokens"],)
    assert manifest["splits"]["train"]["count"] == sum(
        1 for _ in shards.read_samples(split_shards(Path("data/tokens/train")))
    )


def test_a_tokenizer_of_another_order_is_refused(workspace):
    stem = random_tokenizer(workspace)
    config = json.loads(stem.with_suffix(".json").read_text())
    config["order"] = 0
    stem.with_suffix(".json").write_text(json.dumps(config))
    result = runner.invoke(app, ["extract-tokens"])
    assert result.exit_code == 1 and "rerun train_tokenizer" in result.output
    assert not Path("data/tokens").exists()
