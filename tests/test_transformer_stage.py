"""`cart train-transformer` and `cart sample`: the stage trains, resumes, runs under DDP; sampling writes figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.evaluation.sampling import sample_images
from pipeline.models.tokenizer import load_tokenizer
from pipeline.models.transformer import load_transformer
from pipeline.params import load_params
from stages.cli import app
from tests.resume import assert_killed_run_resumes_to_the_uninterrupted_result
from tests.workspace import add_tokens, write_params

HERE = Path(__file__).resolve().parent
runner = CliRunner()


@pytest.fixture
def tokens(workspace) -> Path:
    add_tokens(workspace)
    return workspace


def test_stage_trains_saves_weights_and_val_loss_falls(tokens):
    result = runner.invoke(app, ["train-transformer"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(Path("metrics/transformer.json").read_text())
    assert metrics["val_loss"] < metrics["val_loss_untrained"]
    assert set(metrics["val_loss_per_map"]) == set(metrics["val_loss_per_map_untrained"])
    # With the null class in place of the true one: what the class is worth to the model.
    assert set(metrics["val_loss_per_map_unconditional"]) == set(metrics["val_loss_per_map"])
    assert metrics["val_loss_unconditional"] != metrics["val_loss"]
    assert len(metrics["val_loss_per_map"]) == load_transformer("models/transformer/transformer")[0].layout.num_maps
    assert sorted(p.suffix for p in Path("models/transformer").iterdir()) == [".json", ".safetensors"]
    logged = Path("metrics/train_transformer/metrics.json").read_text()
    assert "loss_m0_base1x1" in logged and "acc_m6_D1_8x8" in logged  # per-map difficulty is visible


def test_stage_starts_from_init_from_and_prints_what_it_copied(tokens):
    from pipeline.models.transformer import build_model, save_transformer

    manifest = json.loads((tokens / "data" / "tokens" / "manifest.json").read_text())
    cfg = load_params(tokens / "params.yaml").transformer
    save_transformer(tokens / "start", build_model(cfg.model, manifest, seed=7))
    write_params(tokens, {"transformer": {"init_from": "start", "train": {"steps": 2}}})
    result = runner.invoke(app, ["train-transformer"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "copied from start: class_embed.weight" in text and "initialised fresh: nothing" in text
    write_params(tokens, {"transformer": {"init_from": "start", "model": {"width": 64}}})
    result = runner.invoke(app, ["train-transformer"])
    assert result.exit_code == 2 and "transformer.init_from" in result.output


def test_sample_writes_a_grid_and_a_progressive_strip_and_is_seeded(tokens):
    assert runner.invoke(app, ["train-transformer"]).exit_code == 0
    grid = runner.invoke(app, ["sample", "--classes", "0,3", "--n", "4", "--cfg", "1.5", "--out", "grid.png"])
    assert grid.exit_code == 0, grid.output
    strip = runner.invoke(app, ["sample", "--classes", "astronaut", "--n", "2", "--progressive", "--out", "fig1.png"])
    assert strip.exit_code == 0, strip.output
    for png in ("grid.png", "fig1.png"):
        assert Path(png).read_bytes()[:4] == b"\x89PNG"
    model, config = load_transformer("models/transformer/transformer")
    tokenizer, _ = load_tokenizer(config["tokenizer"])
    sampling = load_params(Path("params.yaml")).transformer.sampling
    labels = torch.tensor([0, 1, 2, 3])
    first, again = (sample_images(model, tokenizer, labels, sampling) for _ in range(2))
    assert torch.equal(first.images_N3HW, again.images_N3HW)
    other = sample_images(model, tokenizer, labels, type(sampling)(**{**vars(sampling), "seed": 1}))
    assert not torch.equal(first.images_N3HW, other.images_N3HW)


def test_the_weight_average_is_saved_beside_the_weights_and_sampled_unless_raw_is_asked_for(tokens):
    from pipeline.models.transformer import sampling_stem

    write_params(tokens, {"transformer": {"train": {"steps": 12, "ema_decay": 0.8}}})
    assert runner.invoke(app, ["train-transformer"]).exit_code == 0
    metrics = json.loads(Path("metrics/transformer.json").read_text())
    assert metrics["val_loss_ema"] != metrics["val_loss"]
    ema, raw = (load_transformer(f"models/transformer/{name}")[0] for name in ("transformer_ema", "transformer"))
    assert any(not torch.equal(a, b) for a, b in zip(ema.parameters(), raw.parameters(), strict=True))
    drawn = {}
    for weights in ("ema", "raw"):
        result = runner.invoke(app, ["sample", "--n", "2", "--weights", weights, "--out", f"{weights}.png"])
        assert result.exit_code == 0, result.output
        assert f"{weights} weights" in result.output
        drawn[weights] = Path(f"{weights}.png").read_bytes()
    assert drawn["ema"] != drawn["raw"]
    assert runner.invoke(app, ["sample", "--weights", "best"]).exit_code == 2
    # Trained again without an average: the old one is not left to be sampled in place of the new weights.
    write_params(tokens, {"transformer": {"train": {"steps": 12, "ema_decay": 0.0}}})
    assert runner.invoke(app, ["train-transformer"]).exit_code == 0
    assert sampling_stem("models/transformer/transformer", "ema") == (Path("models/transformer/transformer"), "raw")
    assert not Path("models/transformer/transformer_ema.safetensors").exists()


def test_unknown_class_is_refused_by_name(tokens):
    assert runner.invoke(app, ["train-transformer"]).exit_code == 0
    result = runner.invoke(app, ["sample", "--classes", "zebra"])
    assert result.exit_code == 1 and "'zebra'" in result.output


def test_tokens_of_another_tokenizer_are_refused(tokens):
    manifest = json.loads(Path("data/tokens/manifest.json").read_text())
    manifest["layout"]["num_tokens"] += 1
    Path("data/tokens/manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["train-transformer"])
    assert result.exit_code == 1 and "rerun extract_tokens" in result.output


@pytest.mark.slow
def test_killed_training_resumes_and_ends_where_an_uninterrupted_run_ends(tokens, tmp_path_factory):
    write_params(tokens, {"transformer": {"train": {"steps": 60, "checkpoint_every": 5}}})
    assert_killed_run_resumes_to_the_uninterrupted_result(
        tokens,
        "train-transformer",
        tokens / "models" / "checkpoints" / "transformer",
        kill_after=20,
        weights="models/transformer/transformer.safetensors",
        inputs=["data", "models/tokenizer"],
        fresh=tmp_path_factory.mktemp("uninterrupted"),
    )


@pytest.mark.slow
def test_the_stage_runs_under_torchrun_on_two_processes(tokens):
    # That DDP keeps the ranks' weights identical is tested on the shared loop (test_tokenizer); here: the
    # transformer wraps, steps and saves once under two gloo processes.
    write_params(tokens, {"transformer": {"train": {"steps": 6, "checkpoint_every": 3}}})
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "stages",
        "train-transformer",
    ]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    result = subprocess.run(cmd, cwd=tokens, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(Path("metrics/transformer.json").read_text())["val_loss"] > 0
    (run,) = (tokens / "models" / "checkpoints" / "transformer").iterdir()  # one run, one directory
    assert max(p.name for p in run.glob("step-*")) == "step-00000006"


def test_coarse_to_fine_with_self_correction_trains_saves_its_clusters_and_samples(tokens):
    write_params(
        tokens,
        {
            "transformer": {
                "coarse": {"clusters": 8},
                "train": {"steps": 4, "self_correction": {"p": 0.5, "ratio": 0.2}},
            }
        },
    )
    result = runner.invoke(app, ["train-transformer"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(Path("metrics/transformer.json").read_text())
    model, config = load_transformer("models/transformer/transformer")
    assert model.fine is not None and metrics["coarse_clusters"] == model.fine.clusters <= 8
    assert len(config["coarse_labels"]) == model.codebook_size
    logged = Path("metrics/train_transformer/metrics.json").read_text()
    assert "loss_coarse" in logged and "loss_fine" in logged
    grid = runner.invoke(app, ["sample", "--classes", "0,3", "--n", "2", "--out", "grid.png"])
    assert grid.exit_code == 0, grid.output
    write_params(tokens, {"transformer": {"coarse": {"clusters": 100000}}})
    result = runner.invoke(app, ["train-transformer"])
    assert result.exit_code == 2 and "transformer.coarse.clusters = 100000" in " ".join(result.output.split())


def test_unconditional_evaluation_feeds_the_null_class_to_every_sample(tokens):
    from pipeline.data import shards
    from pipeline.data.decomposed import split_shards
    from pipeline.data.tokens import decode_token_sample
    from pipeline.training.transformer_training import evaluate_transformer

    assert runner.invoke(app, ["train-transformer"]).exit_code == 0
    tokenizer, _ = load_tokenizer("models/tokenizer/tokenizer")
    model, _ = load_transformer("models/transformer/transformer")
    samples = [decode_token_sample(raw) for raw in shards.read_samples(split_shards(tokens / "data/tokens/val"))]
    idx_BL = torch.stack([idx_L for idx_L, _ in samples])
    label_B = torch.tensor([label for _, label in samples])
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    conditional = evaluate_transformer(model, tokenizer, iter([(idx_BL, label_B)]))
    null = evaluate_transformer(model, tokenizer, iter([(idx_BL, label_B)]), unconditional=True)
    assert torch.equal(seen[0], label_B) and bool((seen[1] == model.num_classes).all())
    assert null["loss"] != conditional["loss"]
