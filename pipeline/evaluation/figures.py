"""Figures of the pipeline's reports, written as PNG files atomically (complete or absent)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only: no display, and the same output on every machine

import numpy as np
import torch
from matplotlib.figure import Figure

from pipeline import atomic
from pipeline.data.decompose import details
from pipeline.models.tokenizer import Tokenizer


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def _as_image(x_CHW: np.ndarray) -> np.ndarray:
    """(C, H, W) in [0, 1] → what imshow draws: RGB as (H, W, 3), one channel as (H, W)."""
    return np.clip(x_CHW[0] if x_CHW.shape[0] == 1 else x_CHW.transpose(1, 2, 0), 0.0, 1.0)


def decomposition_figure(image_CHW, bases_KCHW, edges_KHW, path: str | os.PathLike, title: str | None = None) -> None:
    """The paper's Figure 3 for one image: I and its bases B_1..B_n, the details D_1..D_n, the edge fields s.

    Details are drawn as their mean over channels with a diverging colormap stretched symmetrically to the 99.5th
    percentile of |D_k| (each level has its own colour bar, as amplitudes differ by level); edge fields share [0, 1].
    """
    image, bases, edges = _numpy(image_CHW), _numpy(bases_KCHW), _numpy(edges_KHW)
    levels = bases.shape[0]
    detail = _numpy(details(torch.from_numpy(image)[None], torch.from_numpy(bases)[None])[0])
    rows, cols = (3, levels + 1) if levels else (1, 1)
    fig = Figure(figsize=(2.2 * cols + 0.6, 2.2 * rows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    for ax in axes.flat:
        ax.set_axis_off()
    # Small images are drawn as blocks of pixels, not blurred by interpolation.
    style = {"interpolation": "nearest"}
    axes[0, 0].imshow(_as_image(image), cmap="gray", vmin=0, vmax=1, **style)
    axes[0, 0].set_title("I")
    for k in range(levels):
        axes[0, k + 1].imshow(_as_image(bases[k]), cmap="gray", vmin=0, vmax=1, **style)
        axes[0, k + 1].set_title(f"$B_{k + 1}$")
        d_HW = detail[k].mean(0)
        # A few isolated pixels can dominate max|D|; stretching to a high percentile keeps the texture visible.
        limit = float(np.percentile(np.abs(d_HW), 99.5)) or 1.0
        shown = axes[1, k + 1].imshow(d_HW, cmap="RdBu_r", vmin=-limit, vmax=limit, **style)
        axes[1, k + 1].set_title(f"$D_{k + 1}$ (channel mean)")
        fig.colorbar(shown, ax=axes[1, k + 1], fraction=0.046, pad=0.04, extend="both")
        edge = axes[2, k + 1].imshow(edges[k], cmap="magma", vmin=0, vmax=1, **style)
        axes[2, k + 1].set_title(f"$s_{k + 1}$ (edges)")
    if levels:
        fig.colorbar(edge, ax=list(axes[2, 1:]), fraction=0.046 / levels, pad=0.02)
    if title:
        fig.suptitle(title)
    with atomic.writing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> None:
    with atomic.writing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def depth_curves_figure(curves: dict[str, list[float]], path: str | os.PathLike, title: str) -> None:
    """Paper Figure 7: reconstruction MSE against the number of token maps decoded, one curve per tokenizer."""
    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.subplots()
    for name, mse in curves.items():
        depth = np.arange(1, len(mse) + 1)
        ax.plot(depth, mse, marker="o", label=name)
    ax.set_xlabel("quantisation depth (token maps decoded)")
    ax.set_ylabel("MSE to I (val)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def image_grid(columns: list[tuple[str, torch.Tensor]], path: str | os.PathLike, title: str | None = None) -> None:
    """Titled columns of images: each entry is (title, images_N3HW in [0, 1]); row i shows image i of each."""
    rows = min(len(images) for _, images in columns)
    fig = Figure(figsize=(1.3 * len(columns), 1.3 * rows + 0.5), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, len(columns), squeeze=False))
    for c, (name, images) in enumerate(columns):
        data = _numpy(images)
        for r in range(rows):
            axes[r, c].imshow(_as_image(data[r]), interpolation="nearest", vmin=0, vmax=1)
            axes[r, c].set_axis_off()
        axes[0, c].set_title(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def prefix_decodes_figure(
    tokenizer: Tokenizer, image_B3HW: torch.Tensor, bases_BK3HW: torch.Tensor, path: str | os.PathLike
) -> None:
    """The tokenizer's reconstructions of a few images, one column per component prefix: each prefix decode beside
    the base B_n … B_1 it should reproduce, and all maps beside I."""
    tokens = tokenizer.tokenize(image_B3HW, bases_BK3HW)
    ends = tokenizer.layout.component_ends()
    columns = [("input I", image_B3HW)]
    for p, end in enumerate(ends):
        label = "all maps ≈ I" if p == tokenizer.order else f"{end} maps ≈ B{tokenizer.order - p}"
        columns.append((label, tokenizer.decode_prefix(tokens, end)))
    if tokenizer.order:
        columns.insert(1, (f"B{tokenizer.order} (target)", bases_BK3HW[:, tokenizer.order - 1]))
    image_grid(columns, path, title="Tokenizer reconstructions (val): prefix decodes")


def labelled_rows(rows: list[tuple[str, torch.Tensor]], path: str | os.PathLike, title: str | None = None) -> None:
    """One row of images per entry (label, images_N3HW in [0, 1]), the label on the left: sample grids."""
    columns = max(len(images) for _, images in rows)
    fig = Figure(figsize=(0.9 * columns + 1.2, 0.9 * len(rows) + 0.5), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), columns, squeeze=False))
    for r, (name, images) in enumerate(rows):
        data = _numpy(images)
        for c in range(columns):
            axes[r, c].set_axis_off()
            if c < len(data):
                axes[r, c].imshow(_as_image(data[c]), interpolation="nearest", vmin=0, vmax=1)
        axes[r, 0].text(-0.1, 0.5, name, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
