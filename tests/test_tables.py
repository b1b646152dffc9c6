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
        for overrides in table["rows"].values():
            params = copy.deepcopy(base)
            for key, value in (overrides or {}).items():
                tables.set_key(params, key, value)
        for group in table["tables"].values():
            assert set(group) <= set(table["rows"])


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


def _finished(params: dict, fid: float, floor: float = 80.0, seconds: float = 60.0) -> dict:
    return {
        "finished": True,
        "params": params,
        "metrics": {
            "metrics/eval.json": {"fid_ref": fid, "reconstruction_fid_ref": 30.0, "untrained_fid_ref": floor},
            "metrics/transformer.json": {"tokens": 10, "maps": 2, "parameters": 1e6, "train_flops_per_image": 1e9},
        },
        "seconds": dict.fromkeys(tables.TRAINING_STAGES, seconds),
        "failed": {},
    }


def test_the_sweep_report_gives_each_setting_at_the_common_weight_and_at_its_own_best():
    guidance = {"common": 1.5, "sweep": [1.0, 1.5, 3.0]}
    overrides = tables.expand_guidance(
        {"o0": {"decompose.order": 0}, "o0-s1": {"decompose.order": 0, "transformer.train.seed": 1}, "o3": {}},
        guidance,
    )
    params = _rows(**overrides)
    # order 0 is best at w = 3 on the mean of its two seeds; order 3 at w = 1.5.
    fids = {"o0": {1.0: 60, 1.5: 55, 3.0: 50}, "o0-s1": {1.0: 58, 1.5: 57, 3.0: 54}, "o3": {1.0: 70, 1.5: 65, 3.0: 66}}
    rows = {
        tables.swept(n, w): _finished(params[tables.swept(n, w)], fid, seconds=30.0 if n == "o0-s1" else 60.0)
        for n, by_w in fids.items()
        for w, fid in by_w.items()
    }
    text = tables.markdown_sweep(rows, ["o0", "o0-s1", "o3"], guidance)
    lines = {line.split("|")[1].strip().split(" ")[1].rstrip(","): line.split("|") for line in text.splitlines()[2:]}
    train = params["o0@w1"]["transformer"]["train"]
    steps, batch = train["steps"], train["batch_size"]
    o0, o3 = (lines[k] for k in ("0", "3"))
    assert o0[2].strip() == "2"  # two seeds
    assert o0[7].strip() == "56.00 ± 1.41" and o0[8].strip() == "3" and o0[9].strip() == "52.00 ± 2.83"
    assert o3[7].strip() == "65.00" and o3[8].strip() == "1.5" and o3[9].strip() == "65.00"
    assert float(o0[5]) == pytest.approx(1e9 * steps * batch / 1e15, abs=1e-3)  # transformer training PFLOP
    assert o0[6].strip() == "3.0 ± 1.4"  # wall minutes of the four training stages: 4 and 2, mean ± sample std


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
