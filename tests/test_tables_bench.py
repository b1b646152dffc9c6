"""bench/tables.py runs the README's tables: a stage is shared by rows exactly when its params and inputs agree."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def _tables():
    spec = importlib.util.spec_from_file_location("bench_tables", REPO / "bench" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


tables = _tables()


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
    spec = yaml.safe_load((REPO / "bench" / "tables.yaml").read_text())
    for table in spec.values():
        base = yaml.safe_load((REPO / table["params"]).read_text())
        for overrides in table["rows"].values():
            params = copy.deepcopy(base)
            for key, value in (overrides or {}).items():
                tables.set_key(params, key, value)
        for group in table["tables"].values():
            assert set(group) <= set(table["rows"])
