"""`cart decompose`: data/shards → data/decomposed, the recursive Ambrosio–Tortorelli base–detail split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages import paths
from stages.common import ParamsOption, console, load, one_run_at_a_time, progress, reports_errors, summary


@reports_errors
@one_run_at_a_time("decompose")
def command(
    params: ParamsOption = Path("params.yaml"),
    inp: Annotated[Path, typer.Option("--in", help="Image shards written by `cart shard`.")] = paths.SHARDS,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output directory (default data/decomposed; swapped in when every shard is done). With --preview: "
            "the figure's PNG path (default decomposition.png)."
        ),
    ] = None,
    reports: Annotated[
        Path, typer.Option(help="Where the Figure-3 previews of val images go.")
    ] = paths.DECOMPOSE_REPORTS,
    preview: Annotated[
        Path | None,
        typer.Option(help="Instead of the stage: decompose this one image file and draw its Figure 3 to --out."),
    ] = None,
) -> None:
    """Decompose every image into bases B_1 … B_n by minimising the Ambrosio–Tortorelli energy (paper eq. 8).

    Writes `data/decomposed/{train,val}` shards (image, bases as losslessly compressed float16, class) and a
    manifest with the mean energy of each detail level; details are derived as differences. Killed midway and
    rerun, the stage keeps the shards it finished. Under `torchrun --nproc_per_node=N` each process takes its share
    of the shards (one GPU each) and the output is the same as one process writes. `--preview IMAGE --out fig.png`
    draws one image's decomposition instead.
    """
    cfg = load(params).decompose
    if preview is not None:
        _preview(preview, out or Path("decomposition.png"), cfg)
        return
    out = out or paths.DECOMPOSED
    from pipeline.data.decomposed import decompose_splits

    with progress() as bar:
        manifest = decompose_splits(inp, out, cfg, bar)
    if manifest is None:
        return  # a torchrun rank other than 0: rank 0 wrote the manifest, draws the previews and reports
    _write_previews(out / "val", reports, cfg)
    rows = [("order", cfg.order)]
    for split, info in manifest["splits"].items():
        energy = ", ".join(f"D{k + 1} {e:.2e}" for k, e in enumerate(info["mean_detail_energy"]))
        rows.append((split, f"{info['count']} images; mean detail energy {energy or '-'}"))
        if info["unconverged_solves"]:
            rows.append((f"{split} unconverged", f"{info['unconverged_solves']} solves hit outer_iterations"))
    summary(f"decompose → {out}", rows)


def _write_previews(val_dir: Path, reports: Path, cfg) -> None:
    from pipeline.atomic import atomic_dir
    from pipeline.data.decompose import decompose
    from pipeline.data.decomposed import first_samples
    from pipeline.evaluation.figures import decomposition_figure

    # Drawn beside the old previews and swapped in whole, so a failure leaves those; the directory is a DVC
    # output even when empty (order 0: nothing to draw).
    with atomic_dir(reports) as drawing:
        if cfg.order == 0 or cfg.preview_count == 0:
            return
        for key, image, _ in first_samples(val_dir, cfg.preview_count):
            # The edge fields are not stored in the shards: solve the few preview images again to draw them.
            result = decompose(image[None], cfg)
            edges = result.edges_NKHW[0]
            decomposition_figure(image, result.bases_NKCHW[0], edges, drawing / f"{key}.png", title=key)


def _preview(image_path: Path, fig: Path, cfg) -> None:
    import torch

    from pipeline.data.decompose import decompose
    from pipeline.data.sources import decode_rgb
    from pipeline.evaluation.figures import decomposition_figure

    if not image_path.is_file():
        raise FileNotFoundError(f"--preview {image_path}: no such file")
    rgb = decode_rgb(image_path.read_bytes())
    if rgb is None:
        raise ValueError(f"--preview {image_path}: not a decodable image")
    if cfg.order == 0:
        raise ValueError("decompose.order is 0: there is nothing to preview (set decompose.order ≥ 1)")
    image = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    result = decompose(image[None], cfg)
    decomposition_figure(image, result.bases_NKCHW[0], result.edges_NKHW[0], fig, title=image_path.name)
    console.print(f"wrote {fig} ({rgb.shape[1]}×{rgb.shape[0]}, order {cfg.order})")
