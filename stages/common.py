"""What every stage command shares: loading params (exit 2 when invalid), errors as messages, Rich output."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

console = Console(stderr=True, highlight=False)

ParamsOption = Annotated[
    Path,
    typer.Option("--params", help="Parameter file (YAML) to read; every stage reads only its own sections."),
]

EXIT_INVALID_PARAMS = 2
EXIT_FAILED = 1

F = TypeVar("F", bound=Callable[..., Any])


def load(params_path: Path):
    """The validated params, or exit 2 with one line per problem before anything is written."""
    from pipeline.config import ConfigError
    from pipeline.params import load_params

    try:
        return load_params(params_path)
    except ConfigError as err:
        console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID_PARAMS) from None


class _ConsoleLog(logging.Handler):
    """The library's warnings and notes (``logging`` under ``pipeline``), printed like the stages' own lines."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "[bold yellow]warning:[/] " if record.levelno >= logging.WARNING else "[dim]note:[/] "
        console.print(prefix + escape(record.getMessage()), soft_wrap=True)


logging.getLogger("pipeline").addHandler(_ConsoleLog())
logging.getLogger("pipeline").setLevel(logging.INFO)


LOCKS = Path(".cart")


def one_run_at_a_time(stage: str) -> Callable[[F], F]:
    """A second run of ``stage`` in the same workspace stops at start (exit 1) instead of mixing its writes in.

    The lock is ``.cart/<stage>.lock`` in the working directory. Under torchrun only rank 0 takes it: the ranks
    of one job are one run.
    """

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            from pipeline.atomic import exclusive
            from pipeline.runtime import dist_from_env

            if not dist_from_env().is_main:
                return func(*args, **kwargs)
            with exclusive(LOCKS / f"{stage}.lock", f"cart {stage}"):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def reports_errors(func: F) -> F:
    """Turn the pipeline's expected failures into a message: exit 2 for bad parameters or a bad file the user handed
    in (``InvalidInput``), exit 1 for the rest (bad data, a missing upstream output)."""
    from pipeline.config import InvalidInput

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except InvalidInput as err:
            console.print(f"[bold red]error:[/] {err}", soft_wrap=True)
            raise typer.Exit(EXIT_INVALID_PARAMS) from None
        except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
            console.print(f"[bold red]error:[/] {_describe(err)}", soft_wrap=True)
            raise typer.Exit(EXIT_FAILED) from None

    return wrapper  # type: ignore[return-value]


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _describe(err: Exception) -> str:
    """The error's message; for a failed system call on a file, the file first, and what to do about a full disk
    or a path that may not be written."""
    if not isinstance(err, OSError) or err.filename is None or not err.strerror:
        return str(err)
    message = f"{err.filename}: {err.strerror}"
    if err.errno in _NO_SPACE:
        message += " (free some space and rerun: finished outputs and checkpoints are kept)"
    elif err.errno in _NOT_WRITABLE:
        message += " (make that path writable, or run the stage where it may write, and rerun)"
    return message


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        unit = task.fields.get("unit", "items")
        if task.speed is None:
            return Text(f"– {unit}/s", style="progress.data.speed")
        return Text(f"{task.speed:,.1f} {unit}/s", style="progress.data.speed")


class RichProgress:
    """The pipeline's ``Progress`` protocol drawn as Rich progress bars, one per ``start``."""

    def __init__(self, progress: Progress):
        self._progress = progress
        self._task = None

    def start(self, description: str, total: int | None, unit: str = "items") -> None:
        if self._task is not None:
            self._progress.update(self._task, visible=True)
        self._task = self._progress.add_task(description, total=total, unit=unit)

    def advance(self, n: int = 1) -> None:
        if self._task is not None:
            self._progress.advance(self._task, n)


@contextlib.contextmanager
def progress() -> Iterator[RichProgress]:
    columns = [
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    # Without a terminal (CI logs, pipes) Rich draws only the final state of each bar.
    with Progress(*columns, console=console, transient=False) as bar:
        yield RichProgress(bar)


def summary(title: str, rows: list[tuple[str, Any]]) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for name, value in rows:
        table.add_row(name, str(value))
    console.print(table)
