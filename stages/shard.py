"""`cart shard`: images (demo photographs or an ImageFolder tree) → data/shards/{train,val} WebDataset shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages import paths
from stages.common import ParamsOption, console, load, one_run_at_a_time, progress, reports_errors, summary


@reports_errors
@one_run_at_a_time("shard")
def command(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[
        Path, typer.Option(help="Output directory (replaced atomically when the stage succeeds).")
    ] = paths.SHARDS,
) -> None:
    """Decode, convert to RGB, resize and centre-crop every image of `data.source` into WebDataset shards.

    Bad files (undecodable, empty, oversized, too small) are skipped and listed in manifest.json with their
    reason; they never stop the stage. A missing or empty source does (exit 1); invalid params exit 2.
    """
    from pipeline.data.ingest import build_shards

    cfg = load(params).data
    with progress() as bar:
        manifest = build_shards(cfg, out, bar)
    rows = [("source", cfg.source), ("resolution", cfg.resolution), ("classes", len(manifest["classes"]))]
    for split, info in manifest["splits"].items():
        rows.append((split, f"{info['count']} images in {info['shards']} shards"))
    rows.append(("skipped", manifest["skipped_count"]))
    summary(f"shard → {out}", rows)
    for record in manifest["skipped"][:10]:
        console.print(f"  skipped {record['source']}: {record['reason']}", soft_wrap=True)
    if manifest["skipped_count"] > 10:
        console.print(f"  … {manifest['skipped_count'] - 10} more in {out / 'manifest.json'}")
    console.print(f"kept {manifest['kept']}, skipped {manifest['skipped_count']}")
