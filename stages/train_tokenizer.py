"""`cart train-tokenizer`: data/decomposed → models/tokenizer, the base–detail multi-scale VQ-VAE."""

from __future__ import annotations

from pathlib import Path

from stages import paths
from stages.common import ParamsOption, console, load, one_run_at_a_time, progress, reports_errors, summary

PATHS = dict(
    data=paths.DECOMPOSED,
    shards=paths.SHARDS,
    models=paths.TOKENIZER.parent,
    checkpoints=paths.TOKENIZER_CHECKPOINTS,
    live=paths.TOKENIZER_LIVE,
    metrics=paths.TOKENIZER_METRICS,
    reports=paths.TOKENIZER_REPORTS,
)


@reports_errors
@one_run_at_a_time("train-tokenizer")
def command(params: ParamsOption = Path("params.yaml")) -> None:
    """Train the tokenizer (paper §3.2, eq. 6) on the decomposed shards, then measure it on val.

    With `tokenizer.compare`, a single-scale VQ-VAE and VAR's multi-scale VQ-VAE (order 0) are trained with the
    same budget for the Figure-7 comparison. Checkpoints every `tokenizer.train.checkpoint_every` steps: killed and
    rerun (also under `torchrun`), training resumes. Final weights: `models/tokenizer/tokenizer.safetensors` + `.json`.
    With `tokenizer.rfid.every`, the rFID (Inception FID of the val reconstructions) is measured while training,
    training stops after `tokenizer.rfid.patience` measurements without improvement, and the best weights are saved.
    """
    from pipeline.training.tokenizer_stage import TokenizerPaths, train_tokenizers

    p = load(params)
    with progress() as bar:
        results = train_tokenizers(
            p.tokenizer, p.decompose.order, p.data.resolution, TokenizerPaths(**PATHS), bar, log=console.print,
            inception_weights=p.evaluate.inception_weights,
        )  # fmt: skip
    rows = []
    for name, r in results.items():
        lpips = f", LPIPS {r['lpips']:.3f}" if "lpips" in r else ""
        health = (
            f"latent RMS {r['latent_rms']:.3f}"
            if "latent_rms" in r
            else f"codebook used {100 * r['codebook_used']:.0f}%, perplexity {r['perplexity']:.0f}"
        )
        rfid = (
            f", rFID {r['rfid_inception']:.2f} (step {r['rfid_step']} of {r['steps_trained']}, {r['rfid_images']} "
            f"images vs {r['rfid_reference']})"
            if "rfid_inception" in r
            else ""
        )
        rows.append(
            (f"{name} (order {r['order']}, {r['maps']} maps)", f"PSNR {r['psnr']:.2f} dB{lpips}, {health}{rfid}")
        )
    if rows:
        summary("train-tokenizer (val)", rows)
