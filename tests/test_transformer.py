"""The next-detail transformer: block-causal attention, teacher forcing, KV-cached sampling, guidance, weights."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from pipeline.models.coarse import codebook_clusters
from pipeline.models.heads import sample_tokens
from pipeline.models.tokenizer import Tokenizer, TokenizerModelConfig, TokenLayout
from pipeline.models.transformer import (
    CART,
    SamplingConfig,
    TransformerModelConfig,
    generate,
    guidance_weight,
    load_transformer,
    save_transformer,
)
from pipeline.training.train import decay_groups

TOKENIZER = TokenizerModelConfig(
    channels=8,
    channel_multipliers=[1, 2],
    res_blocks=1,
    attention_levels=[],
    mid_attention=False,
    latent_channels=8,
    codebook_size=32,
    scales=[1, 2, 3, 4],
    detail_depth=1,
)
TINY = TransformerModelConfig(depth=2, width=32)
NUM_CLASSES = 5


def make_tokenizer(order: int = 1) -> Tokenizer:
    torch.manual_seed(0)
    tokenizer = Tokenizer(TOKENIZER, order).eval()
    with torch.no_grad():  # codes spread like real encoder outputs, so that inputs differ from map to map
        tokenizer.codebook.weight.normal_(0, 0.5)
    return tokenizer


def make_model(tokenizer: Tokenizer, seed: int = 0, clusters: int = 0, **changes) -> CART:
    """A tiny transformer; with ``clusters`` a coarse-to-fine one over k-means clusters of the tokenizer's codes."""
    torch.manual_seed(seed)
    cfg = dataclasses.replace(TINY, **changes)
    model = CART(
        cfg, tokenizer.layout, NUM_CLASSES, TOKENIZER.codebook_size, TOKENIZER.latent_channels, clusters=clusters
    ).eval()
    if clusters:
        model.fine.set_clusters(codebook_clusters(tokenizer.codebook.weight, clusters, seed=0))
    # VAR's init starts every block as near-identity (gates ≈ 1e-5); shake the weights so that attention carries
    # real signal between maps and the claims below cannot hold vacuously.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def random_indices(tokenizer: Tokenizer, batch: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, TOKENIZER.codebook_size, (batch, m.side, m.side), generator=g) for m in tokenizer.layout.maps
    ]


def test_width_and_heads_follow_var_from_depth():
    cfg = TransformerModelConfig(depth=3)
    assert (cfg.resolved_width, cfg.resolved_heads) == (192, 3)
    assert (TransformerModelConfig(depth=3, width=96, heads=4).resolved_width, TINY.resolved_heads) == (96, 2)
    with pytest.raises(ValueError, match="width 30 .* heads 4"):
        TransformerModelConfig(depth=2, width=30, heads=4)


def test_tiny_tokenizer_has_a_4x4_latent_for_8px_images():
    tokenizer = make_tokenizer()
    f_BChw = tokenizer.encoder(torch.rand(1, 3, 8, 8))
    assert f_BChw.shape == (1, 8, 4, 4) and tokenizer.layout.latent_side == 4


@pytest.mark.parametrize("order", [0, 1])
def test_teacher_forcing_reads_maps_1_to_last_and_predicts_every_token(order):
    tokenizer = make_tokenizer(order)
    layout = tokenizer.layout
    model = make_model(tokenizer)
    x_BlC = tokenizer.teacher_forcing_inputs(random_indices(tokenizer, 2))
    assert x_BlC.shape == (2, layout.num_tokens - layout.lengths[0], TOKENIZER.latent_channels)
    logits_BLV = model.head(model.hidden(torch.tensor([0, 1]), x_BlC))
    assert logits_BLV.shape == (2, layout.num_tokens, TOKENIZER.codebook_size)
    if order == 0:  # VAR: every map a base map at its own scale
        assert [(m.side, m.is_base) for m in layout.maps] == [(s, True) for s in TOKENIZER.scales]
    else:
        assert [(m.side, m.level) for m in layout.maps] == [(1, 0), (2, 0), (3, 0), (4, 0), (4, 1)]
    with pytest.raises(ValueError, match="whole maps"):
        model.hidden(torch.tensor([0, 1]), x_BlC[:, :-1])


def test_block_causal_mask_hides_later_maps_and_shows_earlier_ones():
    torch.set_default_dtype(torch.float64)
    try:
        tokenizer = make_tokenizer()
        layout, offsets, L0 = tokenizer.layout, tokenizer.layout.offsets, tokenizer.layout.lengths[0]
        model = make_model(tokenizer)
        label_B = torch.tensor([0, 3, 4])
        x_BlC = tokenizer.teacher_forcing_inputs(random_indices(tokenizer, 3))
        logits_BLV = model.head(model.hidden(label_B, x_BlC))
        for m in range(1, layout.num_maps):
            changed = x_BlC.clone()
            changed[:, offsets[m] - L0 : offsets[m + 1] - L0] += torch.randn(3, layout.lengths[m], x_BlC.shape[-1])
            difference_L = (model.head(model.hidden(label_B, changed)) - logits_BLV).abs().amax(dim=(0, 2))
            assert torch.all(difference_L[: offsets[m]] == 0), f"map {m} leaks into earlier maps"
            assert torch.all(difference_L[offsets[m] :] > 1e-6), f"some token at or after map {m} ignores map {m}"
        # A whole-map prefix of the inputs gives the same logits as the full sequence: the uncached reference.
        for m in range(layout.num_maps):
            prefix = model.head(model.hidden(label_B, x_BlC[:, : offsets[m + 1] - L0]))
            torch.testing.assert_close(prefix, logits_BLV[:, : offsets[m + 1]], rtol=1e-12, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def test_map_0_logits_depend_only_on_the_class():
    tokenizer = make_tokenizer()
    L0 = tokenizer.layout.lengths[0]
    model = make_model(tokenizer)
    x_BlC = tokenizer.teacher_forcing_inputs(random_indices(tokenizer, 2))
    logits_BLV = model.head(model.hidden(torch.tensor([1, 2]), x_BlC))
    assert torch.equal(
        model.head(model.hidden(torch.tensor([1, 2]), torch.randn_like(x_BlC)))[:, :L0], logits_BLV[:, :L0]
    )
    assert not torch.allclose(model.head(model.hidden(torch.tensor([2, 1]), x_BlC))[:, :L0], logits_BLV[:, :L0])


def test_class_dropout_replaces_labels_by_the_unconditional_class_in_training_only():
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, class_dropout=1.0, drop_path=0.0)
    assert model.unconditional == NUM_CLASSES and model.class_embed.num_embeddings == NUM_CLASSES + 1
    x_BlC = tokenizer.teacher_forcing_inputs(random_indices(tokenizer, 2))
    label_B = torch.tensor([0, 4])
    unconditional = model.head(model.hidden(torch.full_like(label_B, NUM_CLASSES), x_BlC))
    conditional = model.head(model.hidden(label_B, x_BlC))
    assert not torch.allclose(conditional, unconditional)
    model.train()
    torch.testing.assert_close(model.head(model.hidden(label_B, x_BlC)), unconditional)
    model = make_model(tokenizer, class_dropout=0.0, drop_path=0.0).train()
    torch.testing.assert_close(
        model.head(model.hidden(label_B, x_BlC)), model.eval().head(model.hidden(label_B, x_BlC))
    )


def guide(logits: torch.Tensor, w: float | None) -> torch.Tensor:
    """uncond + w·(cond − uncond) on the logits of the conditional rows followed by the unconditional ones."""
    if w is None:
        return logits
    cond, uncond = logits.chunk(2)
    return uncond + w * (cond - uncond)


def reference_sample(model: CART, tokenizer: Tokenizer, label_B, cfg: SamplingConfig, generator, prefix=()) -> list:
    """No cache: for every map, the full model on the prefix sampled so far, its inputs rebuilt from the codes, and
    guidance applied to the logits: uncond + w·(cond − uncond). Coarse-to-fine, that draws the labels; the codes
    are drawn from the fine logits given them, guided too."""
    layout, B = model.layout, len(label_B)
    guided = cfg.guidance != 1.0
    labels = torch.cat([label_B, torch.full_like(label_B, NUM_CLASSES)]) if guided else label_B
    indices = list(prefix)
    for m, token_map in enumerate(layout.maps[len(prefix) :], start=len(prefix)):
        inputs = [
            tokenizer.next_input(tokenizer.compose(indices, k), k).flatten(2).transpose(1, 2) for k in range(1, m + 1)
        ]
        x_BlC = torch.cat(inputs, dim=1) if inputs else torch.zeros(B, 0, TOKENIZER.latent_channels)
        x_BlC = x_BlC.repeat(2, 1, 1) if guided else x_BlC
        w, start, end = (
            guidance_weight(cfg, m, layout) if guided else None,
            layout.offsets[m],
            layout.offsets[m + 1],
        )
        h_BLC = model.hidden(labels, x_BlC)
        idx_Bl = sample_tokens(guide(model.head(h_BLC)[:, start:], w), cfg, generator)
        if model.fine is not None:
            coarse_BL = torch.zeros(len(labels), end, dtype=torch.long)  # earlier tokens' labels: any (unread)
            coarse_BL[:, start:] = idx_Bl.repeat(len(labels) // B, 1)
            fine_BlV = guide(model.fine(h_BLC, coarse_BL)[:, start:], w)
            idx_Bl = sample_tokens(model.fine.restrict(fine_BlV, idx_Bl), cfg, generator)
        indices.append(idx_Bl.view(B, token_map.side, -1))
    return indices


@pytest.mark.parametrize("clusters", [0, 4])  # 4: coarse-to-fine prediction
@pytest.mark.parametrize(
    "order, cfg",
    [
        (1, SamplingConfig(guidance=1.0)),
        (1, SamplingConfig(guidance=3.0, top_k=8, top_p=0.9)),
        (1, SamplingConfig(guidance=2.0, guidance_schedule="constant", temperature=0.7, top_p=0.8)),
        (0, SamplingConfig(guidance=2.5, top_k=20)),
    ],
)
def test_kv_cached_sampling_draws_exactly_the_tokens_of_the_uncached_model(order, cfg, clusters):
    torch.set_default_dtype(torch.float64)  # cached and uncached logits then agree to ~1e-15: no draw can flip
    try:
        tokenizer = make_tokenizer(order).double()
        model = make_model(tokenizer, clusters=clusters).double()
        label_B = torch.tensor([0, 1, 2, 3, 4, 0])
        cached = generate(model, tokenizer, label_B, cfg, torch.Generator().manual_seed(7))
        uncached = reference_sample(model, tokenizer, label_B, cfg, torch.Generator().manual_seed(7))
    finally:
        torch.set_default_dtype(torch.float32)
    assert [tuple(i.shape) for i in cached] == [(6, m.side, m.side) for m in tokenizer.layout.maps]
    for m, (a, b) in enumerate(zip(cached, uncached, strict=True)):
        assert torch.equal(a, b), f"map {m} differs"
    assert len(torch.cat([i.flatten() for i in cached]).unique()) > 5  # a real draw, not a constant


def test_a_given_prefix_is_kept_and_the_rest_sampled_as_the_uncached_model_would():
    torch.set_default_dtype(torch.float64)
    try:
        tokenizer = make_tokenizer().double()
        model = make_model(tokenizer).double()
        label_B = torch.tensor([0, 1, 2, 3])
        base = random_indices(tokenizer, 4, seed=3)[: tokenizer.layout.num_base]
        cfg = SamplingConfig(guidance=2.0, top_k=10)
        cached = generate(model, tokenizer, label_B, cfg, torch.Generator().manual_seed(5), prefix=base)
        uncached = reference_sample(model, tokenizer, label_B, cfg, torch.Generator().manual_seed(5), prefix=base)
    finally:
        torch.set_default_dtype(torch.float32)
    assert all(a is b for a, b in zip(cached, base, strict=False))
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached, strict=True))
    with pytest.raises(ValueError, match="prefix shapes"):
        generate(model, tokenizer, label_B, cfg, prefix=[base[1]])


def test_same_seed_same_samples_different_seed_different_samples():
    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    label_B = torch.tensor([0, 1, 2, 3])
    calls = []
    first = generate(
        model, tokenizer, label_B, SamplingConfig(seed=1), on_map=lambda m, idx: calls.append((m, len(idx)))
    )
    again = generate(model, tokenizer, label_B, SamplingConfig(seed=1))
    other = generate(model, tokenizer, label_B, SamplingConfig(seed=2))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert calls == [(m, m + 1) for m in range(tokenizer.layout.num_maps)]


def test_top_k_and_top_p_keep_only_the_likeliest_codes():
    logits_BlV = torch.randn(4, 50, 32)
    best_Bl = logits_BlV.argmax(-1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_tokens(logits_BlV, SamplingConfig(top_k=1), g), best_Bl)
    assert torch.equal(sample_tokens(logits_BlV, SamplingConfig(top_p=1e-6), g), best_Bl)
    top3 = logits_BlV.topk(3, dim=-1).indices
    drawn = sample_tokens(logits_BlV, SamplingConfig(top_k=3, top_p=0.999), g)
    assert (drawn[..., None] == top3).any(-1).all()
    assert (drawn != best_Bl).any()  # not only the argmax: the draw spreads over the three


def test_draws_follow_the_softmax_and_never_pick_an_impossible_code():
    probs_V = torch.tensor([0.5, 0.3, 0.0, 0.15, 0.05])
    logits_BlV = probs_V.log().expand(4, 5000, 5)
    drawn = sample_tokens(logits_BlV, SamplingConfig(), torch.Generator().manual_seed(0))
    frequencies = torch.bincount(drawn.flatten(), minlength=5) / drawn.numel()
    torch.testing.assert_close(frequencies, probs_V, atol=0.01, rtol=0)
    assert frequencies[2] == 0


def _weights(cfg: SamplingConfig, layout: TokenLayout) -> list[float]:
    return [guidance_weight(cfg, m, layout) for m in range(layout.num_maps)]


def test_guidance_ramps_over_vars_scales_and_holds_w_on_the_appended_detail_maps():
    cfg = SamplingConfig(guidance=3.0)
    scales = [1, 2, 3, 4, 8]
    # Order 0 is VAR: the ramp from 1 at the first scale to w at the last.
    assert _weights(cfg, TokenLayout(scales, 0, 1)) == [1.0, 1.5, 2.0, 2.5, 3.0]
    # Order 3, appended: the base maps get exactly VAR's weights, each detail map the final w.
    assert _weights(cfg, TokenLayout(scales, 3, 1)) == [1.0, 1.5, 2.0, 2.5, 3.0, 3.0, 3.0, 3.0]
    assert _weights(cfg, TokenLayout(scales, 2, 2)) == [1.0, 1.5, 2.0, 2.5] + [3.0] * 5
    # Replaced: the details stand in VAR's last scales' places and get VAR's weights there.
    assert _weights(cfg, TokenLayout(scales, 2, 1, "replace")) == [1.0, 1.5, 2.0, 2.5, 3.0]
    # One base map (Table 3's single-base row): full guidance throughout, as VAR with one scale.
    assert _weights(cfg, TokenLayout([8], 3, 1)) == [3.0] * 4
    # The ramp over every map (linear): VAR's at order 0, but it guides order 3's full-latent base map with 2.0
    # where VAR's gets 3.0.
    before = dataclasses.replace(cfg, guidance_schedule="linear")
    assert _weights(before, TokenLayout(scales, 0, 1)) == _weights(cfg, TokenLayout(scales, 0, 1))
    assert _weights(before, TokenLayout([1, 2, 3, 4, 8], 4, 1))[4] == 2.0
    constant = dataclasses.replace(cfg, guidance_schedule="constant")
    assert _weights(constant, TokenLayout(scales, 3, 1)) == [3.0] * 8


def test_save_then_load_gives_identical_logits(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, qk_norm=False)
    x_BlC = tokenizer.teacher_forcing_inputs(random_indices(tokenizer, 2))
    label_B = torch.tensor([3, NUM_CLASSES])
    save_transformer(tmp_path / "cart", model, {"order": 1})
    loaded, config = load_transformer(tmp_path / "cart")
    assert torch.equal(loaded.head(loaded.hidden(label_B, x_BlC)), model.head(model.hidden(label_B, x_BlC)))
    assert loaded.layout.maps == model.layout.maps and loaded.cfg == model.cfg and not loaded.training
    saved = json.loads((tmp_path / "cart.json").read_text())
    assert saved["layout"]["num_tokens"] == model.layout.num_tokens and saved["order"] == 1 == config["order"]


def test_position_and_level_tables_get_no_weight_decay_and_the_class_table_does_as_in_var():
    model = make_model(make_tokenizer())
    decayed = {id(p) for p in decay_groups(model, 0.1, model.decayed_embeddings())[0]["params"]}
    tables = [model.start_embed, model.pos_embed, model.level_embed]
    assert not decayed & {id(t.weight) for t in tables}
    assert id(model.blocks[0].attn.qkv.weight) in decayed and id(model.class_embed.weight) in decayed
    assert not decayed & {id(model.blocks[0].attn.q_bias), id(model.blocks[0].attn.log_scale_H)}
    undecayed = make_model(make_tokenizer(), decay_class_embedding=False)
    decayed = {id(p) for p in decay_groups(undecayed, 0.1, undecayed.decayed_embeddings())[0]["params"]}
    assert id(undecayed.class_embed.weight) not in decayed


def test_initialisation_is_vars():
    """std √(1/(3C)) for matrices and tables, AdaLN weights × 0.5, gates × 1e-5, head × 0.02, q/v biases zero."""
    torch.manual_seed(0)
    cfg = TransformerModelConfig(depth=4, width=192, heads=4)
    model = CART(cfg, make_tokenizer().layout, NUM_CLASSES, 512, TOKENIZER.latent_channels)
    std, C = (1 / (3 * 192)) ** 0.5, 192
    assert abs(model.blocks[1].fc1.weight.std() - std) < 0.05 * std
    assert abs(model.pos_embed.weight.std() - std) < 0.05 * std
    assert abs(model.head.weight.std() - 0.02 * std) < 0.05 * 0.02 * std
    rows = model.ada_lin.weight.view(6 * 4 + 2, C, C)
    assert abs(rows[6 * 2 + 4].std() - 0.5 * std) < 0.05 * 0.5 * std  # block 2's shift1
    assert abs(rows[6 * 3 + 1].std() - 1e-5 * std) < 0.05 * 1e-5 * std  # block 3's gate2
    assert abs(rows[-1].std() - 0.5 * std) < 0.05 * 0.5 * std  # the head's AdaLN
    assert not model.blocks[0].attn.q_bias.any() and not model.blocks[0].attn.v_bias.any()
    assert abs(model.blocks[3].fc2.weight.std() - std / 8**0.5) < 0.05 * std / 8**0.5  # ÷ √(2·depth)
    explicit = CART(dataclasses.replace(cfg, init_std=0.02), make_tokenizer().layout, NUM_CLASSES, 512, 8)
    assert abs(explicit.blocks[1].fc1.weight.std() - 0.02) < 0.001


def test_stochastic_depth_rises_linearly_to_vars_rate_and_only_in_training():
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, depth=4, width=32, class_dropout=0.0)
    assert [round(b.drop_path, 6) for b in model.blocks] == [
        0.0,
        round(0.1 * 4 / 24 / 3, 6),
        round(0.1 * 4 / 24 * 2 / 3, 6),
        round(0.1 * 4 / 24, 6),
    ]
    heavy = make_model(tokenizer, depth=4, width=32, class_dropout=0.0, drop_path=0.9)
    x_BlC = tokenizer.teacher_forcing_inputs(random_indices(tokenizer, 16))
    label_B = torch.zeros(16, dtype=torch.long)
    logits = heavy.head(heavy.hidden(label_B, x_BlC))
    assert torch.equal(logits, heavy.head(heavy.hidden(label_B, x_BlC)))  # eval: deterministic, nothing dropped
    heavy.train()
    torch.manual_seed(0)
    first = heavy.head(heavy.hidden(label_B, x_BlC))
    assert not torch.allclose(
        first, heavy.head(heavy.hidden(label_B, x_BlC))
    )  # a new draw of dropped branches per call
    assert not torch.allclose(first, heavy.eval().head(heavy.hidden(label_B, x_BlC)))


def test_attention_has_no_k_bias_and_vars_temperature_without_qk_norm():
    torch.manual_seed(0)
    attn = CART(dataclasses.replace(TINY, qk_norm=False), make_tokenizer().layout, NUM_CLASSES, 32, 8).blocks[0].attn
    assert "k_bias" not in attn.state_dict() and attn.qkv.bias is None
    with torch.no_grad():
        attn.q_bias.normal_(), attn.v_bias.normal_()
    x_BLC = torch.randn(2, 5, 32)
    q, k, v = (x_BLC @ attn.qkv.weight.T).chunk(3, dim=-1)
    q, v = q + attn.q_bias, v + attn.v_bias
    heads = lambda t: t.view(2, 5, 2, 16).transpose(1, 2)  # noqa: E731
    weights = (heads(q) @ heads(k).transpose(-1, -2) * 0.25 / 16**0.5).softmax(-1)
    expected = attn.proj((weights @ heads(v)).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x_BLC), expected)


def test_var_fid_preset_is_vars_recipe():
    preset = SamplingConfig(guidance=1.0, top_k=3, preset="var_fid").resolved()
    assert (preset.guidance, preset.top_k, preset.top_p, preset.guidance_schedule) == (2.5, 900, 0.96, "linear_scales")
    assert SamplingConfig(top_k=3).resolved().top_k == 3
    # VAR's logits (1 + t)·cond − t·uncond with t = 1.5·m/(M − 1) are ours with w = 1 + t.
    assert _weights(preset, TokenLayout([1, 2, 3, 4], 0, 1)) == [1.0, 1.5, 2.0, 2.5]


def test_init_from_copies_what_fits_and_the_embeddings_of_the_shared_maps(tmp_path):
    """An order-0 (VAR) transformer starts an order-2 one: VAR's maps 1² … 4² open both layouts."""
    from pipeline.training.transformer_training import init_transformer_from

    source = make_model(make_tokenizer(order=0), seed=1)
    save_transformer(tmp_path / "var", source)
    torch.manual_seed(5)
    target = CART(TINY, make_tokenizer(order=2).layout, NUM_CLASSES + 2, 32, 8)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = init_transformer_from(target, tmp_path / "var")
    after, theirs = target.state_dict(), source.state_dict()
    assert "class_embed.weight" in report.fresh and torch.equal(
        after["class_embed.weight"], before["class_embed.weight"]
    )
    by_map = {"pos_embed.weight", "level_embed.weight"}  # copied by map, never whole across layouts
    assert set(report.copied) == {k for k in after if k in theirs and after[k].shape == theirs[k].shape} - by_map
    assert all(torch.equal(after[k], theirs[k]) for k in report.copied) and "ada_lin.weight" in report.copied
    shared = target.layout.offsets[4]  # the tokens of VAR's four maps
    assert torch.equal(after["pos_embed.weight"][:shared], theirs["pos_embed.weight"][:shared])
    assert torch.equal(after["pos_embed.weight"][shared:], before["pos_embed.weight"][shared:])
    assert torch.equal(after["level_embed.weight"][:4], theirs["level_embed.weight"][:4])
    assert torch.equal(after["level_embed.weight"][4:], before["level_embed.weight"][4:])
    assert len(report.partly) == 2
    narrow = CART(dataclasses.replace(TINY, width=16), make_tokenizer(order=1).layout, NUM_CLASSES, 32, 8)
    with pytest.raises(ValueError, match="width 32, transformer.model gives 16"):
        init_transformer_from(narrow, tmp_path / "var")


@pytest.mark.parametrize("clusters", [0, 4])  # 4: coarse-to-fine, the CTF paper's own (raster-order) setting
def test_next_token_prediction_is_token_causal_and_its_cached_sampling_matches_the_full_model(clusters):
    """The Table-3 'AR' row: one full-resolution map, raster order, each token reading the code before it."""
    from pipeline.models.transformer import teacher_forcing_inputs

    torch.set_default_dtype(torch.float64)
    try:
        tokenizer = Tokenizer(dataclasses.replace(TOKENIZER, scales=[4]), 0).eval()
        with torch.no_grad():
            tokenizer.codebook.weight.normal_(0, 0.5)
        model = make_model(tokenizer, clusters=clusters, prediction="next_token")
        indices = random_indices(tokenizer, 3)
        x_BlC = teacher_forcing_inputs(model, tokenizer, indices)
        assert x_BlC.shape == (3, 15, TOKENIZER.latent_channels)
        label_B = torch.tensor([0, 1, 2])
        logits = model.head(model.hidden(label_B, x_BlC))
        changed = x_BlC.clone()
        changed[:, 6] += 1.0  # the input of token 7, i.e. the code of token 6
        other = model.head(model.hidden(label_B, changed))
        assert torch.equal(logits[:, :7], other[:, :7]) and not torch.allclose(logits[:, 7:], other[:, 7:])
        prefix = model.head(model.hidden(label_B, x_BlC[:, :5]))
        torch.testing.assert_close(prefix, logits[:, :6])  # any prefix of tokens

        cfg = SamplingConfig(guidance=2.0, top_k=10)
        cached = generate(model, tokenizer, label_B, cfg, torch.Generator().manual_seed(3))
        g, drawn = torch.Generator().manual_seed(3), torch.zeros(3, 0, dtype=torch.long)
        for i in range(16):
            x = tokenizer.codebook.weight[drawn]  # codes drawn so far (the input of token i + 1 is token i's)
            labels, x = torch.cat([label_B, torch.full_like(label_B, NUM_CLASSES)]), x.repeat(2, 1, 1)
            h_BLC = model.hidden(labels, x)
            idx_B1 = sample_tokens(guide(model.head(h_BLC)[:, i : i + 1], 2.0), cfg, g)
            if clusters:  # that was the label; the code given it
                coarse_BL = torch.cat([torch.zeros(6, i, dtype=torch.long), idx_B1.repeat(2, 1)], dim=1)
                fine_B1V = guide(model.fine(h_BLC, coarse_BL)[:, i : i + 1], 2.0)
                idx_B1 = sample_tokens(model.fine.restrict(fine_B1V, idx_B1), cfg, g)
            drawn = torch.cat([drawn, idx_B1], dim=1)
    finally:
        torch.set_default_dtype(torch.float32)
    assert cached[0].shape == (3, 4, 4) and torch.equal(cached[0].flatten(1), drawn)


def check_device_paths(device: str) -> None:
    """Teacher forcing on ``device`` (masked SDPA) matches the CPU's in fp32 and, loosely, under bf16 autocast;
    KV-cached sampling on it draws the uncached model's tokens (in fp64, where no draw can flip)."""
    tokenizer = make_tokenizer(1)
    model = make_model(tokenizer)
    label_B = torch.tensor([0, 3, 4])
    x_BlC = tokenizer.teacher_forcing_inputs(random_indices(tokenizer, 3))
    expected = model.head(model.hidden(label_B, x_BlC))
    moved = copy.deepcopy(model).to(device)
    torch.testing.assert_close(
        moved.head(moved.hidden(label_B.to(device), x_BlC.to(device))).cpu(), expected, rtol=1e-3, atol=1e-3
    )
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        bf16 = moved.head(moved.hidden(label_B.to(device), x_BlC.to(device))).float().cpu()
    assert (bf16 - expected).abs().max() < 0.05 * expected.abs().max()
    cfg = SamplingConfig(guidance=2.5, top_k=20)
    torch.set_default_dtype(torch.float64)
    torch.set_default_device(device)
    try:
        tokenizer, model = tokenizer.to(device).double(), moved.double()
        labels = torch.tensor([0, 1, 2, 3, 4, 0])
        cached = generate(model, tokenizer, labels, cfg, torch.Generator(device).manual_seed(7))
        uncached = reference_sample(model, tokenizer, labels, cfg, torch.Generator(device).manual_seed(7))
    finally:
        torch.set_default_dtype(torch.float32)
        torch.set_default_device(None)
    for m, (a, b) in enumerate(zip(cached, uncached, strict=True)):
        assert a.device.type == torch.device(device).type and torch.equal(a, b), f"map {m} differs"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_teacher_forcing_matches_the_cpu_and_cached_sampling_the_uncached_model():
    check_device_paths("cuda")
