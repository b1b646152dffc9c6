"""The `decompose` stage: decomposed shards, manifest, figures, determinism, resume, and refusing bad solves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.data import decomposed, shards
from pipeline.params import load_params
from stages.cli import app

runner = CliRunner()


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*.tar"))}


def test_stage_writes_image_bases_class_and_a_manifest_with_detail_energies(workspace):
    shutil.rmtree("data/decomposed")
    result = runner.invoke(app, ["decompose"])
    assert result.exit_code == 0, result.output
    order = load_params(Path("params.yaml")).decompose.order
    manifest = json.loads(Path("data/decomposed/manifest.json").read_text())
    source = json.loads(Path("data/shards/manifest.json").read_text())
    assert manifest["order"] == order
    for split in ("train", "val"):
        assert manifest["splits"][split]["count"] == source["splits"][split]["count"]
        assert len(manifest["splits"][split]["mean_detail_energy"]) == order
    for raw in shards.read_samples(decomposed.split_shards(Path("data/decomposed/val"))):
        bases = decomposed.decode_bases(raw)
        assert bases.dtype == np.float16 and bases.shape == (order, 3, 16, 16)
        image, bases_K3HW, cls = decomposed.decode_training_sample(raw)
        # Smoothing keeps the mean colour (Neumann boundaries): a wrong image/base pairing would not.
        assert torch.allclose(bases_K3HW[-1].mean((1, 2)), image.mean((1, 2)), atol=2e-3)
        assert 0 <= cls < len(source["classes"])
    assert len(list(Path("reports/decompose").glob("*.png"))) == 2


def test_rerun_gives_byte_identical_shards(workspace, tmp_path):
    params = load_params(Path("params.yaml")).decompose
    decomposed.decompose_splits(Path("data/shards"), tmp_path / "again", params)
    assert shard_bytes(tmp_path / "again") == shard_bytes(Path("data/decomposed"))


def test_killed_midway_the_rerun_keeps_finished_shards_and_ends_identical(workspace, tmp_path, monkeypatch):
    cfg = load_params(Path("params.yaml")).decompose
    expected = shard_bytes(Path("data/decomposed"))
    real, calls = decomposed.decompose_shard, []

    def dies_on_the_second_shard(samples, cfg):
        calls.append(samples[0]["__key__"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # what SIGINT does; SIGKILL leaves the same partial directory
        return real(samples, cfg)

    monkeypatch.setattr(decomposed, "decompose_shard", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        decomposed.decompose_splits(Path("data/shards"), tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()
    calls.clear()
    monkeypatch.setattr(decomposed, "decompose_shard", lambda samples, cfg: (calls.append(1), real(samples, cfg))[1])
    decomposed.decompose_splits(Path("data/shards"), tmp_path / "out", cfg)
    assert len(calls) == len(expected) - 1  # the first shard was kept, not recomputed
    assert shard_bytes(tmp_path / "out") == expected


def test_a_solve_that_breaks_down_names_the_samples_and_keeps_the_previous_output(workspace):
    before = shard_bytes(Path("data/decomposed"))
    params = Path("params.yaml")
    params.write_text(params.read_text().replace("intensity_scale: 1.0", "intensity_scale: 1.0e+25"))
    result = runner.invoke(app, ["decompose"])
    assert result.exit_code == 1
    assert "samples ['" in result.output and "non-finite" in result.output
    assert shard_bytes(Path("data/decomposed")) == before


def test_preview_draws_the_figure_for_one_image_file(workspace):
    raw = next(iter(shards.read_samples(decomposed.split_shards(Path("data/shards/val")))))
    Path("one.png").write_bytes(raw["png"])
    result = runner.invoke(app, ["decompose", "--preview", "one.png", "--out", "fig.png"])
    assert result.exit_code == 0, result.output
    assert Path("fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_preview_of_a_missing_file_says_which(workspace):
    result = runner.invoke(app, ["decompose", "--preview", "nope.png"])
    assert result.exit_code == 1 and "nope.png" in result.output
