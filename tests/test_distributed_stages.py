"""decompose and extract_tokens under torchrun: each rank its share of the shards, the output of one process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stages.cli import app
from tests.workspace import add_tokens

HERE = Path(__file__).resolve().parent


def torchrun(workspace: Path, stage: str, record: Path, *kill: int) -> subprocess.CompletedProcess:
    """``cart <stage>`` on 2 gloo processes (tests/ddp_stage_check.py records each rank's shards; ``kill`` =
    (rank, shard) makes that rank die by SIGKILL as it starts its shard-th shard)."""
    record.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(HERE / "ddp_stage_check.py"), stage, str(record), *map(str, kill)]
    # One thread per rank, as torchrun sets it: two ranks share this machine's cores.
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=workspace, env=env, capture_output=True, text=True, timeout=300)


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def computed(record: Path) -> dict[int, list[str]]:
    """The first key of every shard each rank started, by rank."""
    return {
        rank: (record / f"rank{rank}.txt").read_text().split()
        for rank in (0, 1)
        if (record / f"rank{rank}.txt").exists()
    }


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "out"), [("decompose", "data/decomposed"), ("extract-tokens", "data/tokens")])
def test_two_ranks_write_what_one_process_writes_and_a_killed_rank_resumes_from_its_shards(workspace, stage, out):
    add_tokens(workspace)
    result = CliRunner().invoke(app, [stage])  # one process: the reference
    assert result.exit_code == 0, result.output
    one_process = tree_bytes(workspace / out)
    shutil.rmtree(workspace / out)

    killed = torchrun(workspace, stage, workspace / "killed", 1, 2)  # rank 1 dies starting its second shard
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr
    assert not (workspace / out).exists()
    started = computed(workspace / "killed")
    assert started[0] and started[1]  # each rank took shards of its own
    survived = started[1][0]  # rank 1's first shard, finished before the kill

    rerun = torchrun(workspace, stage, workspace / "rerun")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    redone = computed(workspace / "rerun")
    assert survived not in sum(redone.values(), [])  # kept, not computed again
    assert tree_bytes(workspace / out) == one_process
    assert not (workspace / out).with_name(f".{Path(out).name}.partial").exists()
