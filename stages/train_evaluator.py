"""`cart train-evaluator`: data/shards → models/evaluator, the reference network for offline FID/KID/IS/PRC."""

from __future__ import annotations

import json
from pathlib import Path

from stages import paths
from stages.common import ParamsOption, load, one_run_at_a_time, progress, reports_errors, summary


@reports_errors
@one_run_at_a_time("train-evaluator")
def command(params: ParamsOption = Path("params.yaml")) -> None:
    """Train the small reference classifier that stands in for Inception when its weights are not available.

    It learns the classes of the train shards; the evaluate stage uses its penultimate features for FID, KID and
    precision/recall, its logits for the Inception Score and class consistency, and names those metrics `*_ref`.
    Writes `models/evaluator/evaluator.safetensors` + `.json` and its val accuracy to `metrics/evaluator.json`.
    When the shards hold 2× references (`data.highres_scale`) and `evaluate.highres_scale` asks for the metrics of
    generation above the trained size (`*_2x`), the same recipe also trains their network,
    `models/evaluator/evaluator_2x`, on the real 2× images.
    """
    from pipeline import atomic
    from pipeline.data.decomposed import split_shards
    from pipeline.data.shards import list_shards
    from pipeline.runtime import dist_from_env
    from pipeline.training.evaluator_training import train_evaluator
    from pipeline.training.train import RunPaths

    p = load(params)
    manifest = json.loads((paths.SHARDS / "manifest.json").read_text())
    # The 2× network serves only evaluate's 2× metrics: trained when they are asked for.
    scale = manifest.get("highres_scale", 0) if p.evaluate.highres_scale > 1 else 0
    train_urls, val_urls = list_shards(paths.SHARDS / "train"), split_shards(paths.SHARDS / "val")
    classes = manifest["classes"]
    paths.EVALUATOR.parent.mkdir(parents=True, exist_ok=True)
    with progress() as bar:
        result = train_evaluator(
            p.evaluator,
            train_urls,
            val_urls,
            len(classes),
            manifest["resolution"],
            paths.EVALUATOR,
            RunPaths(paths.EVALUATOR_CHECKPOINTS, paths.EVALUATOR_LIVE),
            bar,
        )
        if scale > 1:  # the same recipe on the real 2× images: the feature network of the *_2x metrics
            hr = train_evaluator(
                p.evaluator,
                train_urls,
                val_urls,
                len(classes),
                scale * manifest["resolution"],
                paths.EVALUATOR_2X,
                RunPaths(paths.EVALUATOR_2X_CHECKPOINTS, paths.EVALUATOR_2X_LIVE),
                bar,
                highres_count=manifest["splits"]["train"]["highres_count"],
            )
            result |= {f"{k}_{scale}x": v for k, v in hr.items() if k != "chance_accuracy"}
        else:  # dvc.yaml declares its checkpoint and plot folders: they exist, empty
            paths.EVALUATOR_2X_CHECKPOINTS.mkdir(parents=True, exist_ok=True)
            paths.EVALUATOR_2X_LIVE.mkdir(parents=True, exist_ok=True)
    if not dist_from_env().is_main:
        return
    atomic.write_json(paths.EVALUATOR_METRICS, result)
    rows = [("accuracy", f"{result['val_accuracy']:.3f} (chance {result['chance_accuracy']:.3f})")]
    if scale > 1:
        rows.append((f"accuracy at {scale}×", f"{result[f'val_accuracy_{scale}x']:.3f}"))
    summary("train-evaluator (val)", rows)
