"""A truncated or corrupt shard stops the stage that reads it with a message naming the shard (exit 1)."""

from __future__ import annotations

import random
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stages.cli import app
from tests.workspace import add_tokens


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:
    """Every input a reading stage needs: shards, decompositions, tokens, a transformer and a reference net."""
    from tests.workspace import write_params

    root = tmp_path_factory.mktemp("trained")
    shutil.copytree(tiny_data / "data", root / "data")
    write_params(root)
    add_tokens(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for stage in ("train-transformer", "train-evaluator"):
            assert CliRunner().invoke(app, [stage]).exit_code == 0
    return root


def truncate(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 2 // 3])


def garble_a_sample(shard: Path) -> None:
    """Overwrite the payload of the second sample's largest field with noise: the tar itself stays valid."""
    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith((".png", ".npy"))]
    member = members[1]
    data = bytearray(shard.read_bytes())
    data[member.offset_data : member.offset_data + member.size] = random.Random(0).randbytes(member.size)
    shard.write_bytes(bytes(data))


def garble_a_header(shard: Path) -> None:
    """Overwrite the tar header of the second sample's first field: tarfile alone would end the archive there."""
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    second = next(m for m in members if m.name.split(".")[0] != members[0].name.split(".")[0])
    data = bytearray(shard.read_bytes())
    data[second.offset : second.offset + tarfile.BLOCKSIZE] = random.Random(0).randbytes(tarfile.BLOCKSIZE)
    shard.write_bytes(bytes(data))


READERS = [
    ("decompose", "data/shards/train"),
    ("train-evaluator", "data/shards/train"),
    ("evaluate", "data/shards/val"),
    ("train-tokenizer", "data/decomposed/train"),
    ("extract-tokens", "data/decomposed/train"),
    ("train-transformer", "data/tokens/train"),
    ("evaluate", "data/tokens/val"),
]


@pytest.mark.parametrize("damage", [truncate, garble_a_sample, garble_a_header], ids=["truncated", "sample", "header"])
@pytest.mark.parametrize(("stage", "split"), READERS, ids=[f"{s} reads {d}" for s, d in READERS])
def test_the_reading_stage_stops_naming_the_shard(trained, tmp_path, monkeypatch, stage, split, damage):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    # Every shard of the split: the training loaders draw shards at random, and must meet a bad one.
    for shard in (tmp_path / split).glob("shard-*.tar"):
        damage(shard)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [stage])
    message = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert re.search(rf"{split}/shard-\d{{6}}\.tar", message), message
    assert "Traceback" not in result.output
