"""The token dataset: decomposed shards → every image's token maps (Algorithm 1), what the transformer trains on.

One output shard per input shard; per sample ``tokens.npy`` (int16, all token maps concatenated in generation
order: base scales, then the detail maps of D_n … D_1) and ``cls``. The manifest records the token layout so a
reader can split the sequence back into maps without the tokenizer.

A continuous tokenizer's tokens are vectors: ``tokens.npy`` is float16 (L × C), the same order, and the manifest
says ``"quantize": "continuous"`` and gives every map's token RMS over the first train images (``token_rms``), the
scale the diffusion head standardises each map's tokens by.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline import atomic
from pipeline.config import Field, section
from pipeline.data import shards
from pipeline.data.decomposed import SPLITS, decode_training_sample, split_shards
from pipeline.models.tokenizer import Tokenizer, TokenLayout, load_tokenizer
from pipeline.models.weights import config_path
from pipeline.progress import Progress, Silent
from pipeline.runtime import barrier, init_data_parallel, open_resumable, resolve_device, todo_share


@section
class ExtractTokensConfig:
    batch_size: int = Field(256, ge=1, description="Images tokenized together.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = CUDA when visible.")


def flatten_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """Token maps (generation order) → one sequence: idx_Bhw → idx_BL, or continuous z_BChw → z_BLC."""
    if maps[0].is_floating_point():
        return torch.cat([z.flatten(2).transpose(1, 2) for z in maps], dim=1)
    return torch.cat([idx.flatten(1) for idx in maps], dim=1)


def split_maps(tokens_BL: torch.Tensor, layout: TokenLayout) -> list[torch.Tensor]:
    """The inverse of ``flatten_maps``: idx_BL → [idx_Bhw], or z_BLC → [z_BChw], in generation order."""
    if tokens_BL.shape[1] != layout.num_tokens:
        raise ValueError(f"{tokens_BL.shape[1]} tokens per image, but the layout has {layout.num_tokens}")
    spans = zip(layout.maps, layout.offsets, layout.offsets[1:], strict=False)
    if tokens_BL.is_floating_point():
        return [tokens_BL[:, a:b].transpose(1, 2).unflatten(2, (m.side, m.side)) for m, a, b in spans]
    return [tokens_BL[:, a:b].view(-1, m.side, m.side) for m, a, b in spans]


def layout_from_manifest(manifest: dict[str, Any]) -> TokenLayout:
    return TokenLayout.from_json(manifest["layout"])


def decode_token_sample(raw: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """(idx_L as int64, or continuous z_LC as float32; cls): what the transformer trains on."""
    tokens = shards.decode_npy(raw["tokens.npy"])
    dtype = np.float32 if tokens.dtype == np.float16 else np.int64
    return torch.from_numpy(tokens.astype(dtype)), int(raw["cls"])


def token_rms(urls: list[str], layout: TokenLayout, max_images: int = 1024) -> list[float]:
    """Per map, the RMS of the continuous tokens of the first ``max_images`` images of ``urls`` (in order)."""
    sums, count = torch.zeros(layout.num_maps, dtype=torch.float64), 0
    map_of_token_L = torch.repeat_interleave(torch.arange(layout.num_maps), torch.tensor(layout.lengths))
    for raw in shards.read_samples(urls):
        z_LC = decode_token_sample(raw)[0].double()
        sums.index_add_(0, map_of_token_L, z_LC.square().mean(1))
        count += 1
        if count == max_images:
            break
    return (sums / (torch.tensor(layout.lengths) * max(count, 1))).sqrt().tolist()


@torch.no_grad()
def tokenize_shard(samples: list[dict[str, Any]], tokenizer: Tokenizer, batch_size: int) -> list[dict[str, Any]]:
    device = next(tokenizer.parameters()).device
    out = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        decoded = [shards.decoded(raw, decode_training_sample) for raw in chunk]
        image = torch.stack([d[0] for d in decoded]).to(device)
        bases = torch.stack([d[1] for d in decoded]).to(device)
        # Continuous tokens keep half precision: the tokens of the residual's finest detail are small numbers, and
        # every stored token is what teacher forcing composes the inputs from, as sampling will.
        dtype = np.float16 if tokenizer.continuous else np.int16
        tokens_BL = flatten_maps(tokenizer.tokenize(image, bases)).cpu().numpy().astype(dtype)
        for raw, tokens_L in zip(chunk, tokens_BL, strict=True):
            out.append({"__key__": raw["__key__"], "tokens.npy": shards.encode_npy(tokens_L), "cls": raw["cls"]})
    return out


def extract_tokens(
    tokenizer_stem: str | Path,
    in_dir: str | Path,
    out_dir: str | Path,
    cfg: ExtractTokensConfig,
    progress: Progress | None = None,
) -> dict[str, Any] | None:
    """Tokenize ``in_dir/{train,val}`` into ``out_dir/{train,val}`` plus ``manifest.json``; resumable per shard.

    Under torchrun each rank tokenizes its share of the shards on its own device; rank 0 writes the manifest once
    all are done and returns it (the other ranks return None). The output does not depend on the number of ranks.
    """
    in_dir, progress = Path(in_dir), progress or Silent()
    source = json.loads((in_dir / "manifest.json").read_text())
    device = resolve_device(cfg.device)
    dist = init_data_parallel(device)
    tokenizer, config = load_tokenizer(tokenizer_stem, device)
    if config["order"] != source["order"]:
        raise ValueError(
            f"{config_path(tokenizer_stem)} is an order-{config['order']} tokenizer but {in_dir} holds order-"
            f"{source['order']} decompositions: rerun train_tokenizer"
        )
    stem = Path(tokenizer_stem)
    inputs = atomic.files_fingerprint(in_dir), atomic.files_fingerprint(stem.parent)
    work = open_resumable(out_dir, atomic.fingerprint(inputs), dist)
    urls = {split: split_shards(in_dir / split) for split in SPLITS}
    names = {url: f"{split}/{Path(url).name}" for split in SPLITS for url in urls[split]}
    for split in SPLITS:
        work.path(split).mkdir(exist_ok=True)
    mine = todo_share(list(names), lambda url: work.done(names[url]), dist)
    progress.start("extract tokens", sum(shards.count_samples(url) for url in mine), unit="images")
    for url in mine:
        samples = tokenize_shard(list(shards.read_shard(url)), tokenizer, cfg.batch_size)
        with atomic.writing(work.path(names[url])) as tmp:
            shards.write_shard(tmp, samples)
        progress.advance(len(samples))
    barrier(dist)
    if not dist.is_main:
        return None
    counts = {split: sum(shards.count_samples(str(work.path(names[url]))) for url in urls[split]) for split in SPLITS}
    layout = tokenizer.layout
    manifest = {
        "splits": {split: {"count": counts[split], "shards": len(urls[split])} for split in SPLITS},
        "classes": source["classes"],
        "resolution": source["resolution"],
        "order": layout.order,
        "detail_depth": layout.detail_depth,
        "scales": tokenizer.cfg.scales,
        "codebook_size": tokenizer.cfg.codebook_size,
        "latent_channels": tokenizer.cfg.latent_channels,
        "layout": layout.to_json(),
        "tokenizer": str(stem),
    }
    if tokenizer.continuous:
        train_urls = [str(work.path(names[url])) for url in urls["train"]]
        manifest |= {"quantize": "continuous", "token_rms": token_rms(train_urls, layout)}
    atomic.write_json(work.path("manifest.json"), manifest)
    work.finish()
    return manifest
