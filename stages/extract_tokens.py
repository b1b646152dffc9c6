"""`cart extract-tokens`: data/decomposed → data/tokens, every image as its token maps (Algorithm 1)."""

from __future__ import annotations

from pathlib import Path

from stages import paths
from stages.common import ParamsOption, load, one_run_at_a_time, progress, reports_errors, summary


@reports_errors
@one_run_at_a_time("extract-tokens")
def command(params: ParamsOption = Path("params.yaml")) -> None:
    """Tokenize every decomposed image with the trained tokenizer: `data/tokens/{train,val}` shards.

    Each sample holds `tokens.npy` (int16, all token maps concatenated in generation order: base scales, then
    the detail maps of D_n … D_1) and `cls`; `manifest.json` records the layout (size and kind of every map).
    Killed and rerun, finished shards are kept. Under `torchrun --nproc_per_node=N` each process takes its share of
    the shards (one GPU each) and the output is the same as one process writes.
    """
    from pipeline.data.tokens import extract_tokens

    cfg = load(params).tokens
    with progress() as bar:
        manifest = extract_tokens(paths.TOKENIZER, paths.DECOMPOSED, paths.TOKENS, cfg, bar)
    if manifest is None:
        return  # a torchrun rank other than 0: rank 0 wrote the manifest and reports
    maps = manifest["layout"]["maps"]
    base = [f"{m['h']}×{m['w']}" for m in maps if m["kind"] == "base"]
    detail = [f"D{m['level']} {m['h']}×{m['w']}" for m in maps if m["kind"] == "detail"]
    summary(
        f"extract-tokens → {paths.TOKENS}",
        [
            ("images", ", ".join(f"{s} {v['count']}" for s, v in manifest["splits"].items())),
            ("tokens per image", manifest["layout"]["num_tokens"]),
            ("base maps", " ".join(base)),
            ("detail maps", " ".join(detail) or "none (order 0: VAR)"),
        ],
    )
