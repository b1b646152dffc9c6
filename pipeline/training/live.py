"""dvclive logging of a training run (main process only), with a resumed run's history cut back to its checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

from dvclive import Live

from pipeline import atomic


class LiveLog:
    """dvclive on the main process (a no-op on the others), with the history of a resumed run cut back to its
    checkpoint."""

    def __init__(self, directory: Path, start_step: int, enabled: bool):
        self.live = None
        if not enabled:
            return
        if start_step > 0:
            _truncate_history(directory, start_step)
        self.live = _files_only_live(directory, resume=start_step > 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.live is None:
            return
        self.live.step = step
        for key, value in metrics.items():
            self.live.log_metric(key, float(value))
        self.live.make_summary()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()


def _files_only_live(directory: Path, resume: bool):
    """dvclive writing its metric files and nothing else.

    Its Git and DVC integration (experiment names, Studio) is of no use here and is harmful: in a Git repository
    without a commit it stops with ``SCMError: Empty git repo``, and in one without DVC it runs ``dvc init``.
    """

    class FilesOnly(Live):
        def _init_dvc(self) -> None:
            pass

    return FilesOnly(dir=str(directory), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)


def _truncate_history(directory: Path, start_step: int) -> None:
    """Drop logged rows at or after ``start_step``: the resumed run logs those steps again.

    A row cut short by a kill (or a full disk) is dropped too, rather than stopping the resumed run.
    """
    for tsv in (directory / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        if not lines:
            continue
        header, rows = lines[0], lines[1:]
        columns = header.split("\t")
        step_col = columns.index("step")
        kept = [r for r in rows if _logged_step(r, len(columns), step_col) < start_step]
        atomic.write_bytes(tsv, ("\n".join([header, *kept]) + "\n").encode())


def _logged_step(row: str, width: int, step_col: int) -> float:
    """The step of a logged row; infinity (dropped) for a row that was not written to its end."""
    fields = row.split("\t")
    try:
        float(fields[-1])
        return int(fields[step_col]) if len(fields) == width else math.inf
    except ValueError:
        return math.inf
