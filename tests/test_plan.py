"""The ImageNet presets carry the papers' settings, and `cart plan` prices them from the params alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from pipeline.models.diffusion import DiffusionConfig
from pipeline.models.tokenizer import TokenLayout
from pipeline.models.transformer import CART, Block, TransformerModelConfig, forward_flops
from pipeline.params import Params, load_params
from pipeline.plan import ACTIVATION_BYTES, CHECKPOINTED_BYTES, IMAGENET_TRAIN_IMAGES
from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"var": ROOT / "params/imagenet256-var-d16.yaml", "cart": ROOT / "params/imagenet256-cart-d16.yaml"}
VAR_256_SCALES = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
runner = CliRunner()


@pytest.mark.parametrize("name", PRESETS)
def test_each_imagenet_preset_sets_every_key_and_carries_var_d16s_recipe(name):
    values = yaml.safe_load(PRESETS[name].read_text())
    for section, info in Params.__pydantic_fields__.items():
        assert set(values[section]) == set(info.annotation.__pydantic_fields__), section
    p = load_params(PRESETS[name])
    tok, model, train = p.tokenizer.model, p.transformer.model, p.transformer.train
    assert p.data.resolution == 256 and tok.scales == VAR_256_SCALES
    assert (tok.codebook_size, tok.latent_channels) == (4096, 32)
    assert p.decompose.order == {"var": 0, "cart": 3}[name]
    assert p.tokenizer.init_from == "models/var-d16/tokenizer"
    global_batch = train.batch_size * train.grad_accumulation * p.plan.gpus
    assert global_batch == 768
    assert train.lr == pytest.approx(1e-4 * global_batch / 256)
    assert (train.beta1, train.beta2, train.weight_decay, train.grad_clip) == (0.9, 0.95, 0.05, 2.0)
    assert model.depth == 16 and model.resolved_drop_path == pytest.approx(0.1 * 16 / 24)
    assert train.precision == "bf16"
    assert train.steps * global_batch / IMAGENET_TRAIN_IMAGES == pytest.approx(200, abs=768 / IMAGENET_TRAIN_IMAGES)


def plan_json(preset: Path) -> dict:
    result = runner.invoke(app, ["plan", "--params", str(preset), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cart_plan_prints_the_cart_d16_table_without_touching_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/, no models/; the preset's ImageNet paths do not exist here either
    assert not Path(yaml.safe_load(PRESETS["cart"].read_text())["data"]["source"]).exists()
    result = runner.invoke(app, ["plan", "--params", str(PRESETS["cart"])], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "1² 2² 3² 4² 5² 6² 8² 10² 13² 16² (base) + D3 16², D2 16², D1 16²" in text
    assert "tokens per image │ 1448" in text
    for stage in ("train_tokenizer", "extract_tokens", "train_transformer", "sample_fid"):
        assert stage in text
    assert "30% MFU of 989 TFLOP/s" in text and "Memory per GPU" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # wrote nothing


def test_the_plan_counts_the_transformer_as_forward_flops_does_and_prices_it_at_the_stated_mfu():
    plan = plan_json(PRESETS["cart"])
    layout = TokenLayout(VAR_256_SCALES, 3, 1, "append")
    with torch.device("meta"):  # CART-d16 as the paper's numbers describe it, built apart from the plan
        model = CART(TransformerModelConfig(depth=16), layout, 1000, 4096, 32)
    assert plan["tokens"] == layout.num_tokens == 680 + 3 * 256
    assert plan["transformer_parameters"] == sum(p.numel() for p in model.parameters())
    assert plan["transformer_train_flops"] == 3 * forward_flops(model, 1, 1)
    assert plan["sample_flops"] == forward_flops(model, 2, 1) + plan["decode_flops"]  # guided: two rows
    run = next(r for r in plan["runs"] if r["stage"] == "train_transformer")
    assert run["images"] == 333638 * 768
    assert run["gpu_hours"] == pytest.approx(run["images"] * 3 * forward_flops(model, 1, 1) / (0.3 * 989e12) / 3600)


def test_the_var_preset_plans_var_d16s_published_size():
    plan = plan_json(PRESETS["var"])
    assert plan["tokens"] == 680
    assert plan["transformer_parameters"] == pytest.approx(310e6, rel=0.01)  # VAR-d16: 310 M
    assert plan["tokenizer_parameters"] == pytest.approx(109e6, rel=0.01)  # VAR's VQVAE: 109 M


def test_checkpointing_activations_shrinks_the_memory_estimate_and_charges_a_recomputed_forward(tmp_path):
    values = yaml.safe_load(PRESETS["cart"].read_text())
    values["transformer"]["train"]["checkpoint_activations"] = True
    (tmp_path / "checkpointed.yaml").write_text(yaml.safe_dump(values))
    plain, checkpointed = plan_json(PRESETS["cart"]), plan_json(tmp_path / "checkpointed.yaml")
    # Every block's fp32 input kept, one block's activations at a time: (4·16 + 54) / (54·16) of them, about 1/7.
    kept = (CHECKPOINTED_BYTES * 16 + ACTIVATION_BYTES) / (ACTIVATION_BYTES * 16)
    assert checkpointed["memory"]["activations"] == pytest.approx(plain["memory"]["activations"] * kept)
    training = [next(r for r in p["runs"] if r["stage"] == "train_transformer") for p in (plain, checkpointed)]
    assert training[1]["flops_per_image"] == pytest.approx(training[0]["flops_per_image"] * 4 / 3)


def test_the_plan_counts_the_coarse_to_fine_head(tmp_path):
    values = yaml.safe_load(PRESETS["cart"].read_text())
    values["transformer"]["coarse"]["clusters"] = 64
    (tmp_path / "ctf.yaml").write_text(yaml.safe_dump(values))
    plan = plan_json(tmp_path / "ctf.yaml")
    with torch.device("meta"):
        model = CART(
            TransformerModelConfig(depth=16), TokenLayout(VAR_256_SCALES, 3, 1, "append"), 1000, 4096, 32, clusters=64
        )
    assert plan["transformer_parameters"] == sum(p.numel() for p in model.parameters())
    assert (
        plan["transformer_train_flops"]
        == 3 * forward_flops(model, 1, 1)
        > plan_json(PRESETS["cart"])["transformer_train_flops"]
    )


def test_the_plan_prices_a_diffusion_head_per_noise_draw_in_training_and_per_reverse_step_on_both_rows(tmp_path):
    values = yaml.safe_load(PRESETS["cart"].read_text())
    values["tokenizer"]["quantize"], values["transformer"]["head"] = "continuous", "diffusion"
    (tmp_path / "mar.yaml").write_text(yaml.safe_dump(values))
    plan = plan_json(tmp_path / "mar.yaml")
    diffusion = DiffusionConfig(**values["transformer"]["diffusion"])
    with torch.device("meta"):
        model = CART(
            TransformerModelConfig(depth=16),
            TokenLayout(VAR_256_SCALES, 3, 1, "append"),
            1000,
            4096,
            32,
            diffusion=diffusion,
        )
    head = model.diffusion.matrix_weights() * 2 * model.layout.num_tokens  # FLOPs of one head pass over a sequence
    assert plan["transformer_parameters"] == sum(p.numel() for p in model.parameters())
    assert plan["transformer_train_flops"] == 3 * (forward_flops(model, 1, 0) + diffusion.draws * head)
    steps = values["transformer"]["sampling"]["diffusion_steps"]
    assert plan["sample_flops"] == forward_flops(model, 2, 0) + 2 * steps * head + plan["decode_flops"]


def saved_bytes(block: Block, batch: int, tokens: int, width: int) -> int:
    """Bytes of the tensors autograd keeps for one block's backward (each storage once)."""
    x_BLC = torch.randn(batch, tokens, width, requires_grad=True)
    mod_B16C = torch.randn(batch, 1, 6, width, requires_grad=True)
    mask_LL = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        block(x_BLC, mod_B16C, mask_LL, None)
    return sum(storages.values())


def test_the_activation_estimate_is_what_autograd_keeps_per_token_and_channel_in_a_block():
    width = 128
    block = Block(TransformerModelConfig(depth=4, width=width, heads=4), drop_path=0.1).train()
    # Two sequence lengths: the difference is the per-token part (weights' bf16 copies cancel out).
    per_token = (saved_bytes(block, 2, 256, width) - saved_bytes(block, 2, 128, width)) / (2 * 128 * width)
    assert per_token == pytest.approx(ACTIVATION_BYTES, rel=0.1)
