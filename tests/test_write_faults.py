"""A full disk or an unwritable output at a seeded random write of each stage: a clear message, exit 1, and the
stage's previous outputs exactly as they were."""

from __future__ import annotations

import errno
import os
import random
import shutil

import pytest
from typer.testing import CliRunner

from stages.cli import app
from tests.faults import STAGES, Writes, digest


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES], ids=["disk full", "unwritable"])
@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_a_failed_write_stops_the_stage_saying_why_and_the_previous_outputs_stay(
    stage, error, finished_chain, tmp_path, monkeypatch
):
    shutil.copytree(finished_chain.root, tmp_path, dirs_exist_ok=True)
    # Without checkpoints, as the finished run started, so that the rerun writes what that run wrote.
    shutil.rmtree(tmp_path / "models" / "checkpoints", ignore_errors=True)
    previous = digest(tmp_path, stage.outputs)
    failing = random.Random(f"{error}/{stage.name}").choice(finished_chain.writes[stage.name])
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patch:
        Writes(patch, tmp_path, fail=failing, error=error)
        result = CliRunner().invoke(app, [stage.name])
    message = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert f"{failing}: {os.strerror(error)}" in message, message
    assert "Traceback" not in result.output
    assert digest(tmp_path, stage.outputs) == previous


def test_previews_that_cannot_be_written_leave_the_previous_previews(finished_chain, tmp_path, monkeypatch):
    # The last thing decompose writes, after the decomposed shards: it once deleted the old previews first.
    shutil.copytree(finished_chain.root, tmp_path, dirs_exist_ok=True)
    previous = digest(tmp_path, ["reports/decompose"])
    failing = next(p for p in finished_chain.writes["decompose"] if p.startswith("reports/"))
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as patch:
        Writes(patch, tmp_path, fail=failing, error=errno.ENOSPC)
        assert CliRunner().invoke(app, ["decompose"]).exit_code == 1
    assert digest(tmp_path, ["reports/decompose"]) == previous


def test_a_resumable_output_never_carries_the_half_written_part_of_a_killed_process(tmp_path):
    """A rank killed mid-write leaves ``.<part>.tmp-<pid>`` in the work directory; the finished output has only
    the parts, whichever process finishes it."""
    from pipeline.atomic import ResumableDir, write_bytes

    work = ResumableDir(tmp_path / "out", "inputs-1")
    write_bytes(work.path("shard-000000.tar"), b"done")
    (work.path(".shard-000001.tar.tmp-4242.tar")).write_bytes(b"half")  # what a SIGKILL leaves
    work = ResumableDir(tmp_path / "out", "inputs-1")  # the rerun keeps finished parts
    write_bytes(work.path("shard-000001.tar"), b"done too")
    out = work.finish()
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
