"""bench/gpu_cifar10.sh at the CPU smoke size: both rows run every stage from a CIFAR-10 archive, and the results
file, the report and the logs land under $OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_cifar10_data import _tar

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_script_runs_order_0_and_order_3_at_the_smoke_size_and_writes_under_out(tmp_path):
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
    logs = {p.name.split("-")[0] for p in (out / "logs").iterdir()}
    assert logs == {
        "shard",
        "decompose",
        "train_tokenizer",
        "extract_tokens",
        "train_transformer",
        "train_evaluator",
        "evaluate",
    }
    assert "unfinished rows: none" in (out / "run.txt").read_text()
