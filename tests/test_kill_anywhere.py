"""Every stage of the DAG killed with SIGKILL at a seeded random point, then rerun, ends as a run never killed.

The uninterrupted run of the whole chain is made once, in-process (``finished_chain``); each stage is then run as
a separate process in a fresh workspace holding that run's inputs, killed with its loader workers, and rerun.
Every output must be byte-identical to the uninterrupted run's. A training stage is killed after a random step
and must resume from the newest checkpoint it wrote, losing at most one checkpoint interval; the other stages are
killed after a random delay.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.faults import FREQUENT, STAGES, digest, kill_when, newest_checkpoint, run_stage
from tests.workspace import write_params


def logged_step(summary: Path) -> int:
    """The last step dvclive logged (-1 before the first, or while the summary is being rewritten)."""
    try:
        return json.loads(summary.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def after(seconds: float, lock: Path) -> Callable[[], bool]:
    """A kill condition: ``seconds`` after ``lock`` appears (the command has started)."""
    started: list[float] = []

    def due() -> bool:
        if not started and lock.exists():
            started.append(time.time())
        return bool(started) and time.time() - started[0] >= seconds

    return due


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_a_stage_killed_at_a_random_point_and_rerun_ends_as_if_never_killed(stage, finished_chain, tmp_path):
    reference, seconds = finished_chain.root, finished_chain.seconds
    write_params(tmp_path, FREQUENT)
    for part in stage.inputs:
        shutil.copytree(reference / part, tmp_path / part)
    rng = random.Random(f"kill/{stage.name}")
    if stage.section:
        train = yaml.safe_load((tmp_path / "params.yaml").read_text())[stage.section]["train"]
        kill_after = rng.randrange(1, train["steps"] - 1)
        assert kill_when(tmp_path, stage.name, lambda: logged_step(tmp_path / stage.live) >= kill_after)
        resumable = newest_checkpoint(tmp_path / stage.checkpoints)
        logged = logged_step(tmp_path / stage.live)
    else:
        # Timed from the command's start (when its lock file appears), within the time it took uninterrupted. On
        # a busy machine that run may have been slower than this one: if the stage ends first, its outputs are
        # removed and the delay drawn again, shorter.
        for attempt in range(4):
            delay = rng.uniform(0.05, 0.6) * seconds[stage.name] * 0.3**attempt
            if kill_when(tmp_path, stage.name, after(delay, tmp_path / ".cart" / f"{stage.name}.lock")):
                break
            for output in stage.outputs:
                shutil.rmtree(tmp_path / output) if (tmp_path / output).is_dir() else (tmp_path / output).unlink()
        else:
            pytest.fail(f"cart {stage.name} ended before it could be killed, four times")
    rerun = run_stage(tmp_path, stage.name)
    if stage.section:
        assert f"train from step {resumable}" in rerun.stderr, rerun.stderr[-2000:]
        assert logged + 1 - resumable <= train["checkpoint_every"]  # steps done before the kill, less those kept
    assert digest(tmp_path, stage.outputs) == digest(reference, stage.outputs)
