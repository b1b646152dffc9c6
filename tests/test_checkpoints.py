"""Checkpoints you can trust: each experiment resumes from its own, damaged ones are detected, one run at a time."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from pipeline.training.checkpoints import resume, save_checkpoint, tidy_checkpoints
from stages.cli import app
from tests.faults import checkpoint_steps, kill_when, run_stage, stage_env
from tests.workspace import write_params

TOKENIZER_WEIGHTS = "models/tokenizer/tokenizer.safetensors"


@pytest.mark.slow
def test_an_experiment_killed_after_a_longer_one_resumes_from_its_own_last_checkpoint(workspace):
    # docs/reliability.md: experiment A runs to its end, then B (other params, so another fingerprint) is killed
    # before reaching A's step count, and rerun.
    root = workspace / "models" / "checkpoints" / "tokenizer" / "tokenizer"
    experiment_a = {"tokenizer": {"train": {"steps": 12, "checkpoint_every": 4}}}
    experiment_b = {"tokenizer": {"train": {"steps": 16, "checkpoint_every": 4, "seed": 1}}}
    write_params(workspace, experiment_a)
    run_stage(workspace, "train-tokenizer")
    weights_a = (workspace / TOKENIZER_WEIGHTS).read_bytes()

    write_params(workspace, experiment_b)
    started = time.time()
    assert kill_when(workspace, "train-tokenizer", lambda: max(checkpoint_steps(root, since=started), default=0) >= 4)
    killed_at = max(checkpoint_steps(root, since=started))
    resumed = run_stage(workspace, "train-tokenizer")
    assert f"train from step {killed_at}" in resumed.stderr, resumed.stderr[-2000:]

    # B never touched A's checkpoints: A rerun is not retrained and ends with the weights it had.
    write_params(workspace, experiment_a)
    again = run_stage(workspace, "train-tokenizer")
    assert "train from step 12" in again.stderr, again.stderr[-2000:]
    assert (workspace / TOKENIZER_WEIGHTS).read_bytes() == weights_a


def net_and_optimizer(seed: int = 0, width: int = 2) -> tuple[dict, dict]:
    """A model and an AdamW that has taken one step (so it has moments to checkpoint)."""
    torch.manual_seed(seed)
    net = nn.Linear(3, width)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {"net": net}, {"adamw": optimizer}


def weights(modules: dict) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in modules["net"].state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def save_steps(root: Path, fingerprint: str, steps: list[int], keep: int = 2) -> dict[int, dict]:
    """Checkpoints of one run at ``steps`` (the weights change between them); the weights saved at each step."""
    modules, optimizers = net_and_optimizer()
    saved = {}
    for step in steps:
        with torch.no_grad():
            modules["net"].weight.add_(1.0)
        save_checkpoint(root, step, fingerprint, modules, optimizers, keep)
        saved[step] = weights(modules)
    return saved


def test_a_run_prunes_only_its_own_checkpoints_and_resumes_from_its_newest(tmp_path):
    saved_a = save_steps(tmp_path, "experiment-a", [400, 500])
    saved_b = save_steps(tmp_path, "experiment-b", [100, 200, 300])
    # A run's directory holds its kept checkpoints and nothing else.
    assert sorted(p.name for p in (tmp_path / "experiment-a").iterdir()) == ["step-00000400", "step-00000500"]
    assert sorted(p.name for p in (tmp_path / "experiment-b").iterdir()) == ["step-00000200", "step-00000300"]
    for run, step, saved in (("experiment-a", 500, saved_a), ("experiment-b", 300, saved_b)):
        modules, optimizers = net_and_optimizer(seed=1)
        assert resume(tmp_path, run, modules, optimizers, restore_rng=False) == step
        assert same(weights(modules), saved[step])


def test_a_run_starting_says_that_other_experiments_checkpoints_are_kept_there(tmp_path, caplog):
    save_steps(tmp_path, "experiment-a", [400])
    caplog.set_level(logging.INFO)
    tidy_checkpoints(tmp_path, "experiment-b")
    assert "checkpoints of 1 other run(s)" in caplog.text and "they are kept" in caplog.text
    assert (tmp_path / "experiment-a" / "step-00000400").exists()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garble(path: Path) -> None:  # same size, so only reading the header can tell
    path.write_bytes(b"\xff" * path.stat().st_size)


DAMAGE = {
    "truncated model.safetensors": ("model.safetensors", truncate),
    "garbled optimizer.safetensors": ("optimizer.safetensors", garble),
    "missing rng.safetensors": ("rng.safetensors", Path.unlink),
    "state.json that is not JSON": ("state.json", lambda p: p.write_text('{"step": 8, "fingerp')),
    "missing state.json": ("state.json", Path.unlink),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_named_in_a_warning_and_the_one_before_is_used(tmp_path, caplog, damage):
    saved = save_steps(tmp_path, "run", [4, 8])
    name, spoil = DAMAGE[damage]
    spoil(tmp_path / "run" / "step-00000008" / name)
    modules, optimizers = net_and_optimizer(seed=1)
    assert resume(tmp_path, "run", modules, optimizers, restore_rng=True) == 4
    assert same(weights(modules), saved[4])
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(tmp_path / "run" / "step-00000008") in warning and name in warning and "trying step-00000004" in warning


def test_with_every_checkpoint_damaged_the_run_starts_from_scratch_saying_so_and_untouched(tmp_path, caplog):
    save_steps(tmp_path, "run", [4, 8])
    for step in ("step-00000004", "step-00000008"):
        truncate(tmp_path / "run" / step / "model.safetensors")
    modules, optimizers = net_and_optimizer(seed=1)
    fresh = weights(modules)
    assert resume(tmp_path, "run", modules, optimizers, restore_rng=True) == 0
    assert same(weights(modules), fresh)
    assert "training starts from step 0" in caplog.records[-1].getMessage()


def test_the_stage_names_a_damaged_checkpoint_and_resumes_from_the_one_before(workspace):
    assert CliRunner().invoke(app, ["train-tokenizer"]).exit_code == 0  # 12 steps: step-8 and step-12 kept
    (newest,) = Path("models/checkpoints/tokenizer/tokenizer").glob("*/step-00000012")
    truncate(newest / "model.safetensors")
    result = CliRunner().invoke(app, ["train-tokenizer"])
    assert result.exit_code == 0, result.output
    message = " ".join(result.output.split())
    assert f"warning: checkpoint {newest} cannot be used: model.safetensors has" in message
    assert "trying step-00000008" in message and "train from step 8" in message


def test_a_checkpoint_that_does_not_fit_the_model_changes_nothing(tmp_path, caplog):
    # Same fingerprint, other code: the model grew since the checkpoint was written.
    save_steps(tmp_path, "run", [4])
    modules, optimizers = net_and_optimizer(seed=1, width=5)
    fresh = weights(modules)
    moments = {k: v.clone() for k, v in optimizers["adamw"].state_dict()["state"][0].items()}
    assert resume(tmp_path, "run", modules, optimizers, restore_rng=True) == 0
    assert same(weights(modules), fresh)
    assert same({k: v for k, v in optimizers["adamw"].state_dict()["state"][0].items()}, moments)
    assert "does not fit the model" in caplog.records[-1].getMessage()


def test_leftovers_of_killed_runs_are_cleared_and_a_checkpoint_moved_aside_is_put_back(tmp_path):
    saved = save_steps(tmp_path, "run", [4, 8])
    dead = dead_pid()
    half_written = tmp_path / "run" / f".step-00000012.tmp-{dead}"
    shutil.copytree(tmp_path / "run" / "step-00000008", half_written)
    os.replace(tmp_path / "run" / "step-00000008", tmp_path / "run" / f".step-00000008.old-{dead}")
    tidy_checkpoints(tmp_path, "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["step-00000004", "step-00000008"]
    modules, optimizers = net_and_optimizer(seed=1)
    assert resume(tmp_path, "run", modules, optimizers, restore_rng=False) == 8
    assert same(weights(modules), saved[8])


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_a_second_run_of_a_stage_stops_at_start_and_a_killed_runs_lock_does_not_block(workspace):
    lock = workspace / ".cart" / "train-tokenizer.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock)], env=stage_env(), stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    second = CliRunner().invoke(app, ["train-tokenizer"])
    assert second.exit_code == 1
    message = " ".join(second.output.split())
    assert "cart train-tokenizer is already running in this workspace" in message and f"pid {holder.pid}" in message
    assert not (workspace / "models" / "checkpoints").exists()

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert f"pid {holder.pid}" in lock.read_text()  # the dead run's lock file is still there ...
    assert CliRunner().invoke(app, ["train-tokenizer"]).exit_code == 0  # ... and does not block


HOLD_LOCK = """
import sys, time
from pipeline.atomic import exclusive
with exclusive(sys.argv[1], "holder"):
    print("held", flush=True)
    time.sleep(120)
"""
