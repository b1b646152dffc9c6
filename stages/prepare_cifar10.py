"""`cart prepare-cifar10`: CIFAR-10 from an archive the user has, or downloaded, as ImageFolder train and test trees."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.common import load, progress, reports_errors, summary


@reports_errors
def command(
    archive: Annotated[
        Path | None,
        typer.Option(
            help="cifar-10-binary.tar.gz, cifar-10-python.tar.gz or an ImageFolder tar (train/CLASS/IMAGE, "
            "optionally test/CLASS/IMAGE). Without it torchvision's downloader fetches cifar-10-python.tar.gz.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder: OUT/train/CLASS/, OUT/test/CLASS/.")] = Path(
        "data/cifar10"
    ),
    downloads: Annotated[Path, typer.Option(help="Where the downloaded archive is kept.")] = Path("data/downloads"),
    params: Annotated[
        Path | None,
        typer.Option("--params", help="Without --archive: take the archive from this file's data.archive."),
    ] = None,
) -> None:
    """Write CIFAR-10 as ImageFolder trees for `data.source` (the `cifar10` source does this itself, in the shard
    stage). A damaged or wrong archive stops with exit 2 and writes nothing; the output is swapped in only when
    complete. The python version's pickles are read without running code (only numpy arrays are rebuilt)."""
    from pipeline.data import cifar10

    if archive is None and params is not None:
        archive = load(params).data.archive
    with progress() as bar:
        manifest = cifar10.ensure(archive, out, downloads, bar)
    rows = [("archive", manifest["archive"]), ("format", manifest["format"])]
    for split, per_class in manifest["splits"].items():
        rows.append((split, f"{sum(per_class.values())} images in {len(per_class)} classes ({out / split})"))
    summary(f"prepare-cifar10 → {out}", rows)
