"""The SIGKILL-resume check shared by the training stages: kill mid-run, rerun, compare with a run never killed."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.faults import kill_when, newest_checkpoint, run_stage


def assert_killed_run_resumes_to_the_uninterrupted_result(
    workspace: Path,
    stage: str,
    checkpoints: Path,
    kill_after: int,
    weights: str,
    inputs: list[str],
    fresh: Path,
    command: list[str] | None = None,
    timeout: float = 120,
) -> None:
    """``cart <stage>`` killed once checkpoint ``kill_after`` exists, rerun, ends with the weights of a clean run.

    ``inputs`` are the workspace paths the stage reads (copied for the clean run); ``weights`` its output file;
    ``command`` runs the stage instead of ``cart <stage>``; ``timeout``: seconds to wait for checkpoint
    ``kill_after``.
    """
    ready = lambda: newest_checkpoint(checkpoints) >= kill_after  # noqa: E731
    killed = kill_when(workspace, stage, ready, timeout=timeout, command=command)
    assert killed, "training finished before it could be killed"
    killed_at = newest_checkpoint(checkpoints)
    assert killed_at >= kill_after
    resumed = run_stage(workspace, stage, command=command)
    assert f"train from step {killed_at}" in resumed.stderr

    for part in inputs:
        shutil.copytree(workspace / part, fresh / part)
    shutil.copy(workspace / "params.yaml", fresh / "params.yaml")
    run_stage(fresh, stage, command=command)
    a, b = load_file(str(workspace / weights)), load_file(str(fresh / weights))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), "resumed training diverged from the uninterrupted run"
