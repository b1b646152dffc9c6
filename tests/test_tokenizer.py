"""The base–detail multi-scale VQ-VAE: Algorithms 1 and 2, VAR as order 0, prefixes, LPIPS loading, the stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline.config import InvalidInput
from pipeline.models.lpips import load_lpips
from pipeline.models.tokenizer import Tokenizer, TokenizerModelConfig, TokenLayout, load_tokenizer, phi_choice
from pipeline.models.weights import MissingWeights
from pipeline.training.tokenizer_training import TokenizerLossConfig, TokenizerTask
from pipeline.training.train import TrainConfig
from stages.cli import app

HERE = Path(__file__).resolve().parent
SMALL = TokenizerModelConfig(
    channels=8, channel_multipliers=[1, 2], latent_channels=8, codebook_size=64, scales=[1, 2, 4, 6, 8]
)


def batch(order: int, n: int = 3, side: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g), torch.rand(n, order, 3, side, side, generator=g)


def make(order: int, cfg: TokenizerModelConfig = SMALL, seed: int = 0) -> Tokenizer:
    torch.manual_seed(seed)
    model = Tokenizer(cfg, order).eval()
    with torch.no_grad():  # codes spread like real encoder outputs, so that every map picks varied codes
        model.codebook.weight.normal_(0, 0.5)
    return model


DEMO_SCALES = [1, 2, 3, 4, 5, 6, 8]


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_appended_layout_is_vars_maps_then_full_resolution_details(order):
    """The paper's CART: VAR's whole schedule (ending at the 8×8 latent) as the base, then D_n … D_1 at 8×8."""
    layout = TokenLayout(DEMO_SCALES, order, detail_depth=1)
    assert [(m.side, m.level) for m in layout.maps] == [(s, 0) for s in DEMO_SCALES] + [
        (8, t) for t in range(order, 0, -1)
    ]
    assert layout.num_tokens == 155 + 64 * order and layout.num_base == 7
    assert layout.component_ends() == [7 + k for k in range(order + 1)]
    assert layout.map_level_ids() == list(range(7 + order))
    assert TokenLayout.from_json(layout.to_json()).maps == layout.maps
    # The base maps take VAR's φ convs for its 7 maps; detail maps the full-resolution map's.
    assert layout.phi_choice(4) == [0, 0, 1, 2, 2, 3, 3] + [3] * order


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_replaced_layout_keeps_vars_token_count(order):
    layout = TokenLayout(DEMO_SCALES, order, detail_depth=1, mode="replace")
    assert [(m.side, m.level) for m in layout.maps] == [(s, 0) for s in DEMO_SCALES[: 7 - order]] + [
        (8, t) for t in range(order, 0, -1)
    ]
    assert layout.num_maps == 7 and layout.num_base == 7 - order
    assert layout.num_tokens == sum(s * s for s in DEMO_SCALES[: 7 - order]) + 64 * order
    assert TokenLayout.from_json(layout.to_json()).maps == layout.maps
    assert layout.phi_choice(4) == [0, 0, 1, 2, 2, 3, 3]


def test_layouts_need_a_base_map_and_order_0_is_var_in_both():
    assert TokenLayout(DEMO_SCALES, 0, 1).maps == TokenLayout(DEMO_SCALES, 0, 1, mode="replace").maps
    with pytest.raises(ValueError, match="no base map"):
        TokenLayout([1, 2], order=2, detail_depth=1, mode="replace")
    assert TokenLayout([8], order=3, detail_depth=2).num_maps == 7  # a single full-resolution base map
    assert TokenLayout([1, 2, 4], order=2, detail_depth=2).lengths == [1, 4, 16, 16, 16, 16, 16]


@pytest.mark.parametrize("order", [0, 2])
def test_algorithm_1_then_2_reproduces_the_forward_reconstruction_exactly(order):
    model = make(order)
    image, bases = batch(order)
    with torch.no_grad():
        decoded, quantized = model(image, bases, decode=[order])
        tokens = model.tokenize(image, bases)
        f_hat = model.compose(tokens)
        reconstruction = model.decode(f_hat)
    assert all(torch.equal(a, b) for a, b in zip(tokens, quantized.tokens, strict=True))
    assert torch.equal(f_hat, quantized.prefixes[-1])
    assert torch.equal(reconstruction, decoded[:, 0])
    assert [tuple(i.shape[1:]) for i in tokens] == [(m.side, m.side) for m in model.layout.maps]


def test_order_0_is_var_multi_scale_residual_quantisation():
    """An independent VAR-style residual quantiser over the same codebook and φ picks the same codes."""
    model = make(0)
    image, bases = batch(0)
    with torch.no_grad():
        f = model.encode(image)
        rest, f_hat, expected = f.clone(), torch.zeros_like(f), []
        for m, side in enumerate(SMALL.scales):
            pooled = F.interpolate(rest, size=(side, side), mode="area")
            flat = pooled.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
            idx = torch.cdist(flat, model.codebook.weight).argmin(1).view(-1, side, side)
            z = model.codebook(idx).permute(0, 3, 1, 2)
            h = model.phi(F.interpolate(z, size=f.shape[-2:], mode="bicubic") if side != 8 else z, m)
            f_hat, rest = f_hat + h, rest - h
            expected.append(idx)
        tokens = model.tokenize(image, bases)
    assert all(torch.equal(a, b) for a, b in zip(tokens, expected, strict=True))
    assert torch.allclose(model.compose(tokens), f_hat, atol=1e-6)


def test_vanilla_vqvae_is_one_full_resolution_map():
    cfg = TokenizerModelConfig(**{**SMALL.__dict__, "scales": [8]})
    model = make(0, cfg)
    tokens = model.tokenize(*batch(0))
    assert len(tokens) == 1 and tokens[0].shape == (3, 8, 8)


def test_without_error_feedback_each_detail_is_quantised_alone():
    cfg = TokenizerModelConfig(**{**SMALL.__dict__, "detail_error_feedback": False})
    model = make(2, cfg)
    image, bases = batch(2)
    with torch.no_grad():
        f_levels = model.encode_levels(image, bases)
        first_detail = model.layout.num_base  # quantises f_{D_2} = f_{B_1} − f_{B_2}
        expected = model.nearest_codes(f_levels[1] - f_levels[2])
        assert torch.equal(model.tokenize(image, bases)[first_detail], expected)


@pytest.mark.parametrize("init", [True, False])
def test_codes_start_from_distinct_encoder_residuals_after_the_first_step(init):
    """Data-dependent init: after step 0 every code is a residual the quantiser saw, no two alike (VQGAN's ±1/V
    init left the one-map VQ-VAE decoding the mean image); switched off, step 0 leaves the codebook to the
    optimiser."""
    torch.manual_seed(0)
    model = Tokenizer(SMALL, 1)
    task = TokenizerTask(model, TokenizerLossConfig(init_codes_from_data=init), lambda: iter([]), 1)
    task.phases(TrainConfig())
    task.generator_loss(batch(1, n=8), step=0)
    before = model.codebook.weight.detach().clone()
    task.after_step(0, None)
    codes, seen = model.codebook.weight.detach(), task._residuals
    if init:
        assert (codes[:, None] == seen[None]).all(-1).any(1).all()  # each code is one of the residuals seen
        assert len(torch.unique(codes, dim=0)) == SMALL.codebook_size
    else:
        assert torch.equal(codes, before)


def test_teacher_forcing_input_of_each_map_is_the_composition_of_the_maps_before_it():
    model = make(2)
    tokens = model.tokenize(*batch(2))
    x = model.teacher_forcing_inputs(tokens)
    layout = model.layout
    assert x.shape == (3, layout.num_tokens - 1, SMALL.latent_channels)
    for m in range(1, layout.num_maps):
        expected = model.next_input(model.compose(tokens, m), m).flatten(2).transpose(1, 2)
        start = layout.offsets[m] - 1
        assert torch.allclose(x[:, start : start + layout.lengths[m]], expected, atol=1e-6)


def test_prefix_decodes_get_closer_to_the_image_as_maps_are_added(workspace):
    """After (short) training, more maps decode closer to I, and the base maps alone decode nearer B_2 than I.

    Not claimed here: that the detail maps alone improve the decode. On this 16 px toy after 150 steps the
    reconstruction error (MSE ≈ 0.035) is ten times ‖I − B_2‖² (≈ 0.0035), so whether the last maps help is noise."""
    from tests.workspace import write_params

    write_params(workspace, {"tokenizer": {"train": {"steps": 150, "lr": 3e-3, "checkpoint_every": 1000}}})
    result = CliRunner().invoke(app, ["train-tokenizer"])
    assert result.exit_code == 0, result.output
    model, config = load_tokenizer(workspace / "models" / "tokenizer" / "tokenizer")
    assert config["order"] == 2 and config["resolution"] == 16
    from pipeline.data.decomposed import first_samples

    samples = list(first_samples(workspace / "data" / "decomposed" / "val", 32))
    image = torch.stack([s[1] for s in samples])
    base = torch.stack([s[2] for s in samples])[:, 1]  # B_2
    tokens = model.tokenize(image, torch.stack([s[2] for s in samples]))
    depth = [F.mse_loss(model.decode_prefix(tokens, m), image).item() for m in range(1, model.layout.num_maps + 1)]
    assert depth[-1] < 0.5 * depth[0]
    base_maps = model.layout.component_ends()[0]
    base_decode = model.decode_prefix(tokens, base_maps)
    assert F.mse_loss(base_decode, base) < F.mse_loss(base_decode, image)


def test_train_tokenizer_stage_writes_weights_metrics_and_figures(workspace):
    from tests.workspace import write_params

    write_params(workspace, {"tokenizer": {"compare": True, "train": {"steps": 4}}})
    result = CliRunner().invoke(app, ["train-tokenizer"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((workspace / "metrics" / "tokenizer.json").read_text())
    assert set(metrics) == {"tokenizer", "var", "vqvae"}
    assert metrics["vqvae"]["maps"] == 1 and metrics["var"]["order"] == 0 and metrics["tokenizer"]["order"] == 2
    for name in ("figure7.png", "reconstructions.png", "depth/tokenizer.json", "depth/var.json", "depth/vqvae.json"):
        assert (workspace / "reports" / "tokenizer" / name).stat().st_size > 0
    for stem in ("tokenizer", "variants/var", "variants/vqvae"):
        assert (workspace / "models" / "tokenizer" / f"{stem}.safetensors").exists()
    live = workspace / "metrics" / "train_tokenizer" / "tokenizer"
    assert (live / "plots" / "metrics" / "train" / "psnr.tsv").exists()


def test_weights_are_safetensors_and_json_only(workspace):
    CliRunner().invoke(app, ["train-tokenizer"])
    models = workspace / "models"
    suffixes = {p.suffix for p in models.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json"}
    assert load_file(str(models / "tokenizer" / "tokenizer.safetensors"))


def test_lpips_loads_its_backbone_from_the_torch_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    backbone = torchvision.models.vgg16()
    path = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    path.parent.mkdir(parents=True)
    torch.save(backbone.state_dict(), path)
    model = load_lpips("vgg", None)
    # lpips names each layer by its index in torchvision's `features`.
    assert torch.equal(getattr(model.net.slice1, "0").weight, backbone.features[0].weight)
    assert torch.equal(getattr(model.net.slice5, "28").weight, backbone.features[28].weight)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert model(x, x, normalize=True).abs().max() < 1e-6 < model(x, y, normalize=True).min()
    # An explicit path wins over the cache.
    moved = tmp_path / "elsewhere.pth"
    path.rename(moved)
    assert torch.equal(getattr(load_lpips("vgg", str(moved)).net.slice1, "0").weight, backbone.features[0].weight)


def test_missing_lpips_weights_stop_the_stage_at_start_saying_what_to_do(workspace, monkeypatch):
    from tests.workspace import write_params

    monkeypatch.setenv("TORCH_HOME", str(workspace / "empty-cache"))
    with pytest.raises(MissingWeights):
        load_lpips("vgg", None)
    write_params(workspace, {"tokenizer": {"loss": {"lambda_perceptual": 1.0}}})
    result = CliRunner().invoke(app, ["train-tokenizer"])
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert str(workspace / "empty-cache" / "hub" / "checkpoints" / "vgg16-397923af.pth") in message
    assert "lambda_perceptual: 0" in message
    assert not (workspace / "models" / "tokenizer").exists()


def test_stage_refuses_decompositions_of_another_order(workspace):
    from tests.workspace import write_params

    write_params(workspace, {"decompose": {"order": 1}})
    result = CliRunner().invoke(app, ["train-tokenizer"])
    assert result.exit_code == 1 and "rerun the decompose stage" in result.output


@pytest.mark.slow
def test_killed_training_resumes_and_ends_where_an_uninterrupted_run_ends(workspace, tmp_path_factory):
    from tests.resume import assert_killed_run_resumes_to_the_uninterrupted_result
    from tests.workspace import write_params

    write_params(workspace, {"tokenizer": {"train": {"steps": 40, "checkpoint_every": 5}, "loss": {"lambda_gan": 0.1}}})
    assert_killed_run_resumes_to_the_uninterrupted_result(
        workspace,
        "train-tokenizer",
        workspace / "models" / "checkpoints" / "tokenizer" / "tokenizer",
        kill_after=15,
        weights="models/tokenizer/tokenizer.safetensors",
        inputs=["data"],
        fresh=tmp_path_factory.mktemp("uninterrupted"),
    )


@pytest.mark.slow
def test_ddp_training_on_two_processes_keeps_the_ranks_in_sync(tiny_data, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HERE / "ddp_train_check.py"),
        str(tiny_data / "data" / "decomposed"),
        str(tmp_path),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 6 * 2  # batches read: 6 steps of 2 accumulated batches
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]  # each rank trained on its own data


def test_tokenize_base_is_the_base_part_of_algorithm_1():
    model = make(2)
    image, bases = batch(2)
    levels = model.encode_levels(image, bases)
    quantized = model.quantize(levels)
    base_maps, f_hat = model.tokenize_base(levels[-1])  # f_{B_n}
    assert len(base_maps) == model.layout.num_base
    assert all(torch.equal(a, b) for a, b in zip(base_maps, quantized.tokens, strict=False))
    assert torch.allclose(f_hat, quantized.prefixes[0], atol=1e-6)


@pytest.mark.parametrize(
    ("maps", "var_choice"),
    [
        (10, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]),  # VAR's 256 px schedule
        (7, [0, 0, 1, 2, 2, 3, 3]),  # the demo's
        (5, [0, 1, 2, 2, 3]),
        (13, [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]),
    ],
)
def test_each_map_uses_the_phi_convolution_var_gives_it(maps, var_choice):
    """Ties between ticks break as in VAR's float64 arithmetic (float32 paired maps 2, 7 of 10 with other convs)."""
    assert phi_choice(4, maps) == var_choice
    assert phi_choice(1, maps) == [0] * maps


def test_codes_and_teacher_forcing_inputs_ignore_bf16_autocast():
    """Quantisation runs in fp32 with autocast off, so training sees the tokens extract_tokens stores."""
    model = make(0, TokenizerModelConfig(**{**SMALL.__dict__, "codebook_size": 512}))
    f = model.encode(batch(0, n=8)[0]).detach()
    with torch.no_grad():
        fp32 = model.quantize([f])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.quantize([f.bfloat16()])
            inputs_bf16 = model.teacher_forcing_inputs(fp32.tokens)
            contribution = model.map_contribution(fp32.tokens[2], 2)
    assert all(torch.equal(a, b) for a, b in zip(fp32.tokens, bf16.tokens, strict=True))
    assert torch.equal(inputs_bf16, model.teacher_forcing_inputs(fp32.tokens))
    assert contribution.dtype == torch.float32 and bf16.prefixes[0].dtype == torch.float32


VAR_STRUCTURE = TokenizerModelConfig(
    channels=32, channel_multipliers=[1, 1, 2], res_blocks=2, latent_channels=8, codebook_size=64, scales=[1, 2, 4]
)


def test_the_default_conv_net_has_vars_vqvae_structure():
    """Attention after every block of the lowest level and in the middle, 3×3 quant convs, asymmetric padding
    before an unpadded stride-2 conv, one more block per decoder level."""
    model = Tokenizer(VAR_STRUCTURE, 0)
    keys = set(model.state_dict())
    assert {"encoder.down.2.attn.1.qkv.weight", "decoder.up.2.attn.2.proj_out.weight"} <= keys
    assert not any(k.startswith(("encoder.down.1.attn", "decoder.up.0.attn")) for k in keys)
    assert {"encoder.mid.attn_1.qkv.weight", "quant_conv.weight", "post_quant_conv.weight"} <= keys
    assert "encoder.down.1.block.2.conv1.weight" not in keys and "decoder.up.1.block.2.conv1.weight" in keys
    assert model.quant_conv.weight.shape == (8, 8, 3, 3)
    down = model.encoder.down[0].downsample
    assert down.conv.padding == (0, 0) and down.conv.stride == (2, 2)
    x = torch.randn(1, 32, 16, 16)
    assert torch.equal(down(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2))
    assert model.encode(torch.rand(2, 3, 16, 16)).shape == (2, 8, 4, 4)
    plain = Tokenizer(
        TokenizerModelConfig(**{**VAR_STRUCTURE.__dict__, "attention_levels": [], "mid_attention": False}), 0
    )
    assert not any(".attn" in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="attention_levels"):
        TokenizerModelConfig(**{**VAR_STRUCTURE.__dict__, "attention_levels": [3]})


def test_narrow_tokenizers_keep_several_channels_in_every_norm_group_and_vars_widths_keep_32_groups():
    """One channel per GroupNorm group removes each channel's mean over the image (on CIFAR-10 the demo-width
    tokenizer lost its colour that way); VAR's widths (160 · 1, 2, 4) keep VAR's 32 groups either way."""
    from pipeline.models.convnets import norm

    groups = {m.num_channels: m.num_groups for m in Tokenizer(SMALL, 0).modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {8: 2, 16: 4}  # SMALL: widths 8 and 16
    old = {c: norm(c, 1).num_groups for c in (8, 16, 48)}
    assert old == {8: 8, 16: 16, 48: 16}  # the earlier rule: 32 groups, halved until they divide
    assert all(norm(c).num_groups == norm(c, 1).num_groups == 32 for c in (128, 160, 320, 640))


def test_a_tokenizer_saved_before_min_group_channels_loads_with_the_norm_it_was_trained_with(tmp_path):
    from pipeline.models.tokenizer import save_tokenizer

    old = make(0, TokenizerModelConfig(**{**SMALL.__dict__, "min_group_channels": 1}), seed=4)
    save_tokenizer(tmp_path / "old", old, 16)
    saved = json.loads((tmp_path / "old.json").read_text())
    del saved["model"]["min_group_channels"]  # as a tokenizer saved before the key existed
    (tmp_path / "old.json").write_text(json.dumps(saved))
    loaded, _ = load_tokenizer(tmp_path / "old")
    image = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(image)), old.decode(old.encode(image)))


def test_init_from_a_tokenizer_with_other_norm_groups_exits_2_naming_min_group_channels(workspace):
    from pipeline.models.tokenizer import save_tokenizer
    from pipeline.params import load_params
    from tests.workspace import write_params

    params = load_params(workspace / "params.yaml")
    old = TokenizerModelConfig(**{**params.tokenizer.model.__dict__, "min_group_channels": 1})
    save_tokenizer(workspace / "start", make(0, old), 16)
    write_params(workspace, {"tokenizer": {"init_from": "start", "model": {"min_group_channels": 4}}})
    result = CliRunner().invoke(app, ["train-tokenizer"])
    assert result.exit_code == 2, result.output
    assert "set tokenizer.model.min_group_channels to 1" in " ".join(result.output.split())
    assert not (workspace / "models" / "tokenizer").exists()


def test_a_var_structured_tokenizer_trains_a_step():
    torch.manual_seed(0)
    model = Tokenizer(VAR_STRUCTURE, 1).train()
    task = TokenizerTask(model, TokenizerLossConfig(), lambda: iter([]), 1)
    (phase,) = task.phases(TrainConfig(lr=1e-3))
    before = model.encoder.down[2].attn[0].qkv.weight.detach().clone()
    loss, logs = phase.loss(batch(1, n=4), 0)
    loss.backward()
    phase.optimizer.step()
    assert torch.isfinite(loss) and logs["psnr"] > 0
    assert not torch.equal(before, model.encoder.down[2].attn[0].qkv.weight)


def test_init_from_copies_every_tensor_into_a_tokenizer_of_any_order(tmp_path):
    from pipeline.models.tokenizer import init_tokenizer_from, save_tokenizer

    save_tokenizer(tmp_path / "var", make(0, seed=1), 16)
    model = make(2, seed=2)
    copied = init_tokenizer_from(model, tmp_path / "var")
    source = load_file(str(tmp_path / "var.safetensors"))
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())
    assert [c.split(" ")[0] for c in copied] == [
        "encoder",
        "decoder",
        "quant_conv",
        "post_quant_conv",
        "codebook",
        "phi",
    ]


def test_init_from_a_config_without_min_group_channels_is_refused_naming_the_key(tmp_path):
    """No tokenizer a user can have lacks the key: such a file is reported, not read with a guessed norm rule."""
    from pipeline.config import ConfigError
    from pipeline.models.tokenizer import init_tokenizer_from, save_tokenizer

    save_tokenizer(tmp_path / "old", make(0, seed=1), 16)
    saved = json.loads((tmp_path / "old.json").read_text())
    del saved["model"]["min_group_channels"]
    (tmp_path / "old.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="min_group_channels"):
        init_tokenizer_from(make(2, seed=2), tmp_path / "old")


def test_train_tokenizer_starts_from_init_from_and_keeps_its_codebook(workspace):
    from pipeline.models.tokenizer import save_tokenizer
    from pipeline.params import load_params
    from tests.workspace import write_params

    params = load_params(workspace / "params.yaml")
    source = make(0, params.tokenizer.model, seed=3)
    save_tokenizer(workspace / "start", source, 16)
    write_params(workspace, {"tokenizer": {"init_from": "start", "train": {"steps": 1, "lr": 1e-9, "warmup_steps": 0}}})
    result = CliRunner().invoke(app, ["train-tokenizer"])
    assert result.exit_code == 0, result.output
    assert "copied from start: encoder" in " ".join(result.output.split())
    trained, _ = load_tokenizer(workspace / "models" / "tokenizer" / "tokenizer")
    # Not re-drawn from encoder residuals at step 0 (what a fresh codebook gets): the imported codes stay.
    torch.testing.assert_close(trained.codebook.weight, source.codebook.weight, atol=1e-6, rtol=0)


def test_a_frozen_tokenizer_is_init_from_weight_for_weight_and_frozen_alone_is_refused(workspace):
    from pipeline.models.tokenizer import save_tokenizer
    from pipeline.params import load_params
    from tests.workspace import write_params

    params = load_params(workspace / "params.yaml")
    source = make(2, params.tokenizer.model, seed=3)
    save_tokenizer(workspace / "start", source, 16)
    write_params(workspace, {"tokenizer": {"frozen": True}})
    refused = CliRunner().invoke(app, ["train-tokenizer"])
    assert refused.exit_code == 2 and "tokenizer.frozen" in " ".join(refused.output.split())
    write_params(workspace, {"tokenizer": {"init_from": "start", "frozen": True, "compare": False}})
    result = CliRunner().invoke(app, ["train-tokenizer"])
    assert result.exit_code == 0, result.output
    assert "frozen" in result.output and not (workspace / "models" / "checkpoints" / "tokenizer").exists()
    kept = load_file(workspace / "models" / "tokenizer" / "tokenizer.safetensors")
    assert kept.keys() == source.state_dict().keys()
    assert all(torch.equal(kept[k], v) for k, v in source.state_dict().items())
    assert "psnr" in json.loads((workspace / "metrics" / "tokenizer.json").read_text())["tokenizer"]


@pytest.mark.parametrize("problem", ["missing", "architecture"])
def test_init_from_that_does_not_fit_exits_2_naming_it_and_writes_nothing(workspace, problem):
    from pipeline.models.tokenizer import save_tokenizer
    from tests.workspace import write_params

    if problem == "architecture":  # 8 latent channels where the workspace's tokenizer has 4
        narrow = TokenizerModelConfig(**{**SMALL.__dict__, "attention_levels": [], "mid_attention": False})
        save_tokenizer(workspace / "start", make(0, narrow), 16)
        write_params(workspace, {"tokenizer": {"init_from": "start", "model": {"latent_channels": 4}}})
        expected = "start: key 'encoder.conv_out.weight' has shape (8, 16, 3, 3), tokenizer.model needs (4, 16, 3, 3)"
    else:
        write_params(workspace, {"tokenizer": {"init_from": "nowhere/start"}})
        expected = "nowhere/start"
    result = CliRunner().invoke(app, ["train-tokenizer"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "tokenizer.init_from" in text and expected in text
    assert not (workspace / "models" / "tokenizer").exists()


def test_the_highres_term_reads_real_2x_images_on_every_kth_step_and_resumes_in_its_stream(tiny_data):
    """Multi-scale training: every highres_every-th step also autoencodes real 2× train images (hr.png); a run
    resumed at any step draws the batch the uninterrupted run would."""
    from pipeline.training.tokenizer_stage import TokenizerConfig, highres_term_loaders

    cfg = TokenizerConfig(loss=TokenizerLossConfig(highres_batch=4, highres_every=3))
    (train, per_epoch), val = highres_term_loaders(tiny_data / "data" / "shards", cfg)

    def task() -> TokenizerTask:
        torch.manual_seed(0)
        return TokenizerTask(Tokenizer(SMALL, 2), cfg.loss, lambda: iter([]), 1, highres_loader=(train, per_epoch))

    straight = task()
    drawn = {step: straight._highres_batch(step, torch.device("cpu")) for step in range(10)}
    assert [s for s, b in drawn.items() if b is not None] == [0, 3, 6, 9]
    assert drawn[0].shape == (4, 3, 32, 32) and 0 <= drawn[0].min() and drawn[0].max() <= 1  # 16 px data, 2×
    resumed = task()._highres_batch(6, torch.device("cpu"))  # a run resumed at step 6
    assert torch.equal(resumed, drawn[6]) and not torch.equal(drawn[3], drawn[6])
    images, _ = next(iter(val.epoch(0)))
    assert images.shape[-1] == 32


def test_the_highres_term_without_the_shards_is_an_error_not_a_silent_change_of_recipe(tmp_path):
    from pipeline.training.tokenizer_stage import TokenizerConfig, highres_term_loaders

    with pytest.raises(InvalidInput, match="lambda_highres"):
        highres_term_loaders(tmp_path / "data" / "shards", TokenizerConfig())
    assert highres_term_loaders(tmp_path, TokenizerConfig(loss=TokenizerLossConfig(lambda_highres=0))) is None


def test_train_tokenizer_logs_the_highres_term_and_the_2x_psnr(workspace):
    from tests.workspace import write_params

    write_params(workspace, {"tokenizer": {"loss": {"highres_every": 2, "highres_batch": 4}}})
    result = CliRunner().invoke(app, ["train-tokenizer"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((workspace / "metrics" / "tokenizer.json").read_text())
    assert 5 < metrics["tokenizer"]["psnr_highres"] < 60
    live = workspace / "metrics" / "train_tokenizer" / "tokenizer" / "plots" / "metrics" / "train"
    assert (live / "rec_mse_highres.tsv").exists()
