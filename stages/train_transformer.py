"""`cart train-transformer`: data/tokens → models/transformer, the next-detail autoregressive transformer."""

from __future__ import annotations

from pathlib import Path

from stages import paths
from stages.common import ParamsOption, console, load, one_run_at_a_time, progress, reports_errors, summary

PATHS = dict(
    tokens=paths.TOKENS,
    tokenizer=paths.TOKENIZER,
    model=paths.TRANSFORMER,
    checkpoints=paths.TRANSFORMER_CHECKPOINTS,
    live=paths.TRANSFORMER_LIVE,
    metrics=paths.TRANSFORMER_METRICS,
)


@reports_errors
@one_run_at_a_time("train-transformer")
def command(params: ParamsOption = Path("params.yaml")) -> None:
    """Train the class-conditional, block-causal transformer on the token shards (paper §3.3).

    Cross-entropy over all tokens with teacher forcing, class dropout for classifier-free guidance, AdamW with
    warm-up and cosine decay. Loss and accuracy are logged per token map (dvclive, `metrics/train_transformer`).
    Checkpoints every `transformer.train.checkpoint_every` steps: killed and rerun (also under `torchrun`), training
    resumes. Final weights: `models/transformer/transformer.safetensors` + `.json`.
    """
    from pipeline.training.transformer_training import TransformerPaths, train_transformer

    p = load(params)
    with progress() as bar:
        result = train_transformer(p.transformer, TransformerPaths(**PATHS), bar, log=console.print)
    if not result:
        return  # not the main process
    rows = [("val loss", f"{result['val_loss']:.3f} (untrained {result['val_loss_untrained']:.3f})")]
    if "val_acc" in result:  # the softmax head's; the diffusion head has none
        rows.append(("val token accuracy", f"{result['val_acc']:.3f}"))
    for name, loss in result["val_loss_per_map"].items():
        rows.append((f"  {name}", f"loss {loss:.3f} (untrained {result['val_loss_per_map_untrained'][name]:.3f})"))
    summary("train-transformer (val, teacher forcing)", rows)
