"""What the fault-injection tests share: stages run as separate processes, killed with SIGKILL, outputs compared."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cart(stage: str) -> list[str]:
    return [sys.executable, "-m", "stages", stage]


def stage_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def run_stage(workspace: Path, stage: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``cart <stage>`` in ``workspace`` to its end; fails the test with the stage's stderr if it failed."""
    done = subprocess.run(cart(stage), cwd=workspace, env=stage_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"cart {stage} failed:\n{done.stderr[-3000:]}"
    return done


def kill_when(workspace: Path, stage: str, ready: Callable[[], bool], timeout: float = 180) -> None:
    """Start ``cart <stage>`` and SIGKILL it (the whole process group: loader workers too) once ``ready()`` holds."""
    run = subprocess.Popen(
        cart(stage),
        cwd=workspace,
        env=stage_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    while not ready() and run.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if run.poll() is None:
        os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert run.returncode == -signal.SIGKILL, f"cart {stage} ended (exit {run.returncode}) before it could be killed"


def checkpoint_steps(root: Path, since: float = 0.0) -> list[int]:
    """Steps recorded by every ``latest.json`` under a checkpoint root written after ``since`` (any layout)."""
    steps = []
    for pointer in root.rglob("latest.json"):
        try:
            if pointer.stat().st_mtime >= since:
                steps.append(json.loads(pointer.read_text())["step"])
        except (OSError, ValueError):  # replaced or pruned while we looked
            continue
    return steps


def digest(root: Path, outputs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """sha256 of every file of ``outputs`` (files or directories under ``root``) by path: equal is byte-identical."""
    files = []
    for output in outputs:
        path = root / output
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def newest_checkpoint(root: Path) -> int:
    """The highest step of the complete checkpoints under a checkpoint root (0 when there is none)."""
    return max((int(p.name.removeprefix("step-")) for p in root.rglob("step-*") if p.is_dir()), default=0)
