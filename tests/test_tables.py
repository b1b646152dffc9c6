"""`cart tables` (pipeline/tables.py) runs the README's tables: a stage is shared by rows exactly when its params
and inputs agree."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline import tables
from stages.cli import app

REPO = Path(__file__).resolve().parent.parent


def _header(markdown: str) -> list[str]:
    """The column names of a markdown table's first line."""
    return [h.strip() for h in markdown.splitlines()[0].split("|")[1:-1]]


def _rows(**overrides: dict) -> dict[str, dict]:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    rows = {}
    for name, changes in overrides.items():
        params = copy.deepcopy(base)
        for key, value in changes.items():
            tables.set_key(params, key, value)
        rows[name] = params
    return rows


def _stages_of(row_jobs, row):
    return {job.stage.name: job for job in row_jobs[row]}


def test_rows_share_the_stages_whose_params_and_inputs_agree():
    rows = _rows(o3={}, o0={"decompose.order": 0}, o3_seed1={"transformer.train.seed": 1})
    jobs, row_jobs = tables.plan(rows, tables.read_stages(REPO / "dvc.yaml"))
    o3, o0, seed1 = (_stages_of(row_jobs, r) for r in ("o3", "o0", "o3_seed1"))
    # One shard and one reference classifier for every row: their params are the same.
    assert o3["shard"] is o0["shard"] is seed1["shard"]
    assert o3["train_evaluator"] is o0["train_evaluator"]
    # The order changes the decomposition and everything after it.
    for stage in ("decompose", "train_tokenizer", "extract_tokens", "train_transformer", "evaluate"):
        assert o3[stage] is not o0[stage]
    # A transformer seed shares the tokenizer and its tokens, and trains its own transformer.
    for stage in ("decompose", "train_tokenizer", "extract_tokens"):
        assert o3[stage] is seed1[stage]
    assert o3["train_transformer"] is not seed1["train_transformer"]
    assert o3["evaluate"] is not seed1["evaluate"]
    assert len(jobs) == 1 + 2 + 2 + 2 + 3 + 1 + 3
    # A stage reads its upstream outputs from the jobs that wrote them.
    assert o3["train_transformer"].upstream["data/tokens"] is o3["extract_tokens"]


def test_an_override_of_a_key_the_params_file_lacks_is_refused():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    with pytest.raises(KeyError, match="transformer.train.sed"):
        tables.set_key(params, "transformer.train.sed", 1)
    with pytest.raises(KeyError, match="no such section"):
        tables.set_key(params, "transformers.train.seed", 1)


def test_every_row_of_the_shipped_tables_names_real_keys():
    spec = yaml.safe_load((REPO / "params" / "tables.yaml").read_text())
    for table in spec.values():
        base = yaml.safe_load((REPO / table["params"]).read_text())
        for key, value in (table.get("set") or {}).items():
            tables.set_key(base, key, value)
        for overrides in table["rows"].values():
            params = copy.deepcopy(base)
            for key, value in (overrides or {}).items():
                tables.set_key(params, key, value)
        for group in table["tables"].values():
            assert set(group) <= set(table["rows"])


def test_a_tables_set_changes_every_row_before_the_command_line_and_the_rows(tmp_path):
    rows_file = tmp_path / "tables.yaml"
    rows_file.write_text(
        yaml.safe_dump(
            {
                "t": {
                    "params": "params.yaml",
                    "set": {"evaluate.highres_scale": 2, "transformer.train.steps": 7},
                    "rows": {"a": {}, "b": {"transformer.train.steps": 9}},
                    "tables": {"T": ["a", "b"]},
                }
            }
        )
    )
    _, rows = tables.table_rows(rows_file, "t", ["transformer.train.seed=3"], None)
    assert [r["evaluate"]["highres_scale"] for r in rows.values()] == [2, 2]
    assert [r["transformer"]["train"]["steps"] for r in rows.values()] == [7, 9]  # a row's own key wins
    assert [r["transformer"]["train"]["seed"] for r in rows.values()] == [3, 3]
    # The demo's tables keep measuring generation at 2×, which make repro leaves out.
    _, demo = tables.table_rows(REPO / "params" / "tables.yaml", "demo", [], ["o0"])
    assert demo["o0"]["evaluate"]["highres_scale"] == 2 == demo["o0"]["data"]["highres_scale"]


@pytest.mark.parametrize("preset", ["params/cifar10.yaml", "params/cifar10-gpu.yaml"])
def test_the_tables_on_each_cifar10_preset_plan_every_stage_with_one_shard_and_one_classifier(preset):
    spec = yaml.safe_load((REPO / "params" / "tables.yaml").read_text())
    names = [name for name, table in spec.items() if table["params"] == preset]
    assert names, f"no table runs {preset}"
    stages = tables.read_stages(REPO / "dvc.yaml")
    for name in names:
        _, rows = tables.table_rows(REPO / "params" / "tables.yaml", name, [], None)
        jobs, row_jobs = tables.plan(rows, stages)
        assert all(len(row_jobs[row]) == len(stages) for row in rows), name  # every stage of every row
        assert len({job.key for job in jobs.values() if job.stage.name in ("shard", "train_evaluator")}) == 2, name
        assert all(job.params["data"]["source"] == "cifar10" for job in jobs.values() if job.stage.name == "shard")


def test_a_guidance_sweep_evaluates_each_row_at_every_weight_and_trains_it_once():
    guidance = {"common": 1.5, "sweep": [1.0, 1.5, 3.0]}
    overrides = tables.expand_guidance({"o0": {"decompose.order": 0}, "o3": None}, guidance)
    assert list(overrides) == ["o0@w1", "o0@w1.5", "o0@w3", "o3@w1", "o3@w1.5", "o3@w3"]
    assert overrides["o3@w3"] == {"transformer.sampling.guidance": 3.0}
    jobs, row_jobs = tables.plan(_rows(**overrides), tables.read_stages(REPO / "dvc.yaml"))
    o0 = [_stages_of(row_jobs, n) for n in ("o0@w1", "o0@w1.5", "o0@w3")]
    assert o0[0]["train_transformer"] is o0[1]["train_transformer"] is o0[2]["train_transformer"]
    assert len({id(s["evaluate"]) for s in o0}) == 3
    # The same sampling seed for every row: a row may not set it, nor the weight, in a swept table.
    with pytest.raises(ValueError, match="transformer.sampling.seed"):
        tables.expand_guidance({"o0": {"transformer.sampling.seed": 1}}, guidance)
    with pytest.raises(ValueError, match="common weight 2"):
        tables.expand_guidance({"o0": {}}, {"common": 2.0, "sweep": [1.0, 3.0]})


def _finished(
    params: dict, fid: float, floor: float = 80.0, seconds: float = 60.0, inception: float | None = None
) -> dict:
    """A finished row's results; ``inception``: its Inception FID (None: a row recorded without it)."""
    evaluation = {"fid_ref": fid, "reconstruction_fid_ref": 30.0, "untrained_fid_ref": floor}
    if inception is not None:
        evaluation |= {
            "fid_inception": inception,
            "reconstruction_fid_inception": 20.0,
            "untrained_fid_inception": 90.0,
        }
        evaluation |= {"samples": 512, "reconstructions": 512, "val_images": 512, "reference_set": "val"}
    return {
        "finished": True,
        "params": params,
        "metrics": {
            "metrics/eval.json": evaluation,
            "metrics/transformer.json": {"tokens": 10, "maps": 2, "parameters": 1e6, "train_flops_per_image": 1e9},
        },
        "seconds": dict.fromkeys(tables.TRAINING_STAGES, seconds),
        "failed": {},
    }


def _cells(text: str) -> dict[str, dict[str, str]]:
    """A markdown table as {the row's order: {header: cell}} (every line has a cell per header)."""
    header, _, *lines = text.splitlines()
    names = [h.strip() for h in header.split("|")[1:-1]]
    out = {}
    for line in lines:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert len(cells) == len(names), line
        out[cells[0].split(" ")[1].rstrip(",")] = dict(zip(names, cells, strict=True))
    return out


def test_the_markdown_tables_lead_with_the_inception_fid_and_say_what_it_was_measured_on():
    params = _rows(o0={"decompose.order": 0}, o0_s1={"decompose.order": 0, "transformer.train.seed": 1}, o3={})
    rows = {
        "o0": _finished(params["o0"], 50.0, inception=30.0),
        "o0_s1": _finished(params["o0_s1"], 54.0),  # recorded before the Inception FID: averaged in FID_ref only
        "o3": _finished(params["o3"], 65.0),
    }
    text = tables.markdown(rows, ["o0", "o0_s1", "o3"])
    header = _header(text)
    assert header[:9] == [
        "setting",
        "runs",
        "FID (Inception) ↓",
        "ceiling",
        "untrained floor",
        "FID measured on",
        "FID_ref ↓",
        "ceiling FID_ref",
        "untrained floor FID_ref",
    ]
    o0, o3 = (_cells(text)[k] for k in ("0", "3"))
    assert o0["runs"] == "2" and o0["FID (Inception) ↓"] == "30.00 (1 of 2 runs)"
    assert o0["ceiling"] == "20.00 (1 of 2 runs)" and o0["untrained floor"] == "90.00 (1 of 2 runs)"
    assert o0["FID measured on"].startswith("512 samples vs 512 val images; no Inception FID recorded")
    assert o0["FID_ref ↓"] == "52.00 ± 2.83" and o0["untrained floor FID_ref"] == "80.00 ± 0.00"
    assert o3["FID (Inception) ↓"] == "–" and o3["FID_ref ↓"] == "65.00" and o3["ceiling FID_ref"] == "30.00"
    assert o3["FID measured on"].startswith("no Inception FID recorded")


def test_the_sweep_report_gives_each_setting_at_the_common_weight_and_at_its_own_best():
    guidance = {"common": 1.5, "sweep": [1.0, 1.5, 3.0]}
    overrides = tables.expand_guidance(
        {"o0": {"decompose.order": 0}, "o0-s1": {"decompose.order": 0, "transformer.train.seed": 1}, "o3": {}},
        guidance,
    )
    params = _rows(**overrides)
    # Order 0 is best at w = 1.5 by the mean Inception FID of its two seeds (at w = 3 by FID_ref, which does not
    # choose); order 3 has no Inception FID (recorded before it): best by FID_ref, at w = 1.5, and marked so.
    fids = {"o0": {1.0: 60, 1.5: 55, 3.0: 50}, "o0-s1": {1.0: 58, 1.5: 57, 3.0: 54}, "o3": {1.0: 70, 1.5: 65, 3.0: 66}}
    inception = {"o0": {1.0: 40, 1.5: 30, 3.0: 35}, "o0-s1": {1.0: 42, 1.5: 34, 3.0: 37}}
    rows = {
        tables.swept(n, w): _finished(
            params[tables.swept(n, w)],
            fid,
            seconds=30.0 if n == "o0-s1" else 60.0,
            inception=inception.get(n, {}).get(w),
        )
        for n, by_w in fids.items()
        for w, fid in by_w.items()
    }
    text = tables.markdown_sweep(rows, ["o0", "o0-s1", "o3"], guidance)
    assert text.splitlines()[0].startswith("| setting | runs | FID (Inception) at w=1.5 ↓ | best w | FID (Inception)")
    train = params["o0@w1"]["transformer"]["train"]
    steps, batch = train["steps"], train["batch_size"]
    o0, o3 = (_cells(text)[k] for k in ("0", "3"))
    assert o0["runs"] == "2"  # two seeds
    assert o0["FID (Inception) at w=1.5 ↓"] == "32.00 ± 2.83" and o0["best w"] == "1.5"
    assert o0["FID (Inception) at best w ↓"] == "32.00 ± 2.83"
    assert o0["FID measured on"] == "512 samples vs 512 val images"
    assert o0["FID_ref at best w ↓"] == "56.00 ± 1.41" and o0["FID_ref at w=1.5"] == "56.00 ± 1.41"
    assert o0["FID at each w (Inception; FID_ref where a row has none)"] == "1: 41.00, 1.5: 32.00, 3: 36.00"
    assert o3["FID (Inception) at w=1.5 ↓"] == "–" and o3["best w"] == "1.5 (by FID_ref)"
    assert o3["FID_ref at best w ↓"] == "65.00" and o3["FID at each w (Inception; FID_ref where a row has none)"] == (
        "1: 70.00, 1.5: 65.00, 3: 66.00"
    )
    assert float(o0["transformer train PFLOP"]) == pytest.approx(1e9 * steps * batch / 1e15, abs=1e-3)
    assert o0["train wall min"] == "3.0 ± 1.4"  # wall minutes of the four training stages: 4 and 2, mean ± sample std


def test_the_shipped_guidance_sweeps_expand_and_keep_the_sampling_seed():
    spec = yaml.safe_load((REPO / "params" / "tables.yaml").read_text())
    swept_tables = {name: table for name, table in spec.items() if "guidance" in table}
    assert swept_tables
    for table in swept_tables.values():
        assert tables.expand_guidance(table["rows"], table["guidance"])


def test_the_command_reports_a_results_file_and_refuses_an_override_of_a_missing_key(tmp_path):
    params = _rows(o3={})["o3"]
    saved = {"table": "demo", "set": [], "tables": {"Orders": ["o3"]}, "rows": {"o3": _finished(params, 50.0)}}
    (tmp_path / "results.json").write_text(json.dumps(saved))
    result = CliRunner().invoke(app, ["tables", "--report", str(tmp_path / "results.json")])
    assert result.exit_code == 0, result.output
    assert "### Orders" in result.stdout and "| order 3 (o3) | 1 |" in result.stdout
    typo = ["tables", "--table", "demo", "--root", str(tmp_path / "root"), "--set", "transformer.train.sed=1"]
    result = CliRunner().invoke(app, typo)
    assert result.exit_code == 2 and "transformer.train.sed" in result.output
    assert not (tmp_path / "root").exists()


def test_until_runs_only_the_stages_up_to_the_named_one_and_refuses_an_unknown_stage(tmp_path):
    stages = tables.read_stages(REPO / "dvc.yaml")
    kept = [s.name for s in tables.stages_until(stages, "train_tokenizer")]
    assert kept == ["shard", "decompose", "train_tokenizer"]
    assert tables.stages_until(stages, None) == stages
    jobs, _ = tables.plan(_rows(o3={}, o0={"decompose.order": 0}), tables.stages_until(stages, "train_tokenizer"))
    assert sorted(j.stage.name for j in jobs.values()) == ["decompose"] * 2 + ["shard"] + ["train_tokenizer"] * 2
    typo = ["tables", "--table", "demo", "--root", str(tmp_path / "root"), "--until", "train_tokeniser"]
    result = CliRunner().invoke(app, typo)
    assert result.exit_code == 2 and "train_tokeniser" in result.output
    assert not (tmp_path / "root").exists()


def test_a_stage_directory_made_by_another_checkout_runs_this_checkouts_code(tmp_path):
    jobs, _ = tables.plan(_rows(o3={}), tables.read_stages(REPO / "dvc.yaml"))
    shard = next(j for j in jobs.values() if j.stage.name == "shard")
    stale = tmp_path / shard.name
    stale.mkdir()
    (stale / "pipeline").symlink_to(tmp_path / "gone-checkout" / "pipeline")  # dangling, as a removed worktree's
    directory = tables._prepare(shard, tmp_path)
    for name in tables.CODE:
        assert (directory / name).readlink() == REPO / name


def _sample_fid_tables(tmp_path: Path) -> Path:
    """Two tables of the same rows on params.yaml: ``with`` asks for sample_fid, ``without`` does not."""
    rows = {"a": {}, "b": {"decompose.order": 0}}
    spec = {"params": "params.yaml", "rows": rows, "tables": {"T": ["a", "b"]}}
    rows_file = tmp_path / "tables.yaml"
    rows_file.write_text(yaml.safe_dump({"with": spec | {"sample_fid": True}, "without": spec}))
    return rows_file


def test_a_table_with_sample_fid_plans_it_for_every_row_after_the_rows_tokenizer_and_transformer(tmp_path):
    rows_file = _sample_fid_tables(tmp_path)
    stats = tmp_path / "train_stats.npz"
    stats.write_bytes(b"")  # only its existence is checked here; sample_fid reads it
    spec, rows = tables.table_rows(rows_file, "with", [f"evaluate.reference_stats={stats}"], None)
    jobs, row_jobs = tables.plan(rows, tables.table_stages("with", spec, rows, None))
    a, b = (_stages_of(row_jobs, r) for r in ("a", "b"))
    for row in (a, b):
        upstream = row["sample_fid"].upstream
        assert upstream == {"models/tokenizer": row["train_tokenizer"], "models/transformer": row["train_transformer"]}
    assert a["sample_fid"] is not b["sample_fid"]
    assert sum(j.stage.name == "sample_fid" for j in jobs.values()) == 2
    # Without the key (every table but the CPU rows'), no sample_fid: today's stages.
    spec, rows = tables.table_rows(rows_file, "without", [], None)
    _, row_jobs = tables.plan(rows, tables.table_stages("without", spec, rows, None))
    assert all("sample_fid" not in _stages_of(row_jobs, r) for r in rows)
    # The shipped tables: the CPU rows of issue 28 ask for it; the GPU script's table and the demo's do not.
    shipped = yaml.safe_load((REPO / "params" / "tables.yaml").read_text())
    assert shipped["cifar10"]["sample_fid"] is True
    assert not shipped["cifar10-gpu"].get("sample_fid") and not shipped["demo"].get("sample_fid")


def test_sample_fid_without_reference_statistics_stops_before_any_stage_with_exit_2(tmp_path):
    rows_file = _sample_fid_tables(tmp_path)
    # --deadline 0: were the refusal missing, no stage would start either.
    command = [
        "tables",
        "--table",
        "with",
        "--rows",
        str(rows_file),
        "--root",
        str(tmp_path / "root"),
        "--deadline",
        "0",
    ]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2, result.output
    assert "evaluate.reference_stats" in result.output and "table with" in result.output
    assert not (tmp_path / "root").exists()
    # A relative path is refused too: each stage runs in a directory of its own.
    result = CliRunner().invoke(app, [*command, "--set", "evaluate.reference_stats=train_stats.npz"])
    assert result.exit_code == 2 and "absolute path" in result.output
    # The rows' tokenizers alone (--until) draw no samples: no statistics needed.
    spec, rows = tables.table_rows(rows_file, "with", [], None)
    assert [s.name for s in tables.table_stages("with", spec, rows, "train_tokenizer")][-1] == "train_tokenizer"


def test_the_report_of_a_sample_fid_table_leads_with_its_fid_over_the_seeds(tmp_path):
    params = _rows(o0={"decompose.order": 0}, o0_s1={"decompose.order": 0, "transformer.train.seed": 1}, o3={})
    rows = {name: _finished(params[name], 50.0, inception=30.0) for name in params}
    for name, fid in (("o0", 20.0), ("o0_s1", 22.0), ("o3", 25.0)):
        rows[name]["metrics"]["metrics/fid.json"] = {
            "fid_inception": fid,
            "fid_samples": 10000,
            "reference_stats": "/data/train_stats.npz",
            "reference_count": 50000,
            "reference_source": "folder /data/cifar10/train",
            "images": 10000,
        }
    saved = {"table": "cifar10", "set": [], "tables": {"Main": ["o0", "o0_s1", "o3"]}, "rows": rows}
    (tmp_path / "results.json").write_text(json.dumps(saved))
    result = CliRunner().invoke(app, ["tables", "--report", str(tmp_path / "results.json")])
    assert result.exit_code == 0, result.output
    text = result.stdout.split("### Main\n\n", 1)[1]
    header = _header(text)
    assert header[:7] == [
        "setting",
        "runs",
        "FID (Inception, sample-fid vs reference statistics) ↓",
        "sample-fid measured on",
        "FID (Inception) vs val ↓",
        "ceiling",
        "untrained floor",
    ]
    o0, o3 = (_cells(text.strip())[k] for k in ("0", "3"))
    assert o0["runs"] == "2" and o0["FID (Inception, sample-fid vs reference statistics) ↓"] == "21.00 ± 1.41"
    assert o0["sample-fid measured on"] == "10000 samples vs train_stats.npz (50000 images; folder /data/cifar10/train)"
    # evaluate's Inception FID is its own (the same name in fid.json is another number), measured against val.
    assert o0["FID (Inception) vs val ↓"] == "30.00 ± 0.00" and o3["FID (Inception) vs val ↓"] == "30.00"
    assert o0["FID measured on"] == "512 samples vs 512 val images"
    assert o3["FID (Inception, sample-fid vs reference statistics) ↓"] == "25.00"


def test_adopt_links_finished_stages_that_a_new_params_key_renamed_and_nothing_else(tmp_path):
    stages = tables.read_stages(REPO / "dvc.yaml")
    today = _rows(o0={"decompose.order": 0}, o3={})
    before = copy.deepcopy(today)  # as the params were before tokenizer.rfid existed
    for params in before.values():
        del params["tokenizer"]["rfid"]
    before["o3"]["transformer"]["train"]["steps"] = 7  # and o3's transformer then had another budget
    old_jobs, _ = tables.plan(before, stages)
    for job in old_jobs.values():  # finished directories of the earlier run
        tables._prepare(job, tmp_path)
        (tmp_path / job.name / ".done").write_text("1.0")
    jobs, _ = tables.plan(today, stages)
    renamed = [name for name in jobs if name not in old_jobs]
    assert any(n.startswith("train_tokenizer-") for n in renamed)  # the new key renamed the tokenizers and after
    said: list[str] = []
    adopted = tables.adopt(jobs, tmp_path, said.append)
    old_by_stage_row = {(j.stage.name, tuple(j.rows)): name for name, j in old_jobs.items()}
    for name in renamed:
        job = jobs[name]
        if job.rows == ["o3"] and job.stage.name in ("train_transformer", "evaluate", "sample_fid"):
            assert name not in adopted and not (tmp_path / name).exists()  # a value that differs: not adopted
        else:
            assert adopted[name] == old_by_stage_row[(job.stage.name, tuple(job.rows))]
            assert (tmp_path / name).resolve() == (tmp_path / adopted[name]).resolve()
    assert len(said) == len(adopted)
    assert tables.adopt(jobs, tmp_path, said.append) == {}  # a second call finds everything in place
