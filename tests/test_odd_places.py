"""Odd places a user starts from: a Git repository without a commit, a machine without `python3.11`."""

from __future__ import annotations

import shutil
import subprocess
import sys

from typer.testing import CliRunner

from stages.cli import app
from tests.faults import ROOT


def test_a_training_stage_runs_in_a_git_repository_without_a_commit(workspace):
    # How a user starts a project of their own: `git init`, then the stages, before any commit.
    subprocess.run(["git", "init", "-q"], cwd=workspace, check=True)
    result = CliRunner().invoke(app, ["train-tokenizer"])
    assert result.exit_code == 0, result.output
    assert (workspace / "metrics" / "train_tokenizer" / "tokenizer" / "metrics.json").exists()
    assert not (workspace / ".dvc").exists()  # and nothing was `dvc init`ed into the user's repository


def make_install(tmp_path, pythons: dict[str, str], *args: str, dry_run: bool = True) -> subprocess.CompletedProcess:
    """``make install`` with the project's Makefile on a PATH holding only ``pythons`` (name: ``real``, ``old``
    or ``broken``, like a pyenv shim of a version that is not installed) and grep."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "grep").symlink_to(shutil.which("grep"))
    for name, kind in pythons.items():
        if kind == "real":
            (bin_dir / name).symlink_to(sys.executable)
        else:
            answer = "echo False" if kind == "old" else f"echo 'pyenv: {name}: command not found' >&2; exit 127"
            (bin_dir / name).write_text(f"#!/bin/sh\n{answer}\n")
            (bin_dir / name).chmod(0o755)
    for name in ("pyproject.toml", "constraints.txt", "requirements-fid.txt"):
        (tmp_path / name).touch()
    command = [shutil.which("make"), "-f", str(ROOT / "Makefile"), *(["-n"] if dry_run else []), "install", *args]
    return subprocess.run(command, cwd=tmp_path, env={"PATH": str(bin_dir)}, capture_output=True, text=True)


def test_make_uses_the_first_python_from_3_11_on_and_can_be_told_which(tmp_path):
    found = make_install(tmp_path, {"python3.11": "broken", "python3.12": "real", "python3": "real"})
    assert "python3.12 -m venv .venv" in found.stdout, found.stdout + found.stderr
    (tmp_path / "named").mkdir()
    named = make_install(tmp_path / "named", {}, f"PYTHON={sys.executable}")
    assert f"{sys.executable} -m venv .venv" in named.stdout, named.stdout + named.stderr


def test_make_without_a_python_from_3_11_on_says_what_to_do(tmp_path):
    result = make_install(tmp_path, {"python3": "old", "python3.11": "broken"}, dry_run=False)
    assert result.returncode != 0
    assert "No Python 3.11 or newer found" in result.stderr and "make PYTHON=" in result.stderr
    assert not (tmp_path / ".venv").exists()
