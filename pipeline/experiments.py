"""The paper's Table 4 from `dvc exp`: every experiment's decomposition order against its FID, as a table and plot."""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any

import numpy as np

UNFINISHED = {"Running", "Queued", "Failed"}
COLUMNS = ("fid_ref", "kid_ref", "precision_ref", "recall_ref", "class_consistency_ref", "reconstruction_fid_ref")


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _get(row: dict[str, Any], key: str) -> Any:
    """A column of `dvc.api.exp_show` rows: bare (``fid_ref``) or path-qualified when names collide."""
    if key in row:
        return row[key]
    return next((v for k, v in row.items() if k.endswith(f":{key}") or k.endswith(f".{key}")), None)


def experiment_points(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per finished run that has both a decomposition order and an FID.

    The workspace and the commits it came from show the same run's metrics again: identical results count once.
    A running, queued or failed experiment shows the metrics files it started from, not its own: left out.
    """
    points, seen = [], set()
    for row in rows:
        if row.get("State") in UNFINISHED:
            continue
        order, fid = _number(_get(row, "decompose.order")), _number(_get(row, "fid_ref"))
        if order is None or fid is None:
            continue
        point = {"name": row.get("Experiment") or row.get("rev") or "?", "order": int(order)}
        point["seed"] = _get(row, "transformer.train.seed")
        point |= {c: _number(_get(row, c)) for c in COLUMNS}
        key = (point["order"], point["seed"], *(point[c] for c in COLUMNS))
        if key not in seen:
            seen.add(key)
            points.append(point)
    return points


def by_order(points: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Mean and standard deviation of every column over the experiments (seeds) of each order."""
    groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        groups[p["order"]].append(p)
    table = {}
    for order in sorted(groups):
        runs = groups[order]
        row: dict[str, float] = {"runs": len(runs)}
        for c in COLUMNS:
            values = [r[c] for r in runs if r[c] is not None]
            row[c] = float(np.mean(values)) if values else float("nan")
            row[f"{c}_std"] = float(np.std(values)) if len(values) > 1 else 0.0
        table[order] = row
    return table


def fid_order_figure(points: list[dict[str, Any]], path: str | os.PathLike) -> None:
    from matplotlib.figure import Figure

    from pipeline.figures import _save

    table = by_order(points)
    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.subplots()
    ax.scatter([p["order"] for p in points], [p["fid_ref"] for p in points], alpha=0.4, label="runs")
    orders = list(table)
    ax.errorbar(
        orders,
        [table[o]["fid_ref"] for o in orders],
        yerr=[table[o]["fid_ref_std"] for o in orders],
        marker="o",
        capsize=3,
        label="mean ± std",
    )
    ax.set_xticks(orders)
    ax.set_xlabel("decomposition order n (0 = VAR)")
    ax.set_ylabel("FID (reference network) ↓")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("FID against decomposition order (dvc exp)", fontsize=10)
    _save(fig, path)
