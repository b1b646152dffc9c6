"""`cart experiments`: the paper's tables from `dvc exp show` — FID (Inception first, FID_ref second) and cost per
setting, seeds averaged, a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import ParamsOption, console, reports_errors, summary


@reports_errors
def command(
    params: ParamsOption = Path("params.yaml"),
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
    """Collect every finished `dvc exp` experiment; print one row per setting with FID and cost; plot FID by order.

    Each row leads with the field's FID (Inception-v3, against the val images: its ceiling, its floor, and how many
    samples against how many reference images), then FID_ref; a run recorded without the Inception FID keeps its
    FID_ref and says so. Runs are averaged (mean ± std) only when every parameter but the seeds is equal; each row
    names the parameters that set it apart. Run experiments first, e.g. `dvc exp run -S decompose.order=0` (VAR) …
    `-S decompose.order=4`, and `-S transformer.train.seed=1 -S tokenizer.train.seed=1` for more seeds.
    """
    import dvc.api
    import yaml

    from pipeline.evaluation.experiments import experiment_points, fid_order_figure, flatten, group_runs

    names = list(flatten(yaml.safe_load(params.read_text()) or {}))
    points = experiment_points(dvc.api.exp_show(num=commits), names, _params_of_run)
    if not points:
        raise ValueError("no experiment has both decompose.order and an FID: run `dvc exp run` (see docs/results.md)")
    table = group_runs(points)

    summary(
        "Quality and cost per setting (the field's FID first, FID_ref second; order 0 = VAR)",
        [(r["label"], _describe(r)) for r in table],
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fid_order_figure(table, out)
    console.print(f"wrote {out}")


def _params_of_run(row: dict) -> dict | None:
    """The run's own params.yaml, flattened: from its commit (experiments are commits), or the workspace file.
    None when it cannot be read (the row's values are used then)."""
    import subprocess

    import yaml

    from pipeline.evaluation.experiments import flatten

    rev = row.get("rev")
    try:
        if rev in (None, "workspace"):
            text = Path("params.yaml").read_text()
        else:
            text = subprocess.run(
                ["git", "show", f"{rev}:params.yaml"], capture_output=True, text=True, check=True
            ).stdout
        return flatten(yaml.safe_load(text) or {})
    except (OSError, subprocess.CalledProcessError, yaml.YAMLError):
        return None


def _describe(row: dict) -> str:
    """The field's FID first (with what it was measured on), then FID_ref; a row without it says why."""
    from pipeline.evaluation.experiments import cell

    runs = f"{row['runs']} run{'s' if row['runs'] > 1 else ''}"
    measured_on = f" ({row['fid_set']})" if row["fid_set"] else ""
    inception = (
        f"FID (Inception) {cell(row, 'fid_inception', 2)} (ceiling {cell(row, 'reconstruction_fid_inception', 2)}, "
        f"untrained {cell(row, 'untrained_fid_inception', 2)}){measured_on}"
    )
    if row["fid_inception_runs"] == 0:
        inception = f"{row['inception_note']}{measured_on}"
    elif row["inception_note"]:  # some of the row's runs have it, some not
        inception += f" [{row['inception_note']}]"
    return (
        f"{inception}; FID_ref {cell(row, 'fid_ref', 2)} (ceiling {cell(row, 'reconstruction_fid_ref', 2)}, "
        f"untrained {cell(row, 'untrained_fid_ref', 2)}), class consistency {cell(row, 'class_consistency_ref', 3)}, "
        f"precision {cell(row, 'precision_ref', 3)}, recall {cell(row, 'recall_ref', 3)}; {row['tokens']:.0f} tokens "
        f"in {row['maps']:.0f} maps, {row['train_flops_per_image'] / 1e9:.3f} GFLOP/image to train, "
        f"{row['sampling_images_per_s']:.1f} images/s sampled ({runs})"
    )
