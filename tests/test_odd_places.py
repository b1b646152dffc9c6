"""Odd places a user starts from: a Git repository without a commit, a machine without `python3.11`."""

from __future__ import annotations

import subprocess

from typer.testing import CliRunner

from stages.cli import app


def test_a_training_stage_runs_in_a_git_repository_without_a_commit(workspace):
    # How a user starts a project of their own: `git init`, then the stages, before any commit.
    subprocess.run(["git", "init", "-q"], cwd=workspace, check=True)
    result = CliRunner().invoke(app, ["train-tokenizer"])
    assert result.exit_code == 0, result.output
    assert (workspace / "metrics" / "train_tokenizer" / "tokenizer" / "metrics.json").exists()
    assert not (workspace / ".dvc").exists()  # and nothing was `dvc init`ed into the user's repository
