"""bench/gpu.sh runs end to end: its --smoke size runs every step of the GPU run on the CPU at toy sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_script_smoke_runs_every_step_and_summarises_them(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--smoke"], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.split("## Summary")[1]
    for step in ("tests", "decompose", "transformer"):
        assert f"{step}: exit 0" in summary
    assert "decompose 32×32 RGB, order 3" in summary
    for order in (0, 3):  # a training row and a guided-sampling row with figures for both layouts
        rows = [line for line in summary.splitlines() if line.startswith(f" d16-256 order {order} |")]
        assert [row.split("|")[1].split(",")[0].strip() for row in rows] == ["train step", "sample"]
        assert all("–" not in row.split("|")[4] for row in rows)  # a time was measured, not skipped
    assert {p.name for p in tmp_path.iterdir()} >= {"tests.txt", "decompose.txt", "transformer.txt", "steps.txt"}


def test_gpu_script_rejects_an_unknown_argument():
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--fast"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr
