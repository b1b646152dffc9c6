"""bench/sampling.py times a trained run's sampling as `evaluate` samples: one row per run (softmax head)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.faults import stage_env

REPO = Path(__file__).resolve().parent.parent


def test_a_finished_run_gets_one_row_with_its_order_tokens_and_a_positive_rate(finished_chain):
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "sampling.py"),
            "--run",
            str(finished_chain.root),
            "--batch",
            "4",
            "--repeats",
            "1",
        ],
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = [line for line in done.stdout.splitlines() if line.startswith("| order")]
    assert len(rows) == 1, done.stdout
    name, tokens, steps, ms, rate = (cell.strip() for cell in rows[0].strip("|").split("|"))
    assert name.startswith("order ") and int(tokens) > 0 and steps == "–"
    assert float(ms) > 0 and float(rate) > 0
