"""The next-detail transformer: block-causal attention, teacher forcing, KV-cached sampling, guidance, weights."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pipeline.tokenizer import Tokenizer, TokenizerModelConfig
from pipeline.train import decay_groups
from pipeline.transformer import (
    CART,
    SamplingConfig,
    TransformerModelConfig,
    generate,
    guidance_weight,
    load_transformer,
    sample_tokens,
    save_transformer,
)

TOKENIZER = TokenizerModelConfig(
    channels=8,
    channel_multipliers=[1, 2],
    res_blocks=1,
    attention=False,
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


def make_model(tokenizer: Tokenizer, seed: int = 0, **changes) -> CART:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(TINY, **changes)
    model = CART(cfg, tokenizer.layout, NUM_CLASSES, TOKENIZER.codebook_size, TOKENIZER.latent_channels).eval()
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
    assert model(torch.tensor([0, 1]), x_BlC).shape == (2, layout.num_tokens, TOKENIZER.codebook_size)
    if order == 0:  # VAR: every map a base map at its own scale
        assert [(m.side, m.is_base) for m in layout.maps] == [(s, True) for s in TOKENIZER.scales]
    else:
        assert [(m.side, m.level) for m in layout.maps] == [(1, 0), (2, 0), (3, 0), (4, 1)]
    with pytest.raises(ValueError, match="whole maps"):
        model(torch.tensor([0, 1]), x_BlC[:, :-1])


def test_block_causal_mask_hides_later_maps_and_shows_earlier_ones():
    torch.set_default_dtype(torch.float64)
    try:
        tokenizer = make_tokenizer()
        layout, offsets, L0 = tokenizer.layout, tokenizer.layout.offsets, tokenizer.layout.lengths[0]
        model = make_model(tokenizer)
        label_B = torch.tensor([0, 3, 4])
        x_BlC = tokenizer.teacher_forcing_inputs(random_indices(tokenizer, 3))
        logits_BLV = model(label_B, x_BlC)
        for m in range(1, layout.num_maps):
            changed = x_BlC.clone()
            changed[:, offsets[m] - L0 : offsets[m + 1] - L0] += torch.randn(3, layout.lengths[m], x_BlC.shape[-1])
            difference_L = (model(label_B, changed) - logits_BLV).abs().amax(dim=(0, 2))
            assert torch.all(difference_L[: offsets[m]] == 0), f"map {m} leaks into earlier maps"
            assert torch.all(difference_L[offsets[m] :] > 1e-6), f"some token at or after map {m} ignores map {m}"
        # A whole-map prefix of the inputs gives the same logits as the full sequence: the uncached reference.
        for m in range(layout.num_maps):
            prefix = model(label_B, x_BlC[:, : offsets[m + 1] - L0])
            torch.testing.assert_close(prefix, logits_BLV[:, : offsets[m + 1]], rtol=1e-12, atol=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def test_map_0_logits_depend_only_on_the_class():
    tokenizer = make_tokenizer()
    L0 = tokenizer.layout.lengths[0]
    model = make_model(tokenizer)
    x_BlC = tokenizer.teacher_forcing_inputs(random_indices(tokenizer, 2))
    logits_BLV = model(torch.tensor([1, 2]), x_BlC)
    assert torch.equal(model(torch.tensor([1, 2]), torch.randn_like(x_BlC))[:, :L0], logits_BLV[:, :L0])
    assert not torch.allclose(model(torch.tensor([2, 1]), x_BlC)[:, :L0], logits_BLV[:, :L0])


def test_class_dropout_replaces_labels_by_the_unconditional_class_in_training_only():
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, class_dropout=1.0)
    assert model.unconditional == NUM_CLASSES and model.class_embed.num_embeddings == NUM_CLASSES + 1
    x_BlC = tokenizer.teacher_forcing_inputs(random_indices(tokenizer, 2))
    label_B = torch.tensor([0, 4])
    unconditional = model(torch.full_like(label_B, NUM_CLASSES), x_BlC)
    conditional = model(label_B, x_BlC)
    assert not torch.allclose(conditional, unconditional)
    model.train()
    torch.testing.assert_close(model(label_B, x_BlC), unconditional)
    model = make_model(tokenizer, class_dropout=0.0).train()
    torch.testing.assert_close(model(label_B, x_BlC), model.eval()(label_B, x_BlC))


def reference_sample(model: CART, tokenizer: Tokenizer, label_B, cfg: SamplingConfig, generator, prefix=()) -> list:
    """No cache: for every map, the full model on the prefix sampled so far, its inputs rebuilt from the codes, and
    guidance applied to the logits: uncond + w·(cond − uncond)."""
    layout, B = model.layout, len(label_B)
    guided = cfg.guidance != 1.0
    labels = torch.cat([label_B, torch.full_like(label_B, NUM_CLASSES)]) if guided else label_B
    indices = list(prefix)
    for m, token_map in enumerate(layout.maps[len(prefix) :], start=len(prefix)):
        inputs = [
            tokenizer.next_input(tokenizer.compose(indices, k), k).flatten(2).transpose(1, 2) for k in range(1, m + 1)
        ]
        x_BlC = torch.cat(inputs, dim=1) if inputs else torch.zeros(B, 0, TOKENIZER.latent_channels)
        logits_BLV = model(labels, x_BlC.repeat(2, 1, 1) if guided else x_BlC)
        logits_BlV = logits_BLV[:, layout.offsets[m] :]
        if guided:
            cond, uncond = logits_BlV.chunk(2)
            logits_BlV = uncond + guidance_weight(cfg, m, layout.num_maps) * (cond - uncond)
        indices.append(sample_tokens(logits_BlV, cfg, generator).view(B, token_map.side, -1))
    return indices


@pytest.mark.parametrize(
    "order, cfg",
    [
        (1, SamplingConfig(guidance=1.0)),
        (1, SamplingConfig(guidance=3.0, top_k=8, top_p=0.9)),
        (1, SamplingConfig(guidance=2.0, guidance_schedule="constant", temperature=0.7, top_p=0.8)),
        (0, SamplingConfig(guidance=2.5, top_k=20)),
    ],
)
def test_kv_cached_sampling_draws_exactly_the_tokens_of_the_uncached_model(order, cfg):
    torch.set_default_dtype(torch.float64)  # cached and uncached logits then agree to ~1e-15: no draw can flip
    try:
        tokenizer = make_tokenizer(order).double()
        model = make_model(tokenizer).double()
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


def test_guidance_ramps_linearly_from_none_at_map_0_to_full_at_the_last_map():
    cfg = SamplingConfig(guidance=3.0)
    assert [guidance_weight(cfg, m, 5) for m in range(5)] == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert guidance_weight(dataclasses.replace(cfg, guidance_schedule="constant"), 0, 5) == 3.0


def test_save_then_load_gives_identical_logits(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, qk_norm=False)
    x_BlC = tokenizer.teacher_forcing_inputs(random_indices(tokenizer, 2))
    label_B = torch.tensor([3, NUM_CLASSES])
    save_transformer(tmp_path / "cart", model, {"order": 1})
    loaded, config = load_transformer(tmp_path / "cart")
    assert torch.equal(loaded(label_B, x_BlC), model(label_B, x_BlC))
    assert loaded.layout.maps == model.layout.maps and loaded.cfg == model.cfg and not loaded.training
    saved = json.loads((tmp_path / "cart.json").read_text())
    assert saved["layout"]["num_tokens"] == model.layout.num_tokens and saved["order"] == 1 == config["order"]


def test_embedding_tables_get_no_weight_decay():
    model = make_model(make_tokenizer())
    decayed = {id(p) for p in decay_groups(model, 0.1)[0]["params"]}
    tables = [model.class_embed, model.start_embed, model.pos_embed, model.level_embed]
    assert not decayed & {id(t.weight) for t in tables}
    assert id(model.blocks[0].attn.qkv.weight) in decayed
