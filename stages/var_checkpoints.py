"""`cart import-var` and `cart export-var`: VAR's released checkpoints in, our order-0 models out in VAR's layout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import reports_errors, summary


def _scales(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        scales = [int(s) for s in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: comma-separated integers, e.g. 1,2,3,4,5,6,8,10,13,16") from None
    if any(b <= a for a, b in zip(scales, scales[1:], strict=False)) or min(scales) < 1:
        raise typer.BadParameter(f"{text!r}: the sides must be positive and increasing")
    return scales


@reports_errors
def import_command(
    vae: Annotated[Path, typer.Option(help="VAR's VQVAE state dict, e.g. vae_ch160v4096z32.pth.")],
    out: Annotated[Path, typer.Option(help="Directory to write tokenizer.* (and transformer.*) into.")],
    var: Annotated[Path | None, typer.Option(help="VAR's transformer state dict, e.g. var_d16.pth (optional).")] = None,
    scales: Annotated[
        str | None,
        typer.Option(help="Token-map sides, e.g. 1,2,3,4,5,6,8,10,13,16 (default: from --var, else 256 px)."),
    ] = None,
) -> None:
    """Read VAR's released checkpoints into this pipeline's models (order 0 = VAR exactly).

    Every size is read off the tensors; files are read with `torch.load(weights_only=True)`, so no pickled code
    runs. `cart sample --checkpoint OUT/transformer` then draws from VAR's model, and `tokenizer.init_from:
    OUT/tokenizer` / `transformer.init_from: OUT/transformer` start training from it. Anything that is not such a
    checkpoint exits with 2, naming the file and key, and writes nothing.
    """
    from pipeline.models.var_checkpoints import import_var

    result = import_var(vae, var, out, _scales(scales))
    summary("import-var", list(result.items()))


@reports_errors
def export_command(
    tokenizer: Annotated[Path, typer.Option(help="Tokenizer stem (order 0), e.g. models/tokenizer/tokenizer.")],
    out: Annotated[Path, typer.Option(help="Directory to write VAR's .pth files and var_config.json into.")],
    transformer: Annotated[
        Path | None, typer.Option(help="Transformer stem (optional), e.g. models/transformer/transformer.")
    ] = None,
) -> None:
    """Write an order-0 tokenizer (and transformer) trained here as VAR's state dicts, for VAR's own code.

    `var_config.json` lists the constructor arguments (VQVAE's and VAR's) that rebuild the networks; the state
    dicts then load with `load_state_dict(strict=True)`. A model VAR's code cannot hold exits with 2.
    """
    from pipeline.models.var_checkpoints import export_var

    result = export_var(tokenizer, transformer, out)
    summary("export-var", list(result.items()))
