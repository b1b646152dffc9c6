"""What the fault-injection tests share: stages run as separate processes, killed with SIGKILL, outputs compared."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Checkpoints often, and every step logged, so that where a kill landed is known to the step.
FREQUENT = {
    "tokenizer": {"train": {"checkpoint_every": 3, "log_every": 1}, "loss": {"lambda_gan": 0.1}},
    "transformer": {"train": {"steps": 16, "checkpoint_every": 4, "log_every": 1}},
    "evaluator": {"train": {"steps": 12, "checkpoint_every": 4, "log_every": 1, "num_workers": 1}},
}


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    section: str | None = None  # training stages: their params section, checkpoint root and dvclive summary
    checkpoints: str | None = None
    live: str | None = None


STAGES = [
    Stage("shard", (), ("data/shards",)),
    Stage("decompose", ("data/shards",), ("data/decomposed", "reports/decompose")),
    Stage(
        "train-tokenizer",
        ("data/shards", "data/decomposed"),
        ("models/tokenizer", "reports/tokenizer", "metrics/tokenizer.json"),
        "tokenizer",
        "models/checkpoints/tokenizer",
        "metrics/train_tokenizer/tokenizer/metrics.json",
    ),
    Stage("extract-tokens", ("data/decomposed", "models/tokenizer"), ("data/tokens",)),
    Stage(
        "train-transformer",
        ("data/tokens", "models/tokenizer"),
        ("models/transformer", "metrics/transformer.json"),
        "transformer",
        "models/checkpoints/transformer",
        "metrics/train_transformer/metrics.json",
    ),
    Stage(
        "train-evaluator",
        ("data/shards",),
        ("models/evaluator", "metrics/evaluator.json"),
        "evaluator",
        "models/checkpoints/evaluator",
        "metrics/train_evaluator/metrics.json",
    ),
    Stage(
        "evaluate",
        ("data/shards", "data/tokens", "models/tokenizer", "models/transformer", "models/evaluator"),
        ("metrics/eval.json", "reports/evaluate"),
    ),
]


class Writes:
    """The files a stage opens for writing (Python's open, pathlib, safetensors), in order, relative to the
    workspace; with ``fail`` and ``error`` given, opening the path ``fail`` raises OSError(``error``) instead,
    as a full disk (ENOSPC) or an unwritable output (EACCES) would.
    """

    def __init__(self, monkeypatch, workspace: Path, fail: str | None = None, error: int = errno.ENOSPC):
        import pipeline.models.weights
        import pipeline.training.checkpoints

        self.workspace, self.fail, self.error, self.paths = workspace.resolve(), fail, error, []
        real_open = builtins.open

        def opening(file, mode="r", *args, **kwargs):
            if isinstance(file, str | os.PathLike) and any(c in mode for c in "wax+"):
                self.opened(file)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", opening)
        monkeypatch.setattr(io, "open", opening)
        for module in (pipeline.training.checkpoints, pipeline.models.weights):
            monkeypatch.setattr(module, "save_file", self.saving(module.save_file))

    def saving(self, save_file: Callable) -> Callable:
        def save(tensors, filename, *args, **kwargs):
            self.opened(filename)
            return save_file(tensors, filename, *args, **kwargs)

        return save

    def opened(self, file: str | os.PathLike) -> None:
        path = Path(os.path.abspath(file))
        if not path.is_relative_to(self.workspace):
            return
        relative = str(path.relative_to(self.workspace))
        if relative == self.fail:
            raise OSError(self.error, os.strerror(self.error), str(file))
        if relative not in self.paths:
            self.paths.append(relative)


@dataclass
class Chain:
    """A workspace where every stage has run once, uninterrupted: each stage's time and the files it wrote."""

    root: Path
    seconds: dict[str, float]
    writes: dict[str, list[str]]


def run_chain(root: Path, monkeypatch) -> Chain:
    from typer.testing import CliRunner

    from stages.cli import app
    from tests.workspace import write_params

    write_params(root, FREQUENT)
    monkeypatch.chdir(root)
    chain = Chain(root, {}, {})
    for stage in STAGES:
        with monkeypatch.context() as patch:
            writes = Writes(patch, root)
            started = time.perf_counter()
            result = CliRunner().invoke(app, [stage.name])
            assert result.exit_code == 0, result.output
        chain.seconds[stage.name] = time.perf_counter() - started
        chain.writes[stage.name] = writes.paths
    return chain


def cart(stage: str) -> list[str]:
    return [sys.executable, "-m", "stages", stage]


def stage_env() -> dict[str, str]:
    import torch

    # A stage's numbers depend on its thread count (reduction order): run it with the threads the in-process
    # reference runs used (tests/conftest.py sets them), whatever OMP_NUM_THREADS the caller exported.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}


def run_stage(
    workspace: Path, stage: str, timeout: int = 300, command: list[str] | None = None
) -> subprocess.CompletedProcess:
    """``cart <stage>`` (or ``command``) in ``workspace`` to its end; fails the test with the stage's stderr if it
    failed."""
    argv = command or cart(stage)
    done = subprocess.run(argv, cwd=workspace, env=stage_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"cart {stage} failed:\n{done.stderr[-3000:]}"
    return done


def kill_when(
    workspace: Path, stage: str, ready: Callable[[], bool], timeout: float = 180, command: list[str] | None = None
) -> bool:
    """Start ``cart <stage>`` (or ``command``) and SIGKILL it (the whole process group: loader workers too) once
    ``ready()`` holds.

    True if it was killed; False if it ended first (successfully: a failure fails the test).
    """
    run = subprocess.Popen(
        command or cart(stage),
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
    assert run.returncode in (0, -signal.SIGKILL), f"cart {stage} failed (exit {run.returncode})"
    return run.returncode == -signal.SIGKILL


def checkpoint_steps(root: Path, since: float = 0.0) -> list[int]:
    """The steps of the complete checkpoints under a checkpoint root whose ``state.json`` (a checkpoint's last
    file) was written after ``since``."""
    steps = []
    for parent, dirs, _ in os.walk(root):  # see newest_checkpoint: checkpoints appear and are pruned while we look
        for name in dirs:
            if not name.startswith("step-"):
                continue
            try:
                if (Path(parent) / name / "state.json").stat().st_mtime >= since:
                    steps.append(int(name.removeprefix("step-")))
            except OSError:  # pruned while we looked
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
    # The stage renames ``.step-N.tmp-PID`` into place while we look; os.walk skips a directory that vanished
    # between being listed and being read, where Path.rglob raises FileNotFoundError.
    steps = [int(d.removeprefix("step-")) for _, dirs, _ in os.walk(root) for d in dirs if d.startswith("step-")]
    return max(steps, default=0)
