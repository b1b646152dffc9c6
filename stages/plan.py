"""`cart plan`: the token layout, sizes, FLOPs, GPU-hours and training memory of a params file; reads no data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from stages.common import ParamsOption, load, reports_errors


def _si(value: float, unit: str = "") -> str:
    for scale, prefix in ((1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def _hours(hours: float) -> str:
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.2g}"


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


@reports_errors
def command(
    params: ParamsOption = Path("params.yaml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON instead of tables.")] = False,
) -> None:
    """Print what the params will cost, without touching data: the token layout, parameter counts, FLOPs per image
    for training and sampling, GPU-hours per stage at `plan.mfu` of `plan.peak_tflops` on `plan.gpus` GPUs, and
    the memory per GPU of training the transformer at `transformer.train.batch_size`.

    FLOPs are model FLOPs (the transformer's `forward_flops`, the tokenizer's counted by PyTorch on the meta
    device); GPU-hours assume the stated utilisation; memory is an estimate from counted parts (see
    `pipeline/plan.py`). Decompose (an iterative solver, memory-bound) is not priced: time it on one shard.
    """
    from pipeline.plan import GIB, as_dict, make_plan

    p = load(params)
    plan = make_plan(p)
    out = Console(highlight=False)  # stdout: the plan is this command's output
    if as_json:
        out.print_json(json.dumps(as_dict(plan)))
        return
    c = plan.config
    t = p.transformer
    base = sum(not label.startswith("D") for label in plan.maps)
    layout = f"{' '.join(plan.maps[:base])} (base)" + (
        f" + {', '.join(plan.maps[base:])}" if base < len(plan.maps) else ""
    )
    model = t.model
    out.print(
        _table(
            f"cart plan: {params}",
            ["", ""],
            [
                ["data", f"{plan.classes} classes, {plan.train_images:,} train images at {p.data.resolution} px"],
                ["token maps", f"{len(plan.maps)}: {layout}"],
                ["tokens per image", f"{plan.tokens}"],
                [
                    "tokenizer",
                    f"{plan.tokenizer_parameters / 1e6:.1f} M parameters, V = {p.tokenizer.model.codebook_size}, "
                    f"C = {p.tokenizer.model.latent_channels}, order {p.decompose.order}",
                ],
                [
                    "transformer",
                    f"{plan.transformer_parameters / 1e6:.1f} M parameters (depth {model.depth}, width "
                    f"{model.resolved_width}, heads {model.resolved_heads})",
                ],
                [
                    "batch",
                    f"{plan.global_batch} = {t.train.batch_size} per GPU × grad_accumulation "
                    f"{t.train.grad_accumulation} × {c.gpus} GPUs; {t.train.steps:,} steps = {plan.epochs:.1f} epochs",
                ],
            ],
        )
    )
    out.print(
        _table(
            "FLOPs per image (model FLOPs)",
            ["", "FLOPs"],
            [
                ["encode (tokenizer encoder, one level)", _si(plan.encode_flops)],
                ["decode (tokenizer decoder)", _si(plan.decode_flops)],
                ["train the transformer (3 × forward)", _si(plan.transformer_train_flops)],
                ["sample (transformer under guidance + decode)", _si(plan.sample_flops)],
            ],
        )
    )
    out.print(
        _table(
            f"Runs on {c.gpus} GPUs at {c.mfu:.0%} MFU of {c.peak_tflops:g} TFLOP/s (assumed)",
            ["stage", "images", "FLOPs/image", "FLOPs", "GPU-hours", "hours"],
            [
                [
                    run.stage,
                    f"{run.images:,}",
                    _si(run.flops_per_image),
                    _si(run.flops),
                    _hours(plan.gpu_hours(run)),
                    _hours(plan.gpu_hours(run) / c.gpus),
                ]
                for run in plan.runs
            ],
        )
    )
    for run in plan.runs:
        out.print(f"  {run.stage}: {run.note}")
    fits = "fits" if plan.memory_total <= c.gpu_memory_gib * GIB else "DOES NOT FIT"
    rows = [[part, f"{size / GIB:.2f}"] for part, size in plan.memory.items()]
    rows.append([f"total ({fits} in {c.gpu_memory_gib:g} GiB)", f"{plan.memory_total / GIB:.2f}"])
    out.print(
        _table(f"Memory per GPU, training the transformer at batch {t.train.batch_size} (estimate)", ["", "GiB"], rows)
    )
