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
) -> None:
    """Run a table's rows: every stage of dvc.yaml once per distinct input, several at a time, resuming after a kill.

    A row is the table's params file with a few keys changed (`params/tables.yaml`); rows share every stage whose
    params and inputs agree. Progress lines and, with `--out`, the report go to stdout.
    """
    from pipeline import tables

    if report:
        print(tables.report(json.loads(report.read_text())))
        return
    if table is None:
        console.print("[bold red]error:[/] --table: name the set of rows to run (or give --report)")
        raise typer.Exit(EXIT_INVALID_PARAMS)
    overrides = set_ or []
    try:
        spec, params = tables.table_rows(rows or tables.ROWS, table, overrides, only)
        tables.stages_until(tables.read_stages(tables.REPO / "dvc.yaml"), until)
    except KeyError as err:  # an override of a key the params file lacks would otherwise run an unchanged row
        console.print(f"[bold red]error:[/] {err.args[0]}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID_PARAMS) from None
    tables.run_table(
        table,
        spec,
        params,
        overrides,
        root,
        jobs,
        deadline,
        fail_fast,
        out,
        lambda line: print(line, flush=True),
        until,
    )
