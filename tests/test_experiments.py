"""The tables from `dvc exp show` rows: seeds averaged, different settings never, rows without results left out."""

from __future__ import annotations

import math

from pipeline.evaluation.experiments import experiment_points, fid_order_figure, flatten, group_runs

PARAMS = ["data.source", "decompose.order", "tokenizer.model.layout", "tokenizer.train.seed", "transformer.train.seed"]


def run(name, order, fid, source="demo", layout="append", seed=0, **extra):
    return {
        "Experiment": name,
        "data.source": source,
        "decompose.order": order,
        "tokenizer.model.layout": layout,
        "transformer.train.seed": seed,
        "tokenizer.train.seed": seed,
        "metrics/eval.json:fid_ref": fid,
        "tokens": 155 + 64 * order,
        **extra,
    }


def rows():
    return [
        run("workspace", 3, 10.0, class_consistency_ref=0.9),
        run("var-seed0", 0, 14.0),
        run("var-seed1", 0, 16.0, seed=1),
        run("cifar", 3, 30.0, source="/data/cifar10"),  # another dataset: never averaged with the demo
        run("replace", 3, 12.0, layout="replace"),
        {**run("queued", 1, "-")},  # not run yet: no point
        {**run("running", 2, 10.0), "State": "Running"},  # dvc shows the metrics it started from
        run("main", 3, 10.0, class_consistency_ref=0.9),  # the workspace's run again
    ]


def test_points_need_a_finished_run_an_order_and_an_fid_and_read_path_qualified_names():
    points = experiment_points(rows(), PARAMS)
    assert [(p["name"], p["order"], p["fid_ref"]) for p in points] == [
        ("workspace", 3, 10.0),
        ("var-seed0", 0, 14.0),
        ("var-seed1", 0, 16.0),
        ("cifar", 3, 30.0),
        ("replace", 3, 12.0),
    ]


def test_only_runs_that_differ_in_seeds_are_averaged_and_rows_name_what_differs(tmp_path):
    table = group_runs(experiment_points(rows(), PARAMS))
    by_label = {r["label"]: r for r in table}
    assert set(by_label) == {
        "order 0, data.source=demo, tokenizer.model.layout=append",
        "order 3, data.source=demo, tokenizer.model.layout=append",
        "order 3, data.source=/data/cifar10, tokenizer.model.layout=append",
        "order 3, data.source=demo, tokenizer.model.layout=replace",
    }
    var = by_label["order 0, data.source=demo, tokenizer.model.layout=append"]
    assert var["runs"] == 2 and var["fid_ref"] == 15.0 and var["fid_ref_std"] == math.sqrt(2)  # sample std
    assert math.isnan(var["class_consistency_ref"]) and var["tokens"] == 155
    cifar = by_label["order 3, data.source=/data/cifar10, tokenizer.model.layout=append"]
    assert cifar["runs"] == 1 and cifar["fid_ref"] == 30.0
    fid_order_figure(table, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


def test_params_are_named_as_dvc_names_them():
    assert flatten({"data": {"source": "demo"}, "tokenizer": {"model": {"scales": [1, 2]}}}) == {
        "data.source": "demo",
        "tokenizer.model.scales": [1, 2],
    }


def test_a_run_from_before_a_param_existed_is_averaged_with_runs_that_have_it_at_the_same_value():
    """A key an older commit's params.yaml lacks is unknown, not a difference; a key set to null is a value."""
    params = PARAMS + ["data.highres_scale", "tokenizer.init_from"]
    files = {
        "old-seed0": {"data": {"source": "demo"}, "tokenizer": {"init_from": None}},  # before data.highres_scale
        "new-seed1": {"data": {"source": "demo", "highres_scale": 2}, "tokenizer": {"init_from": None}},
        "new-no-2x": {"data": {"source": "demo", "highres_scale": 0}, "tokenizer": {"init_from": None}},
        "imported": {"data": {"source": "demo", "highres_scale": 2}, "tokenizer": {"init_from": "var/vae"}},
    }
    rows = [run("old-seed0", 3, 10.0), run("new-seed1", 3, 12.0, seed=1), run("new-no-2x", 3, 20.0)]
    rows.append(run("imported", 3, 9.0))

    def read(row):
        own = files[row["Experiment"]]
        return flatten({**own, "decompose": {"order": 3}, "tokenizer": {**own["tokenizer"], "model": {}}})

    table = group_runs(experiment_points(rows, params, read))
    assert sorted((r["runs"], r["label"]) for r in table) == [
        (1, "order 3, data.highres_scale=0.0, tokenizer.init_from=None"),
        (1, "order 3, data.highres_scale=2.0, tokenizer.init_from=var/vae"),
        (2, "order 3, data.highres_scale=2.0, tokenizer.init_from=None"),
    ]


def test_a_diffusion_run_from_before_the_learned_variance_is_not_averaged_with_one_that_has_it():
    """`transformer.diffusion.variance` came with the default `learned`; diffusion heads before it sampled with the
    fixed variance, so an older diffusion run is a different setting; a softmax run's head has no such variance."""
    params = PARAMS + ["transformer.head", "transformer.diffusion.variance"]

    def file(head, variance=None):
        diffusion = {} if variance is None else {"variance": variance}
        return {"data": {"source": "demo"}, "transformer": {"head": head, "diffusion": diffusion}}

    files = {
        "diff-old": file("diffusion"),
        "diff-new": file("diffusion", "learned"),
        "diff-fixed": file("diffusion", "fixed"),
        "soft-old": file("softmax"),
        "soft-new": file("softmax", "learned"),
    }
    rows = [run(name, 0, 10.0 + i, seed=i) for i, name in enumerate(files)]

    def read(row):
        return flatten({**files[row["Experiment"]], "decompose": {"order": 0}})

    table = group_runs(experiment_points(rows, params, read))
    groups = sorted(sorted(r["names"]) for r in table)
    assert groups == [["diff-fixed", "diff-old"], ["diff-new"], ["soft-new", "soft-old"]]
