"""The paper's tables from `dvc exp`: every finished experiment's settings against its quality and cost.

Runs are grouped only when every parameter but the seeds is equal (a demo run and a run on another dataset are
never averaged into one row); each group is labelled by the parameters that tell it apart from the others.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

UNFINISHED = {"Running", "Queued", "Failed"}


class _Absent:
    """A key a run's params.yaml does not have (its commit predates the key): unknown, unlike a key set to null."""

    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()

# Keys added with a default other than what the runs before them did: a run whose params.yaml lacks the key ran
# with this value (only where the key applies: the diffusion head's variance means nothing to a softmax run).
# Kept for users' records: the runs read here are a user's `dvc exp` runs and commits (none of this repository's
# committed params.yaml has head diffusion without the key), which cannot be re-recorded with the key.
PREDATING = {"transformer.diffusion.variance": ("transformer.head", "diffusion", "fixed")}


def _own_value(own: dict[str, Any], param: str) -> Any:
    """``param`` in a run's own params.yaml; a key that predates the run is ABSENT, or what it ran with then."""
    if param in own:
        return own[param]
    if param in PREDATING:
        applies_key, applies_value, ran_with = PREDATING[param]
        if own.get(applies_key) == applies_value:
            return ran_with
    return ABSENT


# The field's FID (Inception, against the val images) first, with its ceiling and floor; then the reference
# classifier's (secondary: comparable only within this project). A run without the Inception metrics (recorded
# before they existed, or without the FID network) has NaN there, keeps its FID_ref, and says why (``inception_note``).
INCEPTION = ("fid_inception", "reconstruction_fid_inception", "untrained_fid_inception")
# sample-fid's metrics (the field's protocol: thousands of samples against a dataset's reference statistics, e.g.
# CIFAR-10's training set): its FID goes by the name `dvc exp show` gives it beside evaluate's, and is another number
# (other images, another reference), never read as evaluate's.
FID_FILE = "metrics/fid.json"
SAMPLE_FID = f"{FID_FILE}:fid_inception"
COLUMNS = (
    SAMPLE_FID,
    *INCEPTION,
    "fid_ref",
    "reconstruction_fid_ref",
    "untrained_fid_ref",
    "kid_ref",
    "precision_ref",
    "recall_ref",
    "class_consistency_ref",
)
EVAL_FILE = "metrics/eval.json"  # evaluate's metrics: the FIDs above, and what they were measured with
COST = ("tokens", "maps", "parameters", "train_flops_per_image", "sampling_images_per_s")


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _get(row: dict[str, Any], key: str) -> Any:
    """A column of `dvc.api.exp_show` rows: bare (``fid_ref``) or path-qualified when names collide; then
    evaluate's (``metrics/eval.json:fid_inception``, not sample-fid's ``metrics/fid.json:fid_inception``: another
    number, of other images against another reference)."""
    if key in row:
        return row[key]
    names = [k for k in row if (k.endswith(f":{key}") or k.endswith(f".{key}")) and not k.startswith(f"{FID_FILE}:")]
    names.sort(key=lambda k: not k.startswith(f"{EVAL_FILE}:"))  # stable: evaluate's first, then file order
    return row[names[0]] if names else None


def fid_set(row: dict[str, Any]) -> str | None:
    """What a run's FIDs were measured with (FID depends on both): ``512 samples vs 512 val images``; None for a
    run that did not record it. The floor uses as many samples; the ceiling reconstructs the reference images."""
    samples, images, reference = (_get(row, k) for k in ("samples", "val_images", "reference_set"))
    if _number(samples) is None or reference is None:
        return None
    count = f"{_number(images):.0f} " if _number(images) is not None else ""
    text = f"{_number(samples):.0f} samples vs {count}{reference} images"
    later = _get(row, "inception_reference")  # measured afterwards from the images the run returned
    if later is not None:
        text += f"; Inception measured afterwards vs {later}"
        recon = _number(_get(row, "inception_reconstructions"))
        text += f", ceiling of {recon:.0f} reconstructions" if recon else ""
    return text


def sample_fid_set(row: dict[str, Any]) -> str | None:
    """What a run's sample-fid FID was measured with: ``10000 samples vs train.npz (50000 images: <source>)``."""
    samples, reference = _number(row.get(f"{FID_FILE}:fid_samples")), row.get(f"{FID_FILE}:reference_stats")
    if samples is None or reference is None:
        return None
    count, source = _number(row.get(f"{FID_FILE}:reference_count")), row.get(f"{FID_FILE}:reference_source")
    about = "; ".join(t for t in (f"{count:.0f} images" if count else None, source) if t)
    return f"{samples:.0f} samples vs {os.path.basename(str(reference))}" + (f" ({about})" if about else "")


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``: the names `dvc exp show` gives params.yaml's keys."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        out |= flatten(value, f"{name}.") if isinstance(value, dict) else {name: value}
    return out


def is_seed(param: str) -> bool:
    return param.rsplit(".", 1)[-1] == "seed"


def experiment_points(
    rows: list[dict[str, Any]],
    params: list[str],
    read_params: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
) -> list[dict[str, Any]]:
    """One point per finished run that has a decomposition order and an FID (Inception or _ref), with its
    ``params`` values, its FID set (``fid_set``) and, when it has no Inception FID, why (``inception_note``).

    ``read_params(row)``, when given, returns the run's own params.yaml flattened: then a key the run's file lacks
    is ABSENT, not confused with a key set to null (`dvc exp show` prints both as None). Without it the values
    come from the row. The workspace and the commits it came from show the same run's metrics again: identical
    results count once (two runs agreeing in every metric to all digits are one run). A running, queued or
    failed experiment shows the metrics files it started from, not its own: left out.
    """
    points, seen = [], set()
    for row in rows:
        if row.get("State") in UNFINISHED:
            continue
        order = _number(_get(row, "decompose.order"))
        if order is None or all(_number(_get(row, c)) is None for c in ("fid_inception", "fid_ref")):
            continue
        point = {"name": row.get("Experiment") or row.get("rev") or "?", "order": int(order)}
        own = read_params(row) if read_params else None
        values = {p: _own_value(own, p) for p in params} if own is not None else {p: _get(row, p) for p in params}
        point["params"] = {p: _canonical(v) for p, v in values.items()}
        point |= {c: _number(_get(row, c)) for c in COLUMNS + COST}
        point["fid_set"], point["sample_fid_set"] = fid_set(row), sample_fid_set(row)
        point["inception_note"] = _inception_note(point)
        key = (point["order"], *(point[c] for c in COLUMNS))
        if key not in seen:
            seen.add(key)
            points.append(point)
    return points


def _inception_note(point: dict[str, Any]) -> str | None:
    if point["fid_inception"] is not None:
        return None
    if point["params"].get("evaluate.inception") is False:
        return "no Inception FID: evaluate.inception false"
    return "no Inception FID recorded (a run from before it, or without the FID network's wheel)"


def _canonical(value: Any) -> Any:
    """``2`` and ``2.0`` are one value (`dvc exp show` turns a column's integers into floats)."""
    if isinstance(value, bool) or value is None or value is ABSENT:
        return value
    number = _number(value)
    return number if number is not None and not isinstance(value, str) else value


def _agree(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal settings but seeds. A key one run's params.yaml lacks (its commit had no such key yet, so it ran
    with what later became the default) tells nothing, so it does not part them."""
    return all(a[k] == b[k] for k in a.keys() & b.keys() if not is_seed(k) and ABSENT not in (a[k], b[k]))


def _known(runs: list[dict[str, Any]], key: str) -> Any:
    """A group's setting of ``key``: the value of whichever of its runs has one."""
    return next((r["params"][key] for r in runs if r["params"].get(key, ABSENT) is not ABSENT), ABSENT)


def group_runs(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs that differ in seeds only, as one row each: mean and sample standard deviation of every column over
    the runs that have it (``<column>_runs`` of them), the FID sets and Inception notes of its runs, and a label
    naming the parameters whose values differ between rows (the order first)."""
    groups: list[list[dict[str, Any]]] = []
    for p in points:
        home = next((g for g in groups if all(_agree(p["params"], q["params"]) for q in g)), None)
        if home is None:
            groups.append([p])
        else:
            home.append(p)
    settings = [{k: _known(runs, k) for r in runs for k in r["params"]} for runs in groups]
    names = {k for s in settings for k in s if not is_seed(k) and k != "decompose.order"}
    varying = sorted(k for k in names if len({repr(s[k]) for s in settings if s.get(k, ABSENT) is not ABSENT}) > 1)
    table = []
    for runs, setting in zip(groups, settings, strict=True):
        first = runs[0]
        row: dict[str, Any] = {"order": first["order"], "runs": len(runs), "names": [r["name"] for r in runs]}
        row["differs"] = {k: setting.get(k) for k in varying}
        row["label"] = ", ".join([f"order {first['order']}"] + [f"{k}={v}" for k, v in row["differs"].items()])
        for c in COLUMNS + COST:
            values = [r[c] for r in runs if r[c] is not None]
            row[c] = float(np.mean(values)) if values else float("nan")
            row[f"{c}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0  # sample std
            row[f"{c}_runs"] = len(values)
        for key in ("fid_set", "sample_fid_set", "inception_note"):
            row[key] = "; ".join(sorted({r[key] for r in runs if r[key]})) or None
        table.append(row)
    return sorted(table, key=lambda r: (repr(list(r["differs"].values())), r["order"]))


def cell(row: dict[str, Any], key: str, digits: int) -> str:
    """A grouped column as ``mean ± std`` (the std where more than one run has it; ``(k of n runs)`` where only
    some of the row's runs have it), ``–`` where none has it."""
    if not math.isfinite(row[key]):
        return "–"
    have, runs = row.get(f"{key}_runs", row["runs"]), row["runs"]
    text = f"{row[key]:.{digits}f}" + (f" ± {row[key + '_std']:.{digits}f}" if have > 1 else "")
    return text + (f" ({have} of {runs} runs)" if have < runs else "")


# The two panels of the figure: (FID, its ceiling, its floor, axis label); the field's network first.
PANELS = (
    (*INCEPTION, "FID (Inception-v3, the field's network) ↓"),
    ("fid_ref", "reconstruction_fid_ref", "untrained_fid_ref", "FID_ref (reference classifier; secondary) ↓"),
)


def fid_order_figure(table: list[dict[str, Any]], path: str | os.PathLike):
    """FID (mean ± std over seeds) against decomposition order, one series per setting of the other params: the
    Inception FID on the left, FID_ref on the right, each with its ceiling (dotted) and floor (dashed) in the
    series' colour. A setting without an Inception FID is on the right only, and its label says so. Returns the
    figure (saved to ``path``)."""
    # lazy: matplotlib would slow importing this module (bench/RESULTS.md); only the figure needs it
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from pipeline.evaluation.figures import save_figure

    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in table:
        # Short names (the last part of each key): the full ones are in `cart experiments`' table.
        series[", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in row["differs"].items()) or "runs"].append(row)
    fig = Figure(figsize=(11, 4.4 + 0.22 * len(series)), layout="constrained")
    handles = []
    for ax, (fid, ceiling, floor, label) in zip(fig.subplots(1, 2), PANELS, strict=True):
        for i, (name, rows) in enumerate(series.items()):
            rows = [r for r in sorted(rows, key=lambda r: r["order"]) if math.isfinite(r[fid])]
            if not rows:
                continue
            color = f"C{i % 10}"
            ax.errorbar(
                [r["order"] for r in rows],
                [r[fid] for r in rows],
                yerr=[r[f"{fid}_std"] for r in rows],
                marker="o",
                capsize=3,
                color=color,
                label=name,
            )
            for key, style in ((ceiling, ":"), (floor, "--")):
                bound = [(r["order"], r[key]) for r in rows if math.isfinite(r[key])]
                if bound:
                    ax.plot(*zip(*bound, strict=True), linestyle=style, marker=".", color=color, lw=1, alpha=0.7)
        if not ax.containers:
            ax.text(0.5, 0.5, "no run recorded it", transform=ax.transAxes, ha="center", va="center")
        ax.set_xticks(sorted({r["order"] for r in table}))
        ax.set_xlabel("decomposition order n (0 = VAR)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for i, (name, rows) in enumerate(series.items()):
        missing = not any(math.isfinite(r["fid_inception"]) for r in rows)
        handles.append(Line2D([], [], color=f"C{i % 10}", marker="o", label=name + (" (no Inception FID)" * missing)))
    handles.append(Line2D([], [], color="grey", linestyle=":", label="ceiling: the tokenizer's reconstructions"))
    handles.append(Line2D([], [], color="grey", linestyle="--", label="floor: the untrained transformer"))
    fig.legend(handles=handles, fontsize=6.5, loc="outside lower center", ncol=1, frameon=False)
    fig.suptitle("FID against decomposition order (dvc exp; mean ± std over seeds)", fontsize=9)
    save_figure(fig, path)
    return fig
