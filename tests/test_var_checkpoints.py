"""`cart import-var` / `cart export-var`: VAR's released state dicts load, round-trip bit-exactly, and bad files exit 2.

The VAR state dicts here are built from the facts of VAR's published architecture (its module names and tensor
shapes: LDM's f16 VQVAE with VAR's multi-scale quantiser, and the AdaLN transformer), at small widths. Parity of
the numbers with VAR's own code is checked against the official repository itself (docs/var.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.models.tokenizer import load_tokenizer
from pipeline.models.transformer import load_transformer
from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# A small VAR: VQVAE ch 32, multipliers (1, 2, 4), 2 blocks, V 64, C_vae 8; transformer depth 2, width 64.
CH, MULT, BLOCKS, Z, V = 32, (1, 2, 4), 2, 8, 64
DEPTH, WIDTH, CLASSES = 2, 64, 5
PATCH_NUMS = (1, 2, 3, 4)  # 16 px images: latent side 4
L = sum(p * p for p in PATCH_NUMS)


def var_vae_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The keys and shapes of VAR's VQVAE: LDM's encoder/decoder (attention after every block of the lowest level
    and in the middle), 3×3 quant convs, the codebook, four shared φ convs and the code-usage buffer."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name, c_out, c_in, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c_out, c_in, k, k), (c_out,)

    def gn(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resblock(name, c_in, c_out):
        gn(f"{name}.norm1", c_in), conv(f"{name}.conv1", c_out, c_in, 3), gn(f"{name}.norm2", c_out)
        conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_out, c_in, 1)

    def attn(name, c):
        gn(f"{name}.norm", c), conv(f"{name}.qkv", 3 * c, c, 1), conv(f"{name}.proj_out", c, c, 1)

    widths = [CH * m for m in MULT]
    conv("encoder.conv_in", CH, 3, 3)
    c = CH
    for i, w in enumerate(widths):
        for j in range(BLOCKS):
            resblock(f"encoder.down.{i}.block.{j}", c, w)
            c = w
            if i == len(widths) - 1:
                attn(f"encoder.down.{i}.attn.{j}", c)
        if i < len(widths) - 1:
            conv(f"encoder.down.{i}.downsample.conv", c, c, 3)
    resblock("encoder.mid.block_1", c, c), attn("encoder.mid.attn_1", c), resblock("encoder.mid.block_2", c, c)
    gn("encoder.norm_out", c), conv("encoder.conv_out", Z, c, 3)
    conv("decoder.conv_in", c, Z, 3)
    resblock("decoder.mid.block_1", c, c), attn("decoder.mid.attn_1", c), resblock("decoder.mid.block_2", c, c)
    for i in reversed(range(len(widths))):
        for j in range(BLOCKS + 1):
            resblock(f"decoder.up.{i}.block.{j}", c, widths[i])
            c = widths[i]
            if i == len(widths) - 1:
                attn(f"decoder.up.{i}.attn.{j}", c)
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", c, c, 3)
    gn("decoder.norm_out", c), conv("decoder.conv_out", 3, c, 3)
    conv("quant_conv", Z, Z, 3), conv("post_quant_conv", Z, Z, 3)
    for k in range(4):
        conv(f"quantize.quant_resi.qresi_ls.{k}", Z, Z, 3)
    shapes["quantize.embedding.weight"] = (V, Z)
    state = {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}
    state["quantize.ema_vocab_hit_SV"] = torch.zeros(len(PATCH_NUMS), V)
    return state


def var_transformer_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    """The keys and shapes of VAR's transformer (q/k normalised attention, per-block AdaLN, no shared AdaLN)."""
    g = torch.Generator().manual_seed(seed)
    C, H = WIDTH, DEPTH
    shapes = {
        "class_emb.weight": (CLASSES + 1, C),
        "pos_start": (1, PATCH_NUMS[0] ** 2, C),
        "pos_1LC": (1, L, C),
        "lvl_embed.weight": (len(PATCH_NUMS), C),
        "word_embed.weight": (C, Z),
        "word_embed.bias": (C,),
        "head_nm.ada_lin.1.weight": (2 * C, C),
        "head_nm.ada_lin.1.bias": (2 * C,),
        "head.weight": (V, C),
        "head.bias": (V,),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}"
        shapes |= {
            f"{b}.attn.mat_qkv.weight": (3 * C, C),
            f"{b}.attn.q_bias": (C,),
            f"{b}.attn.v_bias": (C,),
            f"{b}.attn.scale_mul_1H11": (1, H, 1, 1),
            f"{b}.attn.proj.weight": (C, C),
            f"{b}.attn.proj.bias": (C,),
            f"{b}.ffn.fc1.weight": (4 * C, C),
            f"{b}.ffn.fc1.bias": (4 * C,),
            f"{b}.ffn.fc2.weight": (C, 4 * C),
            f"{b}.ffn.fc2.bias": (C,),
            f"{b}.ada_lin.1.weight": (6 * C, C),
            f"{b}.ada_lin.1.bias": (6 * C,),
        }
    state = {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}
    for i in range(DEPTH):
        state[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(C)
    map_L = torch.cat([torch.full((p * p,), i) for i, p in enumerate(PATCH_NUMS)])
    state["lvl_1L"] = map_L.view(1, L)
    state["attn_bias_for_masking"] = torch.where(map_L[:, None] >= map_L[None], 0.0, -torch.inf).view(1, 1, L, L)
    return state


@pytest.fixture
def var_files(tmp_path) -> tuple[Path, Path]:
    vae, var = tmp_path / "vae_ch32v64z8.pth", tmp_path / "var_d2.pth"
    torch.save(var_vae_state_dict(), vae)
    torch.save(var_transformer_state_dict(), var)
    return vae, var


def import_cli(vae, var, out, *extra) -> object:
    args = ["import-var", "--vae", str(vae), "--out", str(out), "--scales", ",".join(map(str, PATCH_NUMS))]
    return runner.invoke(app, args + (["--var", str(var)] if var else []) + list(extra))


def test_import_reads_every_size_off_the_tensors_and_maps_every_key(var_files, tmp_path):
    vae, var = var_files
    result = import_cli(vae, var, tmp_path / "imported")
    assert result.exit_code == 0, result.output
    tokenizer, tok_config = load_tokenizer(tmp_path / "imported" / "tokenizer")
    model, config = load_transformer(tmp_path / "imported" / "transformer")
    cfg = tokenizer.cfg
    assert (cfg.channels, cfg.channel_multipliers, cfg.res_blocks, cfg.attention_levels) == (CH, list(MULT), 2, [2])
    assert (cfg.latent_channels, cfg.codebook_size, cfg.phi_convs, cfg.scales) == (Z, V, 4, list(PATCH_NUMS))
    assert tok_config["order"] == 0 and tok_config["resolution"] == 16
    assert (model.cfg.depth, model.cfg.resolved_width, model.cfg.resolved_heads, model.num_classes) == (2, 64, 2, 5)
    assert config["tokenizer"] == str(tmp_path / "imported" / "tokenizer")

    theirs_vae, theirs = var_vae_state_dict(), var_transformer_state_dict()
    assert torch.equal(tokenizer.codebook.weight, theirs_vae["quantize.embedding.weight"])
    assert torch.equal(tokenizer.phi.convs[2].bias, theirs_vae["quantize.quant_resi.qresi_ls.2.bias"])
    assert torch.equal(tokenizer.decoder.up[1].upsample.conv.weight, theirs_vae["decoder.up.1.upsample.conv.weight"])
    C = WIDTH
    assert torch.equal(model.ada_lin.weight[6 * C : 12 * C], theirs["blocks.1.ada_lin.1.weight"])
    assert torch.equal(model.ada_lin.bias[-2 * C :], theirs["head_nm.ada_lin.1.bias"])
    assert torch.equal(model.blocks[0].attn.log_scale_H, theirs["blocks.0.attn.scale_mul_1H11"].flatten())
    assert torch.equal(model.pos_embed.weight, theirs["pos_1LC"][0])
    assert torch.equal(model.blocks[1].fc2.weight, theirs["blocks.1.ffn.fc2.weight"])


def test_cart_sample_draws_from_the_imported_model(var_files, tmp_path):
    vae, var = var_files
    assert import_cli(vae, var, tmp_path / "imported").exit_code == 0
    out = tmp_path / "samples.png"
    args = ["sample", "--params", str(ROOT / "params.yaml"), "--checkpoint", str(tmp_path / "imported/transformer")]
    result = runner.invoke(app, args + ["--classes", "0,3", "--n", "2", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0


def test_export_writes_exactly_vars_keys_and_round_trips_bit_exactly(var_files, tmp_path):
    vae, var = var_files
    assert import_cli(vae, var, tmp_path / "imported").exit_code == 0
    imported = tmp_path / "imported"
    args = ["export-var", "--tokenizer", str(imported / "tokenizer"), "--transformer", str(imported / "transformer")]
    result = runner.invoke(app, args + ["--out", str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    exported = tmp_path / "exported"
    for name, original in (("vae_ch32v64z8.pth", var_vae_state_dict()), ("var_d2.pth", var_transformer_state_dict())):
        written = torch.load(exported / name, weights_only=True)
        assert {k: tuple(v.shape) for k, v in written.items()} == {k: tuple(v.shape) for k, v in original.items()}
        assert all(torch.equal(written[k], original[k]) for k in original if k != "quantize.ema_vocab_hit_SV")
    config = json.loads((exported / "var_config.json").read_text())
    assert config["vqvae"]["v_patch_nums"] == list(PATCH_NUMS) and config["var"]["depth"] == DEPTH

    again = tmp_path / "again"
    assert import_cli(exported / "vae_ch32v64z8.pth", exported / "var_d2.pth", again).exit_code == 0
    for part in ("tokenizer", "transformer"):
        a, b = load_file(str(imported / f"{part}.safetensors")), load_file(str(again / f"{part}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit(path: Path, change) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


class _Payload:  # pickled objects must never be unpickled: weights_only refuses them
    pass


BAD_INPUTS = {
    "not a checkpoint": (lambda vae, var: vae.write_text("hello"), "vae", "not a readable PyTorch state dict"),
    "truncated": (lambda vae, var: _truncated(var), "var", "not a readable PyTorch state dict"),
    "pickled object": (lambda vae, var: torch.save({"x": _Payload()}, vae), "vae", "not a readable"),
    "VAE given as --var": (lambda vae, var: var.write_bytes(vae.read_bytes()), "var", "pass it as --vae"),
    "missing key": (
        lambda vae, var: _edit(var, lambda s: s.pop("blocks.1.attn.proj.bias")),
        "var",
        "'blocks.1.attn.proj.bias' is missing",
    ),
    "unexpected key": (
        lambda vae, var: _edit(vae, lambda s: s.update({"encoder.extra.weight": torch.zeros(3)})),
        "vae",
        "unexpected key 'encoder.extra.weight'",
    ),
    "shape no VAR has": (
        lambda vae, var: _edit(vae, lambda s: s.update({"encoder.conv_in.weight": torch.zeros(CH, 4, 3, 3)})),
        "vae",
        r"'encoder.conv_in.weight' has shape \(32, 4, 3, 3\), expected \(32, 3, 3, 3\)",
    ),
    "transformer of another VAE": (
        lambda vae, var: _edit(var, lambda s: s.update({"head.weight": torch.zeros(V + 1, WIDTH)})),
        "var",
        "not the VAE this transformer was trained with",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_checkpoints_exit_2_naming_file_and_key_and_write_nothing(var_files, tmp_path, case):
    vae, var = var_files
    spoil, culprit, message = BAD_INPUTS[case]
    spoil(vae, var)
    result = import_cli(vae, var, tmp_path / "imported")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert str({"vae": vae, "var": var}[culprit]) in text
    assert re.search(message, text), text
    assert not (tmp_path / "imported").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_export_refuses_what_vars_code_cannot_hold(var_files, tmp_path):
    from pipeline.models.tokenizer import Tokenizer, TokenizerModelConfig, save_tokenizer

    narrow = TokenizerModelConfig(channels=16, channel_multipliers=[1, 2], latent_channels=8, scales=[1, 2, 4])
    for order, stem, message in ((1, "detail", "only order 0 exports"), (0, "narrow", "multiple of 32")):
        save_tokenizer(tmp_path / stem, Tokenizer(narrow, order), 8)
        result = runner.invoke(app, ["export-var", "--tokenizer", str(tmp_path / stem), "--out", str(tmp_path / "x")])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
        assert not (tmp_path / "x").exists()
