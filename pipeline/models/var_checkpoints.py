"""VAR's checkpoints (FoundationVision/VAR): its released weights read into this pipeline, and ours written as VAR's.

VAR releases plain PyTorch state dicts: the tokenizer ``vae_ch160v4096z32.pth`` (VQVAE) and the transformers
``var_d16.pth`` … ``var_d30.pth``. Our order-0 tokenizer and transformer are VAR's networks, so the conversion is a
renaming plus two reshapes; every size is read off the tensors. Key mapping, VAR → ours:

VQVAE
  encoder.*, decoder.*, quant_conv.*, post_quant_conv.*       the same names (our conv nets use LDM's module tree)
  quantize.embedding.weight                                   codebook.weight
  quantize.quant_resi.qresi_ls.{k}.weight / .bias             phi.convs.{k}.weight / .bias
  quantize.ema_vocab_hit_SV                                   not imported (usage statistics; exported as zeros)
VAR
  class_emb.weight                                            class_embed.weight
  pos_start (1, l₀, C)                                        start_embed.weight (l₀, C)
  pos_1LC (1, L, C)                                           pos_embed.weight (L, C)
  lvl_embed.weight                                            level_embed.weight
  word_embed.weight / .bias                                   input_embed.weight / .bias
  blocks.{i}.attn.mat_qkv.weight                              blocks.{i}.attn.qkv.weight
  blocks.{i}.attn.q_bias, .v_bias                             blocks.{i}.attn.q_bias, .v_bias
  blocks.{i}.attn.scale_mul_1H11 (1, H, 1, 1)                 blocks.{i}.attn.log_scale_H (H)
  blocks.{i}.attn.proj.*                                      blocks.{i}.attn.proj.*
  blocks.{i}.ffn.fc1.*, .fc2.*                                blocks.{i}.fc1.*, .fc2.*
  blocks.{i}.ada_lin.1.weight / .bias (6C rows each)          ada_lin rows 6C·i … 6C·(i+1)
  head_nm.ada_lin.1.weight / .bias (2C rows)                  ada_lin's last 2C rows
  head.weight / .bias                                         head.weight / .bias
  lvl_1L, attn_bias_for_masking, blocks.{i}.attn.zero_k_bias  not imported (buffers derived from the layout)

Files are read with ``torch.load(weights_only=True)``: tensors only, no pickled code runs. Anything that is not
exactly such a checkpoint raises ``CheckpointError`` naming the file, the key, and the expected and found shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline import atomic
from pipeline.config import InvalidInput
from pipeline.models.heads import SoftmaxHead
from pipeline.models.tokenizer import Tokenizer, TokenizerModelConfig, load_tokenizer, save_tokenizer
from pipeline.models.transformer import CART, TransformerModelConfig, load_transformer, save_transformer

# VAR's published token-map schedules, recognised by their token count L (its 256 px and 512 px models).
VAR_SCHEDULES = {
    680: [1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
    2240: [1, 2, 3, 4, 6, 9, 13, 18, 24, 32],
}
VAR_256_SCALES = VAR_SCHEDULES[680]
VAR_GROUPS = 32  # VAR's Normalize: GroupNorm(32, C) everywhere


class CheckpointError(InvalidInput):
    """A file that is not the VAR checkpoint it should be, or a model that VAR's code cannot hold."""


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A VAR state dict from ``path``: a plain one (the released files) or inside VAR's trainer checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, a pickle with code, not a torch file at all: all the same to a user
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and isinstance(state.get("trainer"), dict):  # VAR's ar-ckpt-*.pth
        trainer = state["trainer"]
        state = trainer.get("var_wo_ddp", trainer.get("vae_local"))
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    odd = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if odd:
        raise CheckpointError(f"{path}: entry {odd[0]!r} is not a named tensor: not a VAR state dict")
    return state


def _kind(state: dict[str, torch.Tensor]) -> str | None:
    if "quantize.embedding.weight" in state:
        return "vae"
    if "class_emb.weight" in state:
        return "var"
    return None


def _expect_kind(state: dict[str, torch.Tensor], path: Path, kind: str) -> None:
    found = _kind(state)
    if found == kind:
        return
    option = {"vae": "--vae", "var": "--var"}
    if found is not None:
        raise CheckpointError(
            f"{path}: this is a VAR {'VQVAE' if found == 'vae' else 'transformer'} checkpoint, given as "
            f"{option[kind]}: pass it as {option[found]}"
        )
    marker = "quantize.embedding.weight" if kind == "vae" else "class_emb.weight"
    raise CheckpointError(
        f"{path}: not a VAR {'VQVAE' if kind == 'vae' else 'transformer'} checkpoint: no key {marker!r} "
        f"(first keys: {', '.join(list(state)[:4])})"
    )


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    n = 0
    while pattern.format(n) in state:
        n += 1
    return n


def _shape(state: dict[str, torch.Tensor], key: str, path: Path, dims: int) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{path}: key {key!r} is missing")
    shape = tuple(state[key].shape)
    if len(shape) != dims:
        raise CheckpointError(f"{path}: key {key!r} has shape {shape}, expected a {dims}-d tensor")
    return shape


def vae_config(state: dict[str, torch.Tensor], path: Path, scales: list[int]) -> TokenizerModelConfig:
    """The tokenizer architecture a VQVAE state dict was made with, read off its tensor shapes."""
    channels = _shape(state, "encoder.conv_in.weight", path, 4)[0]
    levels = _count(state, "encoder.down.{}.block.0.conv1.weight")
    if levels == 0:
        raise CheckpointError(f"{path}: key 'encoder.down.0.block.0.conv1.weight' is missing")
    widths = [_shape(state, f"encoder.down.{i}.block.0.conv1.weight", path, 4)[0] for i in range(levels)]
    if any(w % channels for w in widths):
        raise CheckpointError(
            f"{path}: level widths {widths} are not multiples of encoder.conv_in's {channels} channels"
        )
    codebook_size, latent_channels = _shape(state, "quantize.embedding.weight", path, 2)
    phi_convs = _count(state, "quantize.quant_resi.qresi_ls.{}.weight")
    if phi_convs == 0:
        raise CheckpointError(
            f"{path}: key 'quantize.quant_resi.qresi_ls.0.weight' is missing (only VAR's partially shared φ, "
            "share_quant_resi > 1, is supported)"
        )
    return TokenizerModelConfig(
        channels=channels,
        channel_multipliers=[w // channels for w in widths],
        res_blocks=_count(state, "encoder.down.0.block.{}.conv1.weight"),
        attention_levels=[i for i in range(levels) if f"encoder.down.{i}.attn.0.qkv.weight" in state],
        mid_attention="encoder.mid.attn_1.qkv.weight" in state,
        quant_conv="quant_conv.weight" in state,
        latent_channels=latent_channels,
        codebook_size=codebook_size,
        scales=scales,
        detail_depth=1,
        phi_convs=phi_convs,
        phi_ratio=0.5,  # VAR's quant_resi: a constructor argument, not stored; 0.5 in every released model
        min_group_channels=1,  # VAR's GroupNorm has 32 groups at every width (halved only where 32 does not divide)
    )


def var_config(state: dict[str, torch.Tensor], path: Path) -> tuple[TransformerModelConfig, int, int, int]:
    """(architecture, classes, codebook size, latent channels) of a VAR transformer state dict."""
    depth = _count(state, "blocks.{}.attn.mat_qkv.weight")
    if depth == 0:
        raise CheckpointError(f"{path}: key 'blocks.0.attn.mat_qkv.weight' is missing")
    if "shared_ada_lin.1.weight" in state:
        raise CheckpointError(f"{path}: key 'shared_ada_lin.1.weight': shared AdaLN (VAR's saln) is not supported")
    rows, width = _shape(state, "class_emb.weight", path, 2)
    qk_norm = "blocks.0.attn.scale_mul_1H11" in state
    heads = _shape(state, "blocks.0.attn.scale_mul_1H11", path, 4)[1] if qk_norm else depth  # VAR: heads = depth
    hidden = _shape(state, "blocks.0.ffn.fc1.weight", path, 2)[0]
    codebook_size = _shape(state, "head.weight", path, 2)[0]
    latent_channels = _shape(state, "word_embed.weight", path, 2)[1]
    cfg = TransformerModelConfig(
        depth=depth, width=width, heads=heads, mlp_ratio=hidden / width, qk_norm=qk_norm, norm_eps=1e-6
    )
    return cfg, rows - 1, codebook_size, latent_channels


def scales_for(state: dict[str, torch.Tensor], path: Path) -> list[int]:
    """VAR's token-map schedule, recognised from the length of a transformer's position table."""
    L = _shape(state, "pos_1LC", path, 3)[1]
    if L not in VAR_SCHEDULES:
        raise CheckpointError(
            f"{path}: key 'pos_1LC' holds {L} positions, which no published VAR schedule has "
            f"({', '.join(f'{n}: {s}' for n, s in VAR_SCHEDULES.items())}): give the schedule with --scales"
        )
    return VAR_SCHEDULES[L]


# ---------------------------------------------------------------------------------------------------------------
# The key mapping, both ways


# (ours, VAR's) name prefixes of the tokenizer tensors that are renamed; every other name is the same.
_TOKENIZER_PREFIXES = [
    ("codebook.weight", "quantize.embedding.weight"),
    ("phi.convs.", "quantize.quant_resi.qresi_ls."),
]


def _renamed(key: str, pairs: list[tuple[str, str]]) -> str:
    for old, new in pairs:
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


def tokenizer_to_var(state: dict[str, torch.Tensor], num_maps: int) -> dict[str, torch.Tensor]:
    """Our tokenizer's state dict in VQVAE's names (with the usage buffer VAR's module registers)."""
    out = {_renamed(k, _TOKENIZER_PREFIXES): v for k, v in state.items()}
    out["quantize.ema_vocab_hit_SV"] = torch.zeros(num_maps, state["codebook.weight"].shape[0])
    return out


def tokenizer_from_var(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    back = [(var, ours) for ours, var in _TOKENIZER_PREFIXES]
    return {_renamed(k, back): v for k, v in state.items() if k != "quantize.ema_vocab_hit_SV"}


def _block_renames(i: int) -> list[tuple[str, str]]:
    """(VAR name, our name) of block i's tensors that map one to one."""
    pairs = [("attn.mat_qkv.weight", "attn.qkv.weight"), ("attn.q_bias", "attn.q_bias"), ("attn.v_bias", "attn.v_bias")]
    pairs += [(f"attn.proj.{p}", f"attn.proj.{p}") for p in ("weight", "bias")]
    pairs += [(f"ffn.{fc}.{p}", f"{fc}.{p}") for fc in ("fc1", "fc2") for p in ("weight", "bias")]
    return [(f"blocks.{i}.{var}", f"blocks.{i}.{ours}") for var, ours in pairs]


_TOP_RENAMES = [
    ("class_emb.weight", "class_embed.weight"),
    ("lvl_embed.weight", "level_embed.weight"),
    ("word_embed.weight", "input_embed.weight"),
    ("word_embed.bias", "input_embed.bias"),
    ("head.weight", "head.weight"),
    ("head.bias", "head.bias"),
]


def transformer_to_var(state: dict[str, torch.Tensor], depth: int, lengths: list[int]) -> dict[str, torch.Tensor]:
    """Our transformer's state dict in VAR's names, with the buffers VAR's module registers for this layout."""
    out = {var: state[ours] for var, ours in _TOP_RENAMES}
    out["pos_start"] = state["start_embed.weight"].unsqueeze(0)
    out["pos_1LC"] = state["pos_embed.weight"].unsqueeze(0)
    C = state["class_embed.weight"].shape[1]
    ada_w, ada_b = state["ada_lin.weight"], state["ada_lin.bias"]
    for i in range(depth):
        out |= {var: state[ours] for var, ours in _block_renames(i)}
        if f"blocks.{i}.attn.log_scale_H" in state:
            out[f"blocks.{i}.attn.scale_mul_1H11"] = state[f"blocks.{i}.attn.log_scale_H"].view(1, -1, 1, 1)
        out[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(C)
        out[f"blocks.{i}.ada_lin.1.weight"] = ada_w[6 * C * i : 6 * C * (i + 1)]
        out[f"blocks.{i}.ada_lin.1.bias"] = ada_b[6 * C * i : 6 * C * (i + 1)]
    out["head_nm.ada_lin.1.weight"] = ada_w[6 * C * depth :]
    out["head_nm.ada_lin.1.bias"] = ada_b[6 * C * depth :]
    map_L = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    out["lvl_1L"] = map_L.view(1, -1)
    visible_LL = map_L[:, None] >= map_L[None, :]
    out["attn_bias_for_masking"] = torch.where(visible_LL, 0.0, -torch.inf).view(1, 1, len(map_L), len(map_L))
    return {k: v.contiguous() for k, v in out.items()}


def transformer_from_var(state: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    out = {ours: state[var] for var, ours in _TOP_RENAMES}
    out["start_embed.weight"] = state["pos_start"][0]
    out["pos_embed.weight"] = state["pos_1LC"][0]
    ada_w, ada_b = [], []
    for i in range(depth):
        out |= {ours: state[var] for var, ours in _block_renames(i)}
        if f"blocks.{i}.attn.scale_mul_1H11" in state:
            out[f"blocks.{i}.attn.log_scale_H"] = state[f"blocks.{i}.attn.scale_mul_1H11"].flatten()
        ada_w.append(state[f"blocks.{i}.ada_lin.1.weight"])
        ada_b.append(state[f"blocks.{i}.ada_lin.1.bias"])
    out["ada_lin.weight"] = torch.cat([*ada_w, state["head_nm.ada_lin.1.weight"]])
    out["ada_lin.bias"] = torch.cat([*ada_b, state["head_nm.ada_lin.1.bias"]])
    return {k: v.contiguous() for k, v in out.items()}


def _check_against(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    """Every key VAR's module of this architecture has, with its shape, and no other: else name the first misfits."""
    problems = [
        f"key {k!r} is missing (expected shape {tuple(v.shape)})" for k, v in expected.items() if k not in found
    ]
    problems += [f"unexpected key {k!r} (shape {tuple(v.shape)})" for k, v in found.items() if k not in expected]
    problems += [
        f"key {k!r} has shape {tuple(found[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{path}: " + "; ".join(problems[:5]) + more)


def _check_zero(state: dict[str, torch.Tensor], keys: list[str], path: Path) -> None:
    for key in keys:
        if key in state and state[key].count_nonzero():
            raise CheckpointError(f"{path}: key {key!r} is not zero: VAR fixes the k bias at zero, and so do we")


# ---------------------------------------------------------------------------------------------------------------
# Import and export


def import_vae(path: Path, scales: list[int]) -> Tokenizer:
    state = read_state_dict(path)
    _expect_kind(state, path, "vae")
    try:
        tokenizer = Tokenizer(vae_config(state, path, scales), order=0)
    except ValueError as err:
        raise CheckpointError(f"{path}: no tokenizer of this pipeline has these shapes: {err}") from None
    # The usage buffer is optional and any size: VAR's own loader swaps in a fresh one when its rows differ.
    expected = tokenizer_to_var(tokenizer.state_dict(), tokenizer.layout.num_maps)
    expected.pop("quantize.ema_vocab_hit_SV")
    _check_against({k: v for k, v in state.items() if k != "quantize.ema_vocab_hit_SV"}, expected, path)
    tokenizer.load_state_dict(tokenizer_from_var(state))
    return tokenizer.eval()


def import_var_transformer(state: dict[str, torch.Tensor], path: Path, tokenizer: Tokenizer, vae_path: Path) -> CART:
    cfg, num_classes, codebook_size, latent_channels = var_config(state, path)
    tok = tokenizer.cfg
    if (codebook_size, latent_channels) != (tok.codebook_size, tok.latent_channels):
        raise CheckpointError(
            f"{path}: key 'head.weight' / 'word_embed.weight' give a {codebook_size}-code vocabulary of "
            f"{latent_channels}-d codes, but {vae_path} has {tok.codebook_size} codes of {tok.latent_channels} "
            "channels: not the VAE this transformer was trained with"
        )
    model = CART(cfg, tokenizer.layout, num_classes, codebook_size, latent_channels)
    _check_against(state, transformer_to_var(model.state_dict(), cfg.depth, tokenizer.layout.lengths), path)
    _check_zero(state, [f"blocks.{i}.attn.zero_k_bias" for i in range(cfg.depth)], path)
    model.load_state_dict(transformer_from_var(state, cfg.depth))
    return model.eval()


def import_var(vae: Path, var: Path | None, out: Path, scales: list[int] | None = None) -> dict[str, Any]:
    """VAR's VQVAE (and transformer) → ``out/tokenizer`` (and ``out/transformer``), order 0, written atomically.

    The schedule is ``scales`` if given, else the one the transformer's position table identifies, else VAR's
    256 px schedule. Returns a summary of what was written.
    """
    vae, var, out = Path(vae), Path(var) if var else None, Path(out)
    var_state = None
    if var is not None:
        var_state = read_state_dict(var)
        _expect_kind(var_state, var, "var")
    if scales is None:
        scales = VAR_256_SCALES if var_state is None else scales_for(var_state, var)
    tokenizer = import_vae(vae, list(scales))
    transformer = None if var_state is None else import_var_transformer(var_state, var, tokenizer, vae)
    resolution = scales[-1] * tokenizer.cfg.downsampling
    summary: dict[str, Any] = {"tokenizer": str(out / "tokenizer"), "resolution": resolution, "scales": list(scales)}
    with atomic.atomic_dir(out) as tmp:
        save_tokenizer(tmp / "tokenizer", tokenizer, resolution)
        if transformer is not None:
            extra = {"tokenizer": str(out / "tokenizer"), "imported_from": {"vae": str(vae), "var": str(var)}}
            save_transformer(tmp / "transformer", transformer, extra)
            summary |= {
                "transformer": str(out / "transformer"),
                "depth": transformer.cfg.depth,
                "classes": transformer.num_classes,
                "parameters": sum(p.numel() for p in transformer.parameters()),
            }
    return summary


def _exportable_tokenizer(tokenizer: Tokenizer, stem: Path) -> None:
    cfg = tokenizer.cfg
    if tokenizer.order != 0:
        raise CheckpointError(
            f"{stem}: an order-{tokenizer.order} tokenizer has detail maps, which VAR has not: only order 0 exports"
        )
    if tokenizer.continuous:
        raise CheckpointError(f"{stem}: continuous tokens have no codebook, which VAR's VQVAE needs")
    problems = []
    lowest = len(cfg.channel_multipliers) - 1
    if sorted({a % (lowest + 1) for a in cfg.attention_levels}) != [lowest]:
        problems.append(f"attention_levels {cfg.attention_levels} (VAR: the lowest level only, [-1])")
    if not cfg.mid_attention:
        problems.append("mid_attention false (VAR always has it)")
    if not cfg.quant_conv:
        problems.append("quant_conv false (VAR always has both 3×3 quant convs)")
    narrow = sorted({m.num_channels for m in tokenizer.modules() if isinstance(m, torch.nn.GroupNorm)})
    if any(c % VAR_GROUPS for c in narrow):
        problems.append(f"widths {narrow} (VAR's GroupNorm has 32 groups: every width must be a multiple of 32)")
    if problems:
        raise CheckpointError(f"{stem}: VAR's VQVAE cannot hold this tokenizer: " + "; ".join(problems))


def export_var(tokenizer_stem: Path, transformer_stem: Path | None, out: Path) -> dict[str, Any]:
    """Our order-0 models → VAR's state dicts in ``out`` (``vae_ch…v…z….pth``, ``var_d….pth``) and
    ``var_config.json``, the constructor arguments that rebuild them in VAR's code. Written atomically."""
    tokenizer_stem, out = Path(tokenizer_stem), Path(out)
    tokenizer, tokenizer_json = load_tokenizer(tokenizer_stem)
    _exportable_tokenizer(tokenizer, tokenizer_stem)
    cfg = tokenizer.cfg
    vae_name = f"vae_ch{cfg.channels}v{cfg.codebook_size}z{cfg.latent_channels}.pth"
    config: dict[str, Any] = {
        "vqvae": {
            "vocab_size": cfg.codebook_size,
            "z_channels": cfg.latent_channels,
            "ch": cfg.channels,
            "share_quant_resi": cfg.phi_convs,
            "quant_resi": cfg.phi_ratio,
            "v_patch_nums": cfg.scales,
            "ddconfig": {"ch_mult": cfg.channel_multipliers, "num_res_blocks": cfg.res_blocks},
        },
        "resolution": tokenizer_json["resolution"],
        "files": {"vae": vae_name},
    }
    transformer = None
    if transformer_stem is not None:
        transformer, _ = load_transformer(transformer_stem)
        if transformer.layout.lengths != tokenizer.layout.lengths:
            raise CheckpointError(f"{transformer_stem}: its token layout is not {tokenizer_stem}'s")
        if not isinstance(transformer.head, SoftmaxHead):  # VAR's code has one head, the softmax over its codebook
            raise CheckpointError(
                f"{transformer_stem}: a {transformer.head.description}, which VAR's code has no place for"
            )
        t = transformer.cfg
        config["var"] = {
            "num_classes": transformer.num_classes,
            "depth": t.depth,
            "embed_dim": t.resolved_width,
            "num_heads": t.resolved_heads,
            "mlp_ratio": t.mlp_ratio,
            "norm_eps": t.norm_eps,
            "attn_l2_norm": t.qk_norm,
            "shared_aln": False,
            "patch_nums": cfg.scales,
        }
        config["files"]["var"] = f"var_d{t.depth}.pth"
    with atomic.atomic_dir(out) as tmp:
        torch.save(tokenizer_to_var(tokenizer.state_dict(), tokenizer.layout.num_maps), tmp / vae_name)
        if transformer is not None:
            state = transformer_to_var(transformer.state_dict(), transformer.cfg.depth, transformer.layout.lengths)
            torch.save(state, tmp / config["files"]["var"])
        atomic.write_json(tmp / "var_config.json", config)
    return {name: str(out / file) for name, file in config["files"].items()}
