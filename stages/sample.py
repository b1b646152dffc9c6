"""`cart sample`: draw images from a trained transformer into a PNG grid (or the paper's Figure-1 strip)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from stages import paths
from stages.common import ParamsOption, console, load, reports_errors


def _classes(text: str | None, names: list[str]) -> list[int]:
    if text is None:
        return list(range(len(names)))
    chosen = []
    for item in text.split(","):
        item = item.strip()
        index = names.index(item) if item in names else int(item) if item.isdigit() else -1
        if not 0 <= index < len(names):
            raise ValueError(f"--classes {text}: {item!r} is neither a class index below {len(names)} nor a name")
        chosen.append(index)
    return chosen


@reports_errors
def command(
    params: ParamsOption = Path("params.yaml"),
    checkpoint: Annotated[
        Path, typer.Option(help="Transformer weights: the stem of <stem>.safetensors + <stem>.json.")
    ] = paths.TRANSFORMER,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer stem (default: the one the transformer was trained with).")
    ] = None,
    classes: Annotated[
        str | None, typer.Option(help="Comma-separated class indices or names (default: every class).")
    ] = None,
    n: Annotated[int, typer.Option(min=1, help="Images per class.")] = 8,
    cfg: Annotated[
        float | None, typer.Option("--cfg", help="Guidance weight (1 = none); default transformer.sampling.guidance.")
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="Top-k filtering (0: off); default from params.")] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Top-p (nucleus) filtering (0: off); default from params.")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature; default from params.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed (the same seed gives the same images).")] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="ema: the moving average of the weights when training kept one (<checkpoint>_ema), else the "
            "weights; raw: the trained weights. Default transformer.sampling.weights."
        ),
    ] = None,
    progressive: Annotated[
        bool, typer.Option(help="Write the Figure-1 strip instead: each sample decoded after every token map.")
    ] = False,
    scale: Annotated[
        int, typer.Option(min=1, max=4, help="Generate at this multiple of the trained resolution (§4.2.1).")
    ] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[Path, typer.Option(help="Output PNG.")] = Path("samples.png"),
) -> None:
    """Sample images of the chosen classes and write them as a grid, one row per class.

    Guidance, top-k, top-p, temperature and seed default to `transformer.sampling` in params.yaml; the same
    seed gives the same images. `--progressive` writes the paper's Figure-1 strip: each sample decoded after
    every token map (base scales, then each detail level). `--scale 2` generates at twice the trained resolution
    without retraining and writes it beside a bilinear upsampling of the plain sample.
    """
    import torch

    from pipeline.config import InvalidInput
    from pipeline.evaluation.figures import image_grid, labelled_rows
    from pipeline.evaluation.sampling import sample_images
    from pipeline.models.tokenizer import load_tokenizer
    from pipeline.models.transformer import load_transformer, sampling_stem
    from pipeline.runtime import resolve_device

    p = load(params)
    overrides = {"guidance": cfg, "top_k": top_k, "top_p": top_p, "temperature": temperature, "seed": seed}
    if weights not in (None, "ema", "raw"):
        raise InvalidInput(f"--weights {weights}: ema or raw")
    overrides["weights"] = weights
    sampling = dataclasses.replace(
        p.transformer.sampling.resolved(), **{k: v for k, v in overrides.items() if v is not None}
    )
    target = resolve_device(device)
    stem, used = sampling_stem(checkpoint, sampling.weights)
    model, config = load_transformer(stem, target)
    tok, _ = load_tokenizer(tokenizer or Path(config["tokenizer"]), target)
    names = config.get("classes") or [str(i) for i in range(config["num_classes"])]
    chosen = _classes(classes, names)
    labels = torch.tensor(chosen).repeat_interleave(n)
    if scale > 1:
        from pipeline.evaluation.highres import highres_figure

        highres_figure(model, tok, labels, sampling, scale, out, p.evaluate.highres)
        console.print(f"wrote {out} ({len(labels)} samples at {scale}× the trained resolution)")
        return
    samples = sample_images(model, tok, labels, sampling, progressive=progressive)
    if progressive:
        layout = model.layout
        titles = [f"{m.side}²" if m.is_base else f"+D{m.level}" for m in layout.maps]
        columns = [(t, samples.prefixes_NM3HW[:, m]) for m, t in enumerate(titles)]
        image_grid(columns, out, title="Decoded after each token map: base scales, then details D_n … D_1")
    else:
        rows = [(names[c], samples.images_N3HW[i * n : (i + 1) * n]) for i, c in enumerate(chosen)]
        labelled_rows(rows, out, title=f"guidance {sampling.guidance:g}, seed {sampling.seed}")
    console.print(f"wrote {out} ({len(labels)} samples, {used} weights {stem})")
