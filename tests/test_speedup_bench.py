"""bench/speedup.py times two trees alternately, each step in a subprocess importing ``pipeline`` from its tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_tree_against_itself_gives_one_row_with_both_times_and_a_speed_up():
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "speedup.py"), "--base", str(REPO), "--cases", "demo"]
        + ["--rounds", "2", "--steps", "1", "--warmup", "0", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("| demo |")]
    cells = [cell.strip() for cell in row.split("|")[1:-1]]
    old, new = float(cells[1]), float(cells[2])
    assert old > 0 and new > 0 and cells[3].endswith(")") and "×" in cells[3]
    assert cells[5].endswith("%")  # the CPU MFU of bench/transformer.py came through


def test_a_tree_without_the_code_is_refused_not_silently_replaced_by_the_installed_one(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "speedup.py"), "--base", str(tmp_path), "--cases", "demo"]
        + ["--rounds", "1", "--steps", "1", "--warmup", "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0 and f"{tmp_path} holds no pipeline/ package" in done.stderr
