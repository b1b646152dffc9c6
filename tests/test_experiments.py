"""The tables from `dvc exp show` rows: seeds averaged, different settings never, rows without results left out."""

from __future__ import annotations

import json
import math
from pathlib import Path

from typer.testing import CliRunner

from pipeline.evaluation.experiments import cell, experiment_points, fid_order_figure, flatten, group_runs
from stages.cli import app

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


def inception_run(name, order, fid_ref, fid_inception, seed=0, **extra):
    """A run recorded with the Inception metrics (path-qualified, as `dvc exp show` names colliding columns)."""
    measured = {"samples": 512, "reconstructions": 512, "val_images": 512, "reference_set": "val"}
    return run(
        name,
        order,
        fid_ref,
        seed=seed,
        **{
            "metrics/eval.json:fid_inception": fid_inception,
            "reconstruction_fid_inception": fid_inception - 10,
            "untrained_fid_inception": fid_inception + 100,
            "untrained_fid_ref": fid_ref + 40,
            **measured,
            **extra,
        },
    )


def test_the_inception_fid_leads_and_runs_recorded_without_it_keep_their_fid_ref_and_say_so(tmp_path):
    rows = [
        inception_run("new-seed0", 3, 40.0, 200.0),
        inception_run("new-seed1", 3, 44.0, 210.0, seed=1),
        run("old-seed2", 3, 48.0, seed=2),  # recorded before the Inception FID: its FID_ref still counts
        run("old-var", 0, 30.0, layout="replace"),  # a setting with no Inception FID at all
        # Without FID_ref, an Inception FID is enough for a point.
        {**inception_run("inception-only", 1, 0.0, 220.0), "metrics/eval.json:fid_ref": "-"},
    ]
    points = experiment_points(rows, PARAMS)
    assert [p["name"] for p in points] == ["new-seed0", "new-seed1", "old-seed2", "old-var", "inception-only"]
    assert points[0]["fid_set"] == "512 samples vs 512 val images" and points[0]["inception_note"] is None
    assert points[2]["fid_set"] is None and "no Inception FID recorded" in points[2]["inception_note"]
    table = {r["order"]: r for r in group_runs(points)}
    cart, var = table[3], table[0]
    assert cart["runs"] == 3 and cart["fid_ref"] == 44.0 and cart["fid_ref_runs"] == 3
    assert cart["fid_inception"] == 205.0 and cart["fid_inception_runs"] == 2
    assert cart["fid_inception_std"] == math.sqrt(50)  # the sample std of the two runs that have it
    assert cell(cart, "fid_inception", 2) == "205.00 ± 7.07 (2 of 3 runs)"
    assert cell(cart, "fid_ref", 2) == "44.00 ± 4.00"
    assert cart["fid_set"] == "512 samples vs 512 val images" and "no Inception FID" in cart["inception_note"]
    assert math.isnan(var["fid_inception"]) and cell(var, "fid_inception", 2) == "–" and var["fid_ref"] == 30.0
    assert table[1]["fid_inception"] == 220.0 and math.isnan(table[1]["fid_ref"])

    fig = fid_order_figure(list(table.values()), tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    inception_ax, ref_ax = fig.axes
    assert "Inception" in inception_ax.get_ylabel() and "FID_ref" in ref_ax.get_ylabel()

    def plotted(ax):
        """{(series label or colour, linestyle): [(order, y), …]}: the FIDs (errorbars: "-"), ceilings (":") and
        floors ("--")."""
        xy = {(c.get_label(), "-"): c.lines[0].get_xydata().tolist() for c in ax.containers}
        bounds = [ln for ln in ax.lines if ln.get_linestyle() in (":", "--")]
        return xy | {(ln.get_color(), ln.get_linestyle()): ln.get_xydata().tolist() for ln in bounds}

    # Each series is one setting; the one without an Inception FID is on the right only.
    left = plotted(inception_ax)
    assert sorted(v for k, v in left.items() if k[1] == "-") == [[[1, 220.0], [3, 205.0]]]
    assert sorted(v for k, v in left.items() if k[1] == ":") == [[[1, 210.0], [3, 195.0]]]  # the ceilings
    assert sorted(v for k, v in left.items() if k[1] == "--") == [[[1, 320.0], [3, 305.0]]]  # the floors
    right = {k[0]: v for k, v in plotted(ref_ax).items() if k[1] == "-"}
    assert right == {"layout=append": [[3, 44.0]], "layout=replace": [[0, 30.0]]}
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:2] == ["layout=append", "layout=replace (no Inception FID)"]


def test_evaluates_fid_is_read_before_sample_fids_and_a_switched_off_inception_says_so():
    """Two files with `fid_inception` are path-qualified: evaluate's is the one of the table (sample-fid's is
    another number, of other images against other statistics)."""
    row = {
        **run("both", 3, 40.0, **{"evaluate.inception": False}),
        "metrics/fid.json:fid_inception": 9.0,
        "metrics/eval.json:fid_inception": 200.0,
    }
    assert experiment_points([row], PARAMS)[0]["fid_inception"] == 200.0
    off = run("off", 3, 40.0, **{"evaluate.inception": False})
    assert experiment_points([off], [*PARAMS, "evaluate.inception"])[0]["inception_note"] == (
        "no Inception FID: evaluate.inception false"
    )


def test_cart_experiments_prints_the_inception_fid_first_and_marks_runs_without_it(tmp_path, monkeypatch):
    import dvc.api

    import stages.experiments

    rows = [inception_run("new", 3, 40.0, 200.0), run("old", 0, 30.0, class_consistency_ref=0.5)]
    for row in rows:
        row |= {"parameters": 1e6, "train_flops_per_image": 2e9, "sampling_images_per_s": 10.0, "maps": 4}
    monkeypatch.setattr(dvc.api, "exp_show", lambda num: rows)
    monkeypatch.setattr(stages.experiments, "_params_of_run", lambda row: None)  # the row's own values
    monkeypatch.setenv("COLUMNS", "400")
    (tmp_path / "params.yaml").write_text("decompose:\n  order: 3\ntransformer:\n  train:\n    seed: 0\n")
    result = CliRunner().invoke(
        app, ["experiments", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "fig.png")]
    )
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") == 3}
    new, old = lines["order 3"], lines["order 0"]
    assert new.index("FID (Inception) 200.00 (ceiling 190.00, untrained 300.00) (512 samples vs 512 val images)") < (
        new.index("FID_ref 40.00 (ceiling –, untrained 80.00)")
    )
    assert "no Inception FID recorded" in old and "FID_ref 30.00" in old
    assert (tmp_path / "fig.png").exists()


def test_the_documented_dvc_exp_show_command_shows_the_inception_fid_as_the_first_metric(tmp_path):
    """docs/results.md's `dvc exp show --drop … --keep …`, run by DVC on a repository laid out as this one (the
    tokenizer's and transformer's metrics files before evaluate's, whose keys come in the order evaluate writes
    them, and sample-fid's with a colliding `fid_inception` after it)."""
    import shlex
    import subprocess
    import sys

    from pipeline.evaluation.evaluation import HEADLINE

    docs = (Path(__file__).resolve().parent.parent / "docs" / "results.md").read_text()
    line = next(ln for ln in docs.splitlines() if ln.startswith("dvc exp show --drop"))
    argv = shlex.split(line, comments=True)
    stages = {
        "train_tokenizer": "metrics/tokenizer.json",
        "train_transformer": "metrics/transformer.json",
        "evaluate": "metrics/eval.json",
        "sample_fid": "metrics/fid.json",
    }
    dvc_yaml = {"stages": {s: {"cmd": "true", "metrics": [{m: {"cache": False}}]} for s, m in stages.items()}}
    files = {
        "metrics/tokenizer.json": {"tokenizer": {"mse": 0.01}},
        "metrics/transformer.json": {"val_loss": 3.0, "tokens": 347, "train_flops_per_image": 2e9},
        # Evaluate's keys: the headline first (as evaluate writes them), then the rest.
        "metrics/eval.json": {k: 1.0 for k in HEADLINE} | {"reference_set": "val", "kid_inception": 0.1, "tokens": 347},
        "metrics/fid.json": {"fid_inception": 9.0, "fid_samples": 50000, "images": 50000},
        "params.yaml": {"decompose": {"order": 3}, "transformer": {"train": {"seed": 0}}},
        "dvc.yaml": dvc_yaml,
    }
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(content))  # JSON is YAML
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], cwd=tmp_path, check=True, capture_output=True)
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", *argv[1:], "--csv"], cwd=tmp_path, check=True, capture_output=True, text=True
    )
    header = shown.stdout.splitlines()[0].split(",")
    assert header == [
        "Experiment",
        "Created",
        "metrics/eval.json:fid_inception",
        *HEADLINE[1:],
        "metrics/fid.json:fid_inception",
        "fid_samples",
        "decompose.order",
    ]
