"""bench/reconstructions.py measures what a trained tokenizer keeps: one row per run, a PSNR per prefix, a figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.faults import stage_env

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from reconstructions import saturation  # noqa: E402


def test_saturation_is_zero_for_grey_and_one_for_a_pure_primary():
    grey = torch.full((2, 3, 4, 4), 0.5)
    red = torch.zeros(2, 3, 4, 4)
    red[:, 0] = 1
    assert saturation(grey) == 0 and saturation(red) == 1


def test_a_finished_run_gets_one_row_with_a_psnr_per_map_and_a_figure(finished_chain, tmp_path):
    figure = tmp_path / "reconstructions.png"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "reconstructions.py"),
            "--run",
            str(finished_chain.root),
            "--images",
            "4",
            "--figure",
            str(figure),
        ],
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = [line for line in done.stdout.splitlines() if line.startswith(f"| {finished_chain.root.name}")]
    assert len(rows) == 1, done.stdout
    _, order, groups, full, sat, autoencoder, per_prefix = (cell.strip() for cell in rows[0].strip("|").split("|"))
    saved = json.loads((finished_chain.root / "models" / "tokenizer" / "tokenizer.json").read_text())
    prefixes = [float(p) for p in per_prefix.split(" / ")]
    assert len(prefixes) == len(saved["layout"]["maps"]) and int(order) == saved["order"]
    assert abs(float(full.removesuffix(" dB")) - prefixes[-1]) < 0.05  # all maps: the full reconstruction
    assert int(groups) == saved["model"]["min_group_channels"] and 0 <= float(sat) <= 1
    assert figure.stat().st_size > 0
