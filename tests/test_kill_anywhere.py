"""Every stage of the DAG killed with SIGKILL at a seeded random point, then rerun, ends as a run never killed.

The uninterrupted run of the whole chain is made once (in-process); each stage is then run as a separate process
in a fresh workspace holding that run's inputs, killed with its loader workers, and rerun. Every output must be
byte-identical to the uninterrupted run's. A training stage is killed after a random step and must resume from
the newest checkpoint it wrote, losing at most one checkpoint interval; the other stages are killed after a
random delay.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stages.cli import app
from tests.faults import digest, kill_when, newest_checkpoint, run_stage
from tests.workspace import write_params

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
        ("data/decomposed",),
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


def logged_step(summary: Path) -> int:
    """The last step dvclive logged (-1 before the first, or while the summary is being rewritten)."""
    try:
        return json.loads(summary.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """The whole chain run once without a kill, and how long each stage took (in-process)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    write_params(root, FREQUENT)
    seconds = {}
    here = os.getcwd()
    os.chdir(root)
    try:
        for stage in STAGES:
            started = time.perf_counter()
            result = CliRunner().invoke(app, [stage.name])
            assert result.exit_code == 0, result.output
            seconds[stage.name] = time.perf_counter() - started
    finally:
        os.chdir(here)
    return root, seconds


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_a_stage_killed_at_a_random_point_and_rerun_ends_as_if_never_killed(stage, uninterrupted, tmp_path):
    reference, seconds = uninterrupted
    write_params(tmp_path, FREQUENT)
    for part in stage.inputs:
        shutil.copytree(reference / part, tmp_path / part)
    rng = random.Random(f"kill/{stage.name}")
    if stage.section:
        train = yaml.safe_load((tmp_path / "params.yaml").read_text())[stage.section]["train"]
        kill_after = rng.randrange(1, train["steps"] - 1)
        kill_when(tmp_path, stage.name, lambda: logged_step(tmp_path / stage.live) >= kill_after)
        resumable = newest_checkpoint(tmp_path / stage.checkpoints)
        logged = logged_step(tmp_path / stage.live)
    else:
        # Timed from the command's start (when its lock file appears), within the time it took uninterrupted.
        lock = tmp_path / ".cart" / f"{stage.name}.lock"
        delay, started = rng.uniform(0.05, 0.6) * seconds[stage.name], []

        def due() -> bool:
            if not started and lock.exists():
                started.append(time.time())
            return bool(started) and time.time() - started[0] >= delay

        kill_when(tmp_path, stage.name, due)
    rerun = run_stage(tmp_path, stage.name)
    if stage.section:
        assert f"train from step {resumable}" in rerun.stderr, rerun.stderr[-2000:]
        assert logged + 1 - resumable <= train["checkpoint_every"]  # steps done before the kill, less those kept
    assert digest(tmp_path, stage.outputs) == digest(reference, stage.outputs)
