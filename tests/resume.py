"""The SIGKILL-resume check shared by the training stages: kill mid-run, rerun, compare with a run never killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def assert_killed_run_resumes_to_the_uninterrupted_result(
    workspace: Path, stage: str, checkpoints: Path, kill_after: int, weights: str, inputs: list[str], fresh: Path
) -> None:
    """``cart <stage>`` killed once checkpoint ``kill_after`` exists, rerun, ends with the weights of a clean run.

    ``inputs`` are the workspace paths the stage reads (copied for the clean run); ``weights`` its output file.
    """
    cart = [sys.executable, "-m", "stages", stage]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen(cart, cwd=workspace, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (checkpoints / f"step-{kill_after:08d}").exists() and run.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, "training finished before it could be killed"
    killed_at = json.loads((checkpoints / "latest.json").read_text())["step"]
    assert killed_at >= kill_after
    resumed = subprocess.run(cart, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"train from step {killed_at}" in resumed.stderr

    for part in inputs:
        shutil.copytree(workspace / part, fresh / part)
    shutil.copy(workspace / "params.yaml", fresh / "params.yaml")
    straight = subprocess.run(cart, cwd=fresh, env=env, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    a, b = load_file(str(workspace / weights)), load_file(str(fresh / weights))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), "resumed training diverged from the uninterrupted run"
