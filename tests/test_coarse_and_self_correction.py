"""Coarse-to-fine prediction (CTF) and self-correction training: exact sampling, the loss, off means today."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError
from pipeline.data.tokens import split_maps
from pipeline.models.coarse import CoarseConfig, codebook_clusters
from pipeline.models.tokenizer import Tokenizer
from pipeline.models.transformer import (
    CART,
    forward_flops,
    load_transformer,
    save_transformer,
)
from pipeline.training.self_correction import SelfCorrectionConfig, self_correct
from pipeline.training.transformer_training import TransformerConfig, TransformerTask, run_settings
from tests.test_transformer import NUM_CLASSES, TINY, TOKENIZER, make_model, make_tokenizer, random_indices

V = TOKENIZER.codebook_size


def test_clusters_are_k_means_of_the_codebook_deterministic_by_seed_and_all_used():
    codes_VC = make_tokenizer().codebook.weight
    labels_V = codebook_clusters(codes_VC, 4, seed=3)
    assert torch.equal(labels_V, codebook_clusters(codes_VC, 4, seed=3))
    assert labels_V.shape == (V,) and set(labels_V.tolist()) == set(range(int(labels_V.max()) + 1))
    # k-means: every code is nearer its own cluster's mean than any other's.
    means_KC = torch.stack([codes_VC[labels_V == k].mean(0) for k in range(int(labels_V.max()) + 1)])
    assert torch.equal(torch.cdist(codes_VC, means_KC).argmin(1), labels_V)
    for bad in (1, V):
        with pytest.raises(ConfigError, match="transformer.coarse.clusters"):
            codebook_clusters(codes_VC, bad, seed=0)


@pytest.mark.parametrize("order", [0, 1])
def test_the_ctf_loss_is_the_nll_of_a_distribution_over_the_whole_codebook(order):
    """p(k | h)·p(v | h, k) sums to one over all V codes, and coarse CE + fine CE is −log of it."""
    tokenizer = make_tokenizer(order)
    model = make_model(tokenizer, clusters=4)
    indices = random_indices(tokenizer, 2)
    idx_BL = torch.cat([i.flatten(1) for i in indices], dim=1)
    label_B, x_BlC = torch.tensor([1, 3]), tokenizer.teacher_forcing_inputs(indices)
    loss_BL, correct_BL, parts = model(label_B, x_BlC, idx_BL)
    cluster_V = model.fine.cluster_V
    log_p_BLV = torch.zeros(*idx_BL.shape, V)
    for k in range(model.fine.clusters):  # the joint, code by code, each under its own label
        coarse_BL = torch.full_like(idx_BL, k)
        h_BLC = model.hidden(label_B, x_BlC)
        logits_BLK, fine_BLV = model.head(h_BLC), model.fine(h_BLC, coarse_BL)
        joint_BLV = logits_BLK.log_softmax(-1)[..., k : k + 1] + model.fine.restrict(fine_BLV, coarse_BL).log_softmax(
            -1
        )
        log_p_BLV = torch.where(cluster_V == k, joint_BLV, log_p_BLV)
    torch.testing.assert_close(log_p_BLV.logsumexp(-1), torch.zeros(idx_BL.shape), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss_BL, -log_p_BLV.gather(-1, idx_BL[..., None])[..., 0])
    torch.testing.assert_close(parts["loss_coarse"] + parts["loss_fine"], loss_BL.mean())
    # Greedy: the likeliest label, then its likeliest code.
    h_BLC = model.hidden(label_B, x_BlC)
    greedy_k = model.head(h_BLC).argmax(-1)
    greedy_v = model.fine.restrict(model.fine(h_BLC, greedy_k), greedy_k).argmax(-1)
    assert torch.equal(correct_BL, greedy_v == idx_BL)


def test_save_then_load_keeps_the_clusters_and_the_logits(tmp_path):
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, clusters=4)
    save_transformer(tmp_path / "ctf", model)
    loaded, config = load_transformer(tmp_path / "ctf")
    assert (
        torch.equal(loaded.fine.cluster_V, model.fine.cluster_V)
        and config["coarse_labels"] == model.fine.cluster_V.tolist()
    )
    indices = random_indices(tokenizer, 2)
    x_BlC, label_B = tokenizer.teacher_forcing_inputs(indices), torch.tensor([0, 2])
    coarse_BL = model.fine.cluster_V[torch.cat([i.flatten(1) for i in indices], dim=1)]

    def outputs(m: CART) -> tuple[torch.Tensor, torch.Tensor]:  # the label logits, the fine logits given the labels
        h_BLC = m.hidden(label_B, x_BlC)
        return m.head(h_BLC), m.fine(h_BLC, coarse_BL)

    for a, b in zip(outputs(loaded), outputs(model), strict=True):
        assert torch.equal(a, b)


def test_off_means_todays_model_weights_file_and_loss(tmp_path):
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    today = CART(TINY, tokenizer.layout, NUM_CLASSES, V, TOKENIZER.latent_channels)
    torch.manual_seed(0)
    off = CART(TINY, tokenizer.layout, NUM_CLASSES, V, TOKENIZER.latent_channels, clusters=0)
    assert off.fine is None and today.state_dict().keys() == off.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(today.state_dict().values(), off.state_dict().values(), strict=True))
    save_transformer(tmp_path / "off", off)
    assert "coarse_labels" not in json.loads((tmp_path / "off.json").read_text())
    indices = random_indices(tokenizer, 2)
    idx_BL = torch.cat([i.flatten(1) for i in indices], dim=1)
    x_BlC, label_B = tokenizer.teacher_forcing_inputs(indices), torch.tensor([0, 1])
    logits_BLV = today.head(today.hidden(label_B, x_BlC))
    loss_BL, correct_BL, parts = off(label_B, x_BlC, idx_BL)
    assert torch.equal(loss_BL, F.cross_entropy(logits_BLV.transpose(1, 2), idx_BL, reduction="none")) and not parts
    assert torch.equal(correct_BL, logits_BLV.argmax(-1) == idx_BL)


def test_forward_flops_count_the_fine_head_on_every_trunk_row():
    tokenizer = make_tokenizer()
    plain, ctf = CART(TINY, tokenizer.layout, NUM_CLASSES, V, 8), make_model(tokenizer, clusters=4)
    C, L = TINY.resolved_width, tokenizer.layout.num_tokens
    head = 2 * C * L * (4 - V)  # the head predicts 4 labels instead of V codes
    fine = 2 * (C * C + C * V) * L
    assert forward_flops(ctf, 1, 1) == forward_flops(plain, 1, 1) + head + fine
    assert forward_flops(ctf, 2, 1) == forward_flops(plain, 2, 1) + head + 2 * fine


# -- self-correction --------------------------------------------------------------------------------------------


def quantised_tokens(tokenizer: Tokenizer, batch: int) -> list[torch.Tensor]:
    """Algorithm 1's tokens of random smooth images: the clean tokens training reads."""
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.interpolate(torch.rand(batch, 3, 2, 2, generator=g), size=8, mode="bilinear")
    bases = images[:, None].expand(batch, max(tokenizer.order, 1), 3, 8, 8) * 0.8
    return tokenizer.tokenize(images, bases)


LAYOUTS = [(0, "append"), (3, "append"), (3, "replace")]


@pytest.mark.parametrize("order, mode", LAYOUTS)
def test_corrected_targets_steer_the_perturbed_prefix_back_to_the_clean_composition(order, mode):
    """On average over samples: Algorithm 1's greedy codes, seen through φ and bicubic upsampling, are not the
    best per sample (with this untrained tokenizer 50–90 % of the samples come closer), but they are in the mean."""
    torch.manual_seed(0)
    tokenizer = Tokenizer(dataclasses.replace(TOKENIZER, layout=mode), order).eval()
    with torch.no_grad():
        tokenizer.codebook.weight.normal_(0, 0.5)
    clean = quantised_tokens(tokenizer, 32)
    M = tokenizer.layout.num_maps
    torch.manual_seed(1)
    inputs, targets = self_correct(tokenizer, clean, SelfCorrectionConfig(p=1.0, ratio=0.3))
    f_clean = tokenizer.compose(clean)
    corrected, uncorrected = [], []
    for b in range(32):
        changed = [m for m in range(M) if not torch.equal(inputs[m][b], clean[m][b])]
        m = changed[0]  # the perturbed map: the first that differs; it keeps its clean target
        assert m < M - 1 and all(torch.equal(targets[k][b], clean[k][b]) for k in range(m + 1))
        assert all(torch.equal(inputs[k][b], targets[k][b]) for k in range(M) if k != m)
        assert (inputs[m][b] != clean[m][b]).sum() == max(1, round(0.3 * clean[m][b].numel()))
        mine = [t[b : b + 1] for t in inputs]
        corrected.append((tokenizer.compose(mine) - f_clean[b]).square().mean())
        uncorrected.append(
            (tokenizer.compose(mine[: m + 1] + [t[b : b + 1] for t in clean[m + 1 :]]) - f_clean[b]).square().mean()
        )
    assert torch.stack(corrected).mean() < 0.95 * torch.stack(uncorrected).mean()
    # Left alone (p = 0 for a sample), the maps come back as they were.
    inputs, targets = self_correct(tokenizer, clean, SelfCorrectionConfig(p=0.0))
    assert all(a is b or torch.equal(a, b) for a, b in zip(inputs + targets, clean + clean, strict=True))


def test_with_p_0_training_is_todays_exactly():
    """p = 0 draws nothing, reads the clean inputs and gives today's loss and gradients bit for bit."""
    tokenizer = make_tokenizer(order=1)
    model = CART(TINY, tokenizer.layout, NUM_CLASSES, V, 8).train()
    indices = random_indices(tokenizer, 4)
    idx_BL, label_B = torch.cat([i.flatten(1) for i in indices], dim=1), torch.tensor([0, 1, 2, 3])
    task = TransformerTask(model, tokenizer, lambda: iter(()), self_correction=SelfCorrectionConfig(p=0.0, ratio=0.5))
    torch.manual_seed(5)
    loss, _ = task.loss((idx_BL, label_B), 0)
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    rng_after = torch.get_rng_state()
    model.zero_grad()
    torch.manual_seed(5)  # today's loss, written out
    logits_BLV = model.head(model.hidden(label_B, tokenizer.teacher_forcing_inputs(split_maps(idx_BL, model.layout))))
    today = F.cross_entropy(logits_BLV.float().transpose(1, 2), idx_BL, reduction="none").mean()
    today.backward()
    assert torch.equal(loss, today) and torch.equal(rng_after, torch.get_rng_state())
    assert all(torch.equal(a, p.grad) for a, p in zip(ours, model.parameters(), strict=True))


def test_with_p_above_0_the_task_trains_on_corrected_targets():
    tokenizer = make_tokenizer(order=1)
    model = CART(TINY, tokenizer.layout, NUM_CLASSES, V, 8).train()
    clean = quantised_tokens(tokenizer, 4)
    idx_BL, label_B = torch.cat([i.flatten(1) for i in clean], dim=1), torch.tensor([0, 1, 2, 3])
    task = TransformerTask(model, tokenizer, lambda: iter(()), self_correction=SelfCorrectionConfig(p=1.0))
    torch.manual_seed(0)
    loss, logs = task.loss((idx_BL, label_B), 0)
    loss.backward()
    assert torch.isfinite(loss) and "loss_m4_D1_4x4" in logs
    with pytest.raises(ConfigError, match="self_correction.p"):
        one_map = Tokenizer(dataclasses.replace(TOKENIZER, scales=[4]), 0)
        TransformerTask(CART(TINY, one_map.layout, 2, V, 8), one_map, lambda: iter(()), 0.0, SelfCorrectionConfig(p=1))


def test_options_that_are_off_leave_the_run_fingerprint_as_before():
    off = run_settings(TransformerConfig())
    assert set(off) == {"model", "train"} and "self_correction" not in off["train"]
    on = TransformerConfig(
        train=dataclasses.replace(TransformerConfig().train, self_correction=SelfCorrectionConfig(p=0.5)),
        coarse=CoarseConfig(clusters=8),
    )
    assert run_settings(on)["train"]["self_correction"]["p"] == 0.5 and run_settings(on)["coarse"]["clusters"] == 8
