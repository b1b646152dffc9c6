"""Continuous tokens and the diffusion head (MAR's idea on the next-scale / next-detail layout): the tokenizer's
exact composition and prefixes, the head's fit of a known distribution, KV-cached sampling, configs, the stages."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.data import shards
from pipeline.data.decomposed import split_shards
from pipeline.data.tokens import decode_token_sample, flatten_maps, split_maps
from pipeline.models.diffusion import DiffusionConfig, DiffusionHead
from pipeline.models.tokenizer import Tokenizer, TokenizerModelConfig, load_tokenizer, save_tokenizer
from pipeline.models.transformer import (
    CART,
    SamplingConfig,
    TransformerModelConfig,
    generate,
    guidance_weight,
    load_transformer,
    save_transformer,
)
from stages.cli import app
from tests.workspace import add_tokens, write_params

runner = CliRunner()
SMALL = TokenizerModelConfig(
    channels=8, channel_multipliers=[1, 2], latent_channels=8, codebook_size=64, scales=[1, 2, 4, 6, 8]
)
HEAD = DiffusionConfig(width=32, depth=2, draws=2, timesteps=100)
NUM_CLASSES = 3


def batch(order: int, n: int = 3, side: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g), torch.rand(n, order, 3, side, side, generator=g)


def continuous_tokenizer(order: int, cfg: TokenizerModelConfig = SMALL) -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer(cfg, order, "continuous").eval()


# -- the tokenizer --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [0, 2])
def test_all_maps_compose_to_f_exactly_and_every_component_prefix_to_its_base(order):
    tokenizer = continuous_tokenizer(order)
    levels = tokenizer.encode_levels(*batch(order))  # f_{B_0} = E(I), …, f_{B_n}
    quantized = tokenizer.quantize(levels)
    maps = quantized.tokens
    assert not hasattr(tokenizer, "codebook")
    assert [tuple(z.shape) for z in maps] == [(3, 8, m.side, m.side) for m in tokenizer.layout.maps]
    for p, end in enumerate(tokenizer.layout.component_ends()):  # base ≡ f_{B_n}, + D_n ≡ f_{B_{n−1}}, …, all ≡ f
        torch.testing.assert_close(tokenizer.compose(maps, end), levels[order - p], rtol=0, atol=1e-6)
        torch.testing.assert_close(quantized.prefixes[p], levels[order - p], rtol=0, atol=1e-6)
    # The coarse maps are what VQ quantises, unquantised: the area-downsampled residual, through up + φ.
    torch.testing.assert_close(maps[0], levels[order].mean((2, 3), keepdim=True))
    assert tokenizer.carrying == {tokenizer.layout.num_base - 1 + k for k in range(order + 1)}


def test_a_prefix_decodes_as_the_base_it_stands_for_and_the_replaced_layout_keeps_the_meaning():
    tokenizer = continuous_tokenizer(2)
    image, bases = batch(2)
    maps = tokenizer.tokenize(image, bases)
    base_path = tokenizer.decode(tokenizer.encode(bases[:, 1])).clamp(0, 1)  # the B_n path: D(E(B_2))
    torch.testing.assert_close(tokenizer.decode_prefix(maps, tokenizer.layout.num_base), base_path, atol=1e-5, rtol=0)
    torch.testing.assert_close(tokenizer.reconstruct(maps), tokenizer.decode(tokenizer.encode(image)).clamp(0, 1))
    # Replaced layout: the base ends below full resolution, so the base prefix approximates f_{B_n} (as codes do),
    # but the detail maps still end the composition exactly at f.
    replaced = continuous_tokenizer(1, TokenizerModelConfig(**{**vars(SMALL), "layout": "replace"}))
    levels = replaced.encode_levels(image, bases[:, :1])
    z = replaced.quantize(levels).tokens
    torch.testing.assert_close(replaced.compose(z), levels[0], rtol=0, atol=1e-6)
    assert (replaced.compose(z, replaced.layout.num_base) - levels[1]).abs().max() > 1e-3


def test_flattened_maps_round_trip_and_tokenize_base_is_exact():
    tokenizer = continuous_tokenizer(1)
    image, bases = batch(1)
    maps = tokenizer.tokenize(image, bases)
    z_BLC = flatten_maps(maps)
    assert z_BLC.shape == (3, tokenizer.layout.num_tokens, 8)
    assert all(torch.equal(a, b) for a, b in zip(split_maps(z_BLC, tokenizer.layout), maps, strict=True))
    f = tokenizer.encode(image)
    base_maps, f_hat = tokenizer.tokenize_base(f)
    torch.testing.assert_close(f_hat, f, rtol=0, atol=1e-6)


def test_save_and_load_keep_the_quantisation_and_vq_files_do_not_mention_it(tmp_path):
    tokenizer = continuous_tokenizer(1)
    save_tokenizer(tmp_path / "c", tokenizer, 16)
    loaded, config = load_tokenizer(tmp_path / "c")
    assert loaded.continuous and config["quantize"] == "continuous"
    save_tokenizer(tmp_path / "v", Tokenizer(SMALL, 1), 16)
    assert "quantize" not in json.loads((tmp_path / "v.json").read_text())


def test_a_continuous_tokenizer_trains_a_step_with_the_latent_regulariser():
    from pipeline.training.tokenizer_training import TokenizerLossConfig, TokenizerTask

    tokenizer = continuous_tokenizer(1).train()
    task = TokenizerTask(tokenizer, TokenizerLossConfig(lambda_prefix=1.0, lambda_highres=0.0), lambda: iter(()), 4)
    image, bases = batch(1)
    loss, logs = task.generator_loss((image, bases), 0)
    loss.backward()
    assert logs["latent_ms"] > 0 and torch.isfinite(loss)
    assert tokenizer.encoder.conv_in.weight.grad.abs().sum() > 0 and tokenizer.phi.convs[0].weight.grad is not None
    assert task.after_step(0, None) == {}  # no codes to start or restart


# -- the diffusion head ------------------------------------------------------------------------------------------


def mixture(label_N: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Class 0: two equal modes at (±1.5, 0.5), std 0.3; class 1: one mode at (0, −1), std 0.5."""
    n = len(label_N)
    side = torch.where(torch.rand(n, generator=g) < 0.5, -1.5, 1.5)
    zero = torch.stack([side, torch.full((n,), 0.5)], 1) + 0.3 * torch.randn(n, 2, generator=g)
    one = torch.tensor([0.0, -1.0]) + 0.5 * torch.randn(n, 2, generator=g)
    return torch.where(label_N[:, None] == 0, zero, one)


def test_the_head_learns_a_known_2d_mixture_per_condition(one_thread):
    torch.manual_seed(0)
    head = DiffusionHead(DiffusionConfig(width=64, depth=2, draws=4, timesteps=1000), channels=2, cond_width=4)
    conditions = torch.eye(4)[:2]  # the transformer's z of the two classes
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=0)
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        label_N = torch.randint(2, (256,), generator=g)
        loss = head.loss(conditions[label_N], mixture(label_N, g)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for label, mean, cov in [(0, [0.0, 0.5], [[2.34, 0.0], [0.0, 0.09]]), (1, [0.0, -1.0], [[0.25, 0], [0, 0.25]])]:
        z_NW = conditions[label].expand(2000, 4)
        x_NC = head.sample(z_NW, steps=50, temperature=1.0, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(x_NC.mean(0), torch.tensor(mean), atol=0.15, rtol=0)
        torch.testing.assert_close(torch.cov(x_NC.T), torch.tensor(cov), atol=0.15, rtol=0.2)
        if label == 0:  # two modes, not one blob between them
            assert (x_NC[:, 0].abs() < 0.5).float().mean() < 0.1


class ExactHead(DiffusionHead):
    """The head's sampler driven by the exact denoiser of a known mixture of diagonal Gaussians (weights w_K,
    means mu_KC, standard deviations sd_KC): x_t given component k is N(√ᾱ·μ_k, ᾱ·sd_k² + 1 − ᾱ), so E[x_0 | x_t]
    and Var[x_0 | x_t] are the responsibility-weighted moments of the components' Gaussian posteriors."""

    def __init__(self, w_K, mu_KC, sd_KC):
        super().__init__(DiffusionConfig(width=8, depth=1, timesteps=1000), channels=2, cond_width=1)
        self.w_K, self.mu_KC, self.sd_KC = (torch.tensor(v, dtype=torch.float64) for v in (w_K, mu_KC, sd_KC))

    def forward(self, x_NC, t_N, z_NW):
        a_bar = self.alpha_bar_T.double()[t_N][:, None, None]  # (N, 1, 1)
        x_N1C = x_NC.double()[:, None]
        var_NKC = a_bar * self.sd_KC**2 + 1 - a_bar
        log_p_NK = self.w_K.log() - 0.5 * ((x_N1C - a_bar.sqrt() * self.mu_KC) ** 2 / var_NKC + var_NKC.log()).sum(-1)
        r_NK1 = log_p_NK.softmax(-1)[..., None]
        mean_NKC = self.mu_KC + a_bar.sqrt() * self.sd_KC**2 / var_NKC * (x_N1C - a_bar.sqrt() * self.mu_KC)
        x0_NC = (r_NK1 * mean_NKC).sum(1)
        var0_NC = (r_NK1 * (self.sd_KC**2 * (1 - a_bar) / var_NKC + mean_NKC**2)).sum(1) - x0_NC**2
        a, s = a_bar[:, 0].sqrt(), (1 - a_bar[:, 0]).sqrt()
        v_NC = (a * x_NC.double() - x0_NC) / s
        if getattr(self.cfg, "variance", "fixed") == "learned":  # the log variance ratio the head predicts
            v_NC = torch.cat([v_NC, (var0_NC.clamp_min(1e-30) / s**2).log()], -1)
        return v_NC.float()


EXACT = {
    "gaussian": ([1.0], [[1.5, -0.7]], [[0.3, 0.8]]),
    "mixture": ([0.5, 0.5], [[-1.5, 0.5], [1.5, 0.5]], [[0.3, 0.3], [0.3, 0.3]]),  # class 0 of `mixture`
}


@pytest.mark.parametrize("steps", [SamplingConfig().diffusion_steps, 10])
@pytest.mark.parametrize("name", EXACT)
def test_the_sampler_fed_the_exact_denoiser_draws_the_true_mean_and_spread(name, steps):
    """Within 2 % of the true standard deviation (and of it for the mean), 40 000 draws (standard error of the
    std 0.35 %, of the mean 0.5 % of the std). The fixed posterior variance fails this: 0.271 / 0.760 at 50 steps
    and 0.21 / 0.64 at 10 for the Gaussian (docs/diffusion-sampler.md)."""
    w_K, mu_KC, sd_KC = EXACT[name]
    head = ExactHead(w_K, mu_KC, sd_KC)
    w, mu, sd = head.w_K[:, None], head.mu_KC, head.sd_KC
    true_mean = (w * mu).sum(0)
    true_std = ((w * (sd**2 + mu**2)).sum(0) - true_mean**2).sqrt()
    x_NC = head.sample(torch.zeros(40_000, 1), steps, 1.0, torch.Generator().manual_seed(0)).double()
    assert ((x_NC.mean(0) - true_mean).abs() / true_std).max() < 0.02, (x_NC.mean(0), true_mean)
    assert ((x_NC.std(0) / true_std - 1).abs()).max() < 0.02, (x_NC.std(0), true_std)


@pytest.mark.parametrize("variance", ["fixed", "learned"])
def test_head_sampling_is_deterministic_by_seed_and_guidance_combines_both_predictions(variance):
    torch.manual_seed(0)
    head = DiffusionHead(dataclasses.replace(HEAD, variance=variance), channels=3, cond_width=8)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    z_NW = torch.randn(10, 8)
    draw = [head.sample(z_NW[:5], 8, 1.0, torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
    # Guidance 1 is the conditional model; guidance 0 the unconditional velocity, with the conditional variance
    # (MAR): the unconditional model itself where the variance is fixed.
    for w, rows in ((1.0, z_NW[:5]), (0.0, z_NW[5:])):
        guided = head.sample(z_NW, 8, 1.0, torch.Generator().manual_seed(3), guidance=w)
        alone = head.sample(rows, 8, 1.0, torch.Generator().manual_seed(3))
        if w == 1.0 or variance == "fixed":  # (the random head's variances are large: float rounding scales up)
            torch.testing.assert_close(guided, alone, rtol=1e-4, atol=1e-4)
        else:
            assert not torch.allclose(guided, alone)
    assert head.schedule(4) == [99, 66, 33, 0] and head.schedule(500) == list(range(99, -1, -1))


def test_a_transformer_saved_without_the_variance_setting_loads_with_the_fixed_variance(tmp_path):
    tokenizer = continuous_tokenizer(1)
    torch.manual_seed(0)
    cfg = TransformerModelConfig(depth=1, width=32)
    old = dataclasses.replace(HEAD, variance="fixed")
    model = CART(cfg, tokenizer.layout, NUM_CLASSES, SMALL.codebook_size, SMALL.latent_channels, diffusion=old)
    save_transformer(tmp_path / "t", model)
    config = json.loads((tmp_path / "t.json").read_text())
    del config["diffusion"]["variance"]  # as written before the setting existed
    (tmp_path / "t.json").write_text(json.dumps(config))
    loaded, _ = load_transformer(tmp_path / "t")
    assert loaded.diffusion.cfg.variance == "fixed" and loaded.diffusion.output.out_features == SMALL.latent_channels


def test_init_from_a_fixed_variance_head_copies_its_velocity_rows_into_a_learned_variance_head(tmp_path):
    from pipeline.training.transformer_training import init_transformer_from

    tokenizer = continuous_tokenizer(1)
    cfg = TransformerModelConfig(depth=1, width=32)
    torch.manual_seed(0)
    fixed = dataclasses.replace(HEAD, variance="fixed")
    old = CART(cfg, tokenizer.layout, NUM_CLASSES, SMALL.codebook_size, SMALL.latent_channels, diffusion=fixed)
    with torch.no_grad():  # a trained head's output is not zero (the initialisation's is)
        old.diffusion.output.weight.normal_()
        old.diffusion.output.bias.normal_()
    save_transformer(tmp_path / "old", old)
    torch.manual_seed(1)
    new = CART(cfg, tokenizer.layout, NUM_CLASSES, SMALL.codebook_size, SMALL.latent_channels, diffusion=HEAD)
    report = init_transformer_from(new, tmp_path / "old")
    C = SMALL.latent_channels
    for name in ("weight", "bias"):
        ours, theirs = getattr(new.diffusion.output, name), getattr(old.diffusion.output, name)
        assert torch.equal(ours[:C], theirs) and not ours[C:].any()  # variance rows: unit variance, as initialised
    assert any(entry.startswith("diffusion.output.weight") for entry in report.partly)
    assert "diffusion.output.weight" not in report.fresh


# -- the transformer with the diffusion head --------------------------------------------------------------------


def diffusion_model(tokenizer: Tokenizer, seed: int = 0) -> CART:
    torch.manual_seed(seed)
    cfg = TransformerModelConfig(depth=2, width=32)
    model = CART(cfg, tokenizer.layout, NUM_CLASSES, SMALL.codebook_size, SMALL.latent_channels, diffusion=HEAD).eval()
    with torch.no_grad():  # real signal through the near-identity blocks and the zero-initialised head
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        model.token_rms_M.copy_(torch.linspace(1.0, 0.1, tokenizer.layout.num_maps))
    return model


def reference_sample(model: CART, tokenizer: Tokenizer, label_B, cfg: SamplingConfig, generator) -> list:
    """No cache: for every map, the full model on the maps drawn so far, the head drawing from its z (guided: from
    the conditional and unconditional z of two full passes)."""
    layout, B = model.layout, len(label_B)
    guided = cfg.guidance != 1.0
    labels = torch.cat([label_B, torch.full_like(label_B, NUM_CLASSES)]) if guided else label_B
    maps: list[torch.Tensor] = []
    for m, token_map in enumerate(layout.maps):
        inputs = [
            tokenizer.next_input(tokenizer.compose(maps, k), k).flatten(2).transpose(1, 2) for k in range(1, m + 1)
        ]
        x_BlC = torch.cat(inputs, dim=1) if inputs else torch.zeros(B, 0, SMALL.latent_channels)
        z_BLC = model.hidden(labels, x_BlC.repeat(2, 1, 1) if guided else x_BlC)[:, layout.offsets[m] :]
        w = guidance_weight(cfg, m, layout) if guided else None
        x_NC = model.diffusion.sample(z_BLC.flatten(0, 1), cfg.diffusion_steps, cfg.temperature, generator, w)
        z_BlC = x_NC.view(B, -1, SMALL.latent_channels) * model.token_rms_M[m]
        maps.append(z_BlC.transpose(1, 2).unflatten(2, (token_map.side, token_map.side)))
    return maps


@pytest.mark.parametrize(
    "cfg",
    [SamplingConfig(guidance=1.0, diffusion_steps=6), SamplingConfig(guidance=2.5, diffusion_steps=4, temperature=0.8)],
)
def test_kv_cached_sampling_draws_what_the_uncached_model_draws(cfg):
    torch.set_default_dtype(torch.float64)
    try:
        tokenizer = continuous_tokenizer(1).double()
        model = diffusion_model(tokenizer).double()
        label_B = torch.tensor([0, 1, 2, 0])
        cached = generate(model, tokenizer, label_B, cfg, torch.Generator().manual_seed(7))
        uncached = reference_sample(model, tokenizer, label_B, cfg, torch.Generator().manual_seed(7))
    finally:
        torch.set_default_dtype(torch.float32)
    assert [tuple(z.shape) for z in cached] == [(4, 8, m.side, m.side) for m in tokenizer.layout.maps]
    for m, (a, b) in enumerate(zip(cached, uncached, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=f"map {m} differs")
    assert cached[-1].std() > 0.01  # a real draw


def test_a_given_base_prefix_is_kept_and_only_the_details_are_drawn():
    tokenizer = continuous_tokenizer(1)
    model = diffusion_model(tokenizer)
    base = tokenizer.tokenize(*batch(1, n=2))[: tokenizer.layout.num_base]
    maps = generate(model, tokenizer, torch.tensor([0, 1]), SamplingConfig(diffusion_steps=3), prefix=base)
    assert all(a is b for a, b in zip(maps, base, strict=False)) and len(maps) == tokenizer.layout.num_maps
    with pytest.raises(ValueError, match="prefix shapes"):
        generate(model, tokenizer, torch.tensor([0, 1]), SamplingConfig(), prefix=[b[:, 0] for b in base])


def test_teacher_forced_diffusion_loss_is_per_token_and_save_load_keeps_head_and_scales(tmp_path):
    tokenizer = continuous_tokenizer(1)
    model = diffusion_model(tokenizer)
    image, bases = batch(1, n=2)
    z_BLC = flatten_maps(tokenizer.tokenize(image, bases))
    x_BlC = tokenizer.teacher_forcing_inputs(split_maps(z_BLC, tokenizer.layout))
    label_B = torch.tensor([0, 2])
    assert model.hidden(label_B, x_BlC).shape == (2, tokenizer.layout.num_tokens, 32)  # the head's condition z
    torch.manual_seed(5)
    loss_BL, _, _ = model(label_B, x_BlC, z_BLC)
    assert loss_BL.shape == (2, tokenizer.layout.num_tokens) and torch.isfinite(loss_BL).all()
    save_transformer(tmp_path / "t", model)
    loaded, config = load_transformer(tmp_path / "t")
    assert config["diffusion"] == vars(HEAD)
    assert torch.equal(loaded.token_rms_M, model.token_rms_M)
    torch.manual_seed(5)
    torch.testing.assert_close(loaded(label_B, x_BlC, z_BLC).loss_BL, loss_BL)


# -- configuration and the stages -------------------------------------------------------------------------------

CONTINUOUS = {
    "tokenizer": {"quantize": "continuous"},
    "transformer": {
        "head": "diffusion",
        "diffusion": {"width": 32, "depth": 1, "draws": 2, "timesteps": 100},
        "sampling": {"diffusion_steps": 4},
    },
}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"tokenizer": {"quantize": "continuous"}}, "tokenizer.quantize continuous and transformer.head softmax"),
        ({"transformer": {"head": "diffusion"}}, "tokenizer.quantize vq and transformer.head diffusion"),
        (
            {**CONTINUOUS, "transformer": {**CONTINUOUS["transformer"], "model": {"prediction": "next_token"}}},
            "transformer.model.prediction must be next_map",
        ),
    ],
)
def test_head_and_quantisation_that_do_not_fit_exit_2_naming_the_keys(workspace, override, expected):
    write_params(workspace, override)
    result = runner.invoke(app, ["train-transformer"])
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split())


def test_extract_train_sample_on_continuous_tokens(workspace):
    write_params(workspace, CONTINUOUS | {"transformer": {**CONTINUOUS["transformer"], "train": {"steps": 10}}})
    stem = add_tokens(workspace)
    manifest = json.loads(Path("data/tokens/manifest.json").read_text())
    assert manifest["quantize"] == "continuous" and len(manifest["token_rms"]) == len(manifest["layout"]["maps"])
    raw = next(iter(shards.read_samples(split_shards(Path("data/tokens/val")))))
    stored = shards.decode_npy(raw["tokens.npy"])
    assert stored.dtype == np.float16 and stored.shape == (manifest["layout"]["num_tokens"], 8)
    tokenizer, _ = load_tokenizer(stem)
    z_BLC = decode_token_sample(raw)[0][None]
    assert tokenizer.reconstruct(split_maps(z_BLC, tokenizer.layout)).shape == (1, 3, 16, 16)

    result = runner.invoke(app, ["train-transformer"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(Path("metrics/transformer.json").read_text())
    assert metrics["val_loss"] < metrics["val_loss_untrained"] and "val_acc" not in metrics
    assert len(metrics["val_loss_per_map"]) == len(manifest["layout"]["maps"])
    model, _ = load_transformer("models/transformer/transformer")
    assert model.diffusion is not None and model.token_rms_M.tolist() == pytest.approx(manifest["token_rms"])
    strip = runner.invoke(app, ["sample", "--n", "2", "--progressive", "--out", "fig1.png"])
    assert strip.exit_code == 0, strip.output
    assert Path("fig1.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_the_whole_chain_runs_on_continuous_tokens(workspace):
    """train-tokenizer → extract-tokens → train-transformer → evaluate, continuous and diffusion throughout."""
    write_params(workspace, CONTINUOUS | {"transformer": {**CONTINUOUS["transformer"], "train": {"steps": 6}}})
    for stage in ("train-tokenizer", "extract-tokens", "train-transformer", "train-evaluator", "evaluate"):
        result = runner.invoke(app, [stage])
        assert result.exit_code == 0, f"{stage}: {result.output}"
    tokenizer_metrics = json.loads(Path("metrics/tokenizer.json").read_text())["tokenizer"]
    assert tokenizer_metrics["latent_rms"] > 0 and "codebook_used" not in tokenizer_metrics
    assert Path("reports/tokenizer/figure7.png").exists()
    metrics = json.loads(Path("metrics/eval.json").read_text())
    for prefix in ("", "reconstruction_", "untrained_"):
        assert np.isfinite(metrics[f"{prefix}fid_ref"])
    assert np.isfinite(metrics["fid_ref_2x"]) and 0 <= metrics["class_consistency_ref"] <= 1
    for figure in ("samples", "progressive", "highres"):
        assert Path(f"reports/evaluate/{figure}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "override",
    [{"coarse": {"clusters": 8}}, {"train": {"self_correction": {"p": 0.5}}}],
    ids=["ctf", "self_correction"],
)
def test_codebook_options_are_refused_with_the_diffusion_head(override):
    from pipeline.config import ConfigError, build
    from pipeline.training.transformer_training import TransformerConfig

    with pytest.raises(ConfigError, match="head diffusion"):
        build(TransformerConfig, {"head": "diffusion", **override}, source="params.yaml", prefix="transformer")
