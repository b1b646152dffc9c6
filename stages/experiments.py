"""`cart experiments`: the Table-4 ablation from `dvc exp show` (FID against decomposition order), with a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import console, reports_errors, summary


@reports_errors
def command(
    out: Annotated[Path, typer.Option(help="PNG of FID against decomposition order.")] = Path(
        "reports/fid_vs_order.png"
    ),
    commits: Annotated[
        int,
        typer.Option(
            min=1,
            help="Include experiments based on the last N commits (HEAD and the N−1 before it). Experiments "
            "belong to the commit they ran from: after a new commit, use 2 or more to keep them.",
        ),
    ] = 1,
) -> None:
    """Collect every `dvc exp` experiment's `decompose.order` and metrics; print Table 4 and plot FID by order.

    Run experiments first, e.g. `dvc exp run -S decompose.order=0` (VAR) … `-S decompose.order=4`, and
    `-S transformer.train.seed=1` for more seeds: orders with several runs show mean ± std.
    """
    import dvc.api

    from pipeline.experiments import by_order, experiment_points, fid_order_figure

    rows = dvc.api.exp_show(num=commits)
    points = experiment_points(rows)
    if not points:
        raise ValueError("no experiment has both decompose.order and fid_ref: run `dvc exp run` (see README)")
    table = by_order(points)

    def cell(row, key, digits):
        std = f" ± {row[key + '_std']:.{digits}f}" if row["runs"] > 1 else ""
        return f"{row[key]:.{digits}f}{std}"

    summary(
        "FID against decomposition order (reference network; 0 = VAR)",
        [
            (
                f"order {order}",
                f"FID {cell(row, 'fid_ref', 2)}, class consistency {cell(row, 'class_consistency_ref', 3)}, "
                f"precision {cell(row, 'precision_ref', 3)}, recall {cell(row, 'recall_ref', 3)} "
                f"({row['runs']} run{'s' if row['runs'] > 1 else ''})",
            )
            for order, row in table.items()
        ],
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fid_order_figure(points, out)
    console.print(f"wrote {out}")
