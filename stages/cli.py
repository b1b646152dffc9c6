"""The `cart` command: one sub-command per DVC stage, plus `info`."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import typer

from stages import (
    decompose,
    evaluate,
    experiments,
    extract_tokens,
    plan,
    prepare_cifar10,
    sample,
    sample_fid,
    shard,
    tables,
    train_evaluator,
    train_tokenizer,
    train_transformer,
    var_checkpoints,
)
from stages.common import ParamsOption, summary

app = typer.Typer(
    help="CART: next-detail autoregressive image generation. Each sub-command is one DVC stage "
    "(run them all with `dvc repro`).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode="markdown",
)

app.command("prepare-cifar10")(prepare_cifar10.command)
app.command("shard")(shard.command)
app.command("decompose")(decompose.command)
app.command("train-tokenizer")(train_tokenizer.command)
app.command("extract-tokens")(extract_tokens.command)
app.command("train-transformer")(train_transformer.command)
app.command("train-evaluator")(train_evaluator.command)
app.command("evaluate")(evaluate.command)
app.command("sample")(sample.command)
app.command("sample-fid")(sample_fid.command)
app.command("reference-stats")(sample_fid.reference_stats_command)
app.command("experiments")(experiments.command)
app.command("tables")(tables.command)
app.command("plan")(plan.command)
app.command("import-var")(var_checkpoints.import_command)
app.command("export-var")(var_checkpoints.export_command)

_PACKAGES = (
    "cart",
    "torch",
    "torchvision",
    "numpy",
    "webdataset",
    "dvc",
    "dvclive",
    "lpips",
    "torch-fidelity",
    "opencv-python-headless",
    "pydantic",
    "typer",
)


@app.command("info")
def info(params: ParamsOption = Path("params.yaml")) -> None:
    """Print package versions, the compute device and the parameter file in use (and whether it is valid)."""
    import torch

    from pipeline.config import ConfigError
    from pipeline.params import load_params
    from pipeline.runtime import describe_device, resolve_device

    rows = []
    for name in _PACKAGES:
        try:
            rows.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            rows.append((name, "not installed"))
    rows.append(("device", describe_device(resolve_device("auto"))))
    rows.append(("cuda devices", torch.cuda.device_count()))
    try:
        load_params(params)
        rows.append(("params", f"{params.resolve()} (valid)"))
    except ConfigError as err:
        rows.append(("params", f"{params.resolve()} (INVALID: {len(err.problems)} problem(s); see `cart shard`)"))
    summary("cart info", rows)
