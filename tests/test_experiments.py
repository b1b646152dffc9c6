"""Table 4 from `dvc exp show` rows: orders grouped over seeds, rows without results left out, a plot."""

from __future__ import annotations

import math

from pipeline.experiments import by_order, experiment_points, fid_order_figure


def rows():
    return [
        {"Experiment": "workspace", "decompose.order": 3, "fid_ref": 10.0, "class_consistency_ref": 0.9},
        {"Experiment": "var-seed0", "decompose.order": 0, "fid_ref": 14.0, "transformer.train.seed": 0},
        {"Experiment": "var-seed1", "decompose.order": 0, "metrics/eval.json:fid_ref": 16.0},
        {"Experiment": "queued", "decompose.order": 1, "fid_ref": "-"},  # not run yet: no point
        # Still running: dvc shows the metrics files it started from, not its own.
        {"Experiment": "running", "decompose.order": 2, "fid_ref": 10.0, "State": "Running"},
        {"Experiment": "main", "decompose.order": 3, "fid_ref": 10.0, "class_consistency_ref": 0.9},  # = workspace
    ]


def test_points_need_a_finished_run_an_order_and_an_fid_and_read_path_qualified_names():
    points = experiment_points(rows())
    assert [(p["name"], p["order"], p["fid_ref"]) for p in points] == [
        ("workspace", 3, 10.0),
        ("var-seed0", 0, 14.0),
        ("var-seed1", 0, 16.0),
    ]


def test_orders_with_several_runs_get_mean_and_spread(tmp_path):
    table = by_order(experiment_points(rows()))
    assert list(table) == [0, 3]
    assert table[0]["runs"] == 2 and table[0]["fid_ref"] == 15.0 and table[0]["fid_ref_std"] == 1.0
    assert table[3]["fid_ref_std"] == 0.0 and math.isnan(table[0]["class_consistency_ref"])
    fid_order_figure(experiment_points(rows()), tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
