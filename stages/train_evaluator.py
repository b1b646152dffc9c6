"""`cart train-evaluator`: data/shards → models/evaluator, the reference network for offline FID/KID/IS/PRC."""

from __future__ import annotations

import json
from pathlib import Path

from stages.common import ParamsOption, load, one_run_at_a_time, progress, reports_errors, summary

SHARDS = Path("data/shards")
MODEL = Path("models/evaluator/evaluator")
CHECKPOINTS, LIVE = Path("models/checkpoints/evaluator"), Path("metrics/train_evaluator")
METRICS = Path("metrics/evaluator.json")


@reports_errors
@one_run_at_a_time("train-evaluator")
def command(params: ParamsOption = Path("params.yaml")) -> None:
    """Train the small reference classifier that stands in for Inception when its weights are not available.

    It learns the classes of the train shards; the evaluate stage uses its penultimate features for FID, KID and
    precision/recall, its logits for the Inception Score and class consistency, and names those metrics `*_ref`.
    Writes `models/evaluator/evaluator.safetensors` + `.json` and its val accuracy to `metrics/evaluator.json`.
    """
    from pipeline import atomic
    from pipeline.decomposed import split_shards
    from pipeline.evaluator import train_evaluator
    from pipeline.runtime import dist_from_env
    from pipeline.shards import list_shards
    from pipeline.train import RunPaths

    p = load(params)
    manifest = json.loads((SHARDS / "manifest.json").read_text())
    MODEL.parent.mkdir(parents=True, exist_ok=True)
    with progress() as bar:
        result = train_evaluator(
            p.evaluator,
            list_shards(SHARDS / "train"),
            split_shards(SHARDS / "val"),
            len(manifest["classes"]),
            manifest["resolution"],
            MODEL,
            RunPaths(CHECKPOINTS, LIVE),
            bar,
        )
    if not dist_from_env().is_main:
        return
    atomic.write_json(METRICS, result)
    summary(
        "train-evaluator (val)",
        [("accuracy", f"{result['val_accuracy']:.3f} (chance {result['chance_accuracy']:.3f})")],
    )
