"""The heads on one interface (``pipeline.models.heads``): every head gives its loss and its draws through the same
calls, and the move to that interface changed nothing a run produces.

``RECORDED`` was measured with the code before the heads had an interface (commit 5d65876, when ``CART.forward``
returned logits, a (label, fine) pair or a diffusion loss by keyword): the weight names and initial weights of
each head, the training loss of a seeded step, and the tokens sampled from a fixed seed, unguided and guided.
Rerun ``python -m tests.test_heads`` to print what the code gives now.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from pipeline.models.coarse import codebook_clusters
from pipeline.models.tokenizer import Tokenizer
from pipeline.models.transformer import (
    CART,
    SamplingConfig,
    TransformerModelConfig,
    generate,
    load_transformer,
    save_transformer,
)
from pipeline.training.transformer_training import TransformerTask
from stages.cli import app
from tests.test_continuous import HEAD, SMALL, continuous_tokenizer
from tests.test_transformer import NUM_CLASSES, TINY, TOKENIZER, make_tokenizer, random_indices
from tests.test_var_checkpoints import import_cli, runner, var_transformer_state_dict, var_vae_state_dict

KINDS = ("softmax", "coarse", "next_token", "diffusion")
CONFIGS = {
    "plain": SamplingConfig(guidance=1.0, diffusion_steps=5),
    "guided": SamplingConfig(guidance=2.0, top_k=5, top_p=0.9, temperature=0.8, diffusion_steps=5),
}
HEAD_KEYS = ("head.", "fine.", "diffusion.", "token_rms_M")


def build(kind: str) -> tuple[Tokenizer, CART]:
    """A tiny model with the head ``kind`` as its constructor initialises it from seed 3."""
    if kind == "diffusion":
        tokenizer = continuous_tokenizer(1)
        torch.manual_seed(3)
        model = CART(TINY, tokenizer.layout, NUM_CLASSES, SMALL.codebook_size, SMALL.latent_channels, diffusion=HEAD)
        with torch.no_grad():
            model.token_rms_M.copy_(torch.linspace(1.0, 0.1, tokenizer.layout.num_maps))
        return tokenizer, model
    tokenizer = make_tokenizer(1)
    torch.manual_seed(3)
    cfg = TransformerModelConfig(depth=2, width=32, prediction="next_token") if kind == "next_token" else TINY
    clusters = 4 if kind == "coarse" else 0
    V, C = TOKENIZER.codebook_size, TOKENIZER.latent_channels
    model = CART(cfg, tokenizer.layout, NUM_CLASSES, V, C, clusters=clusters)
    if clusters:
        model.fine.set_clusters(codebook_clusters(tokenizer.codebook.weight, clusters, seed=0))
    return tokenizer, model


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def observe(kind: str) -> dict:
    """What the head ``kind`` gives: weight names and sums at init, a seeded training step's loss and logs, and the
    maps sampled from seed 11 (codes: a digest of them; continuous tokens: each map's sum and absolute sum)."""
    tokenizer, model = build(kind)
    state = model.state_dict()
    seen = {
        "keys": [k for k in state if k.startswith(HEAD_KEYS)],
        "init": [float(t.double().sum()) for k, t in state.items() if k.startswith(HEAD_KEYS)]
        + [sum(float(t.double().abs().sum()) for t in state.values())],
    }
    with torch.no_grad():  # real signal through the near-identity blocks and the zero-initialised heads
        for name, p in model.named_parameters():  # (the denoiser less: its log-variance output is exponentiated)
            p.add_((0.02 if name.startswith("diffusion.") else 0.3) * torch.randn_like(p))
    B, label_B = 4, torch.tensor([0, 1, 2, 0])
    if kind == "diffusion":
        g = torch.Generator().manual_seed(5)
        target_BL = torch.randn(B, tokenizer.layout.num_tokens, SMALL.latent_channels, generator=g)
    else:
        target_BL = torch.cat([i.flatten(1) for i in random_indices(tokenizer, B, seed=2)], 1)
    task = TransformerTask(model.train(), tokenizer, lambda: iter(()))
    torch.manual_seed(9)  # class dropout, stochastic depth, the diffusion loss's levels and noise
    loss, logs = task.loss((target_BL, label_B), 0)
    seen["loss"] = [loss.item(), *(logs[k] for k in sorted(logs))]
    model.eval()
    for name, cfg in CONFIGS.items():
        maps = generate(model, tokenizer, torch.tensor([0, 2, 1]), cfg, torch.Generator().manual_seed(11))
        if kind == "diffusion":
            seen[name] = [v for z in maps for v in (float(z.double().sum()), float(z.double().abs().sum()))]
        else:
            seen[name] = digest(torch.cat([idx.flatten(1) for idx in maps], dim=1))
    return seen


# fmt: off
RECORDED = {
    "softmax": {
        "keys": ["head.weight", "head.bias"],
        "init": [0.06708201442, 0.0, 2161.603534],
        "loss": [4.60585165, 0.0, 0.0, 0.02777777778, 0.046875, 0.046875, 4.60585165, 4.599749565,
            5.090529084, 4.751631419, 4.506301194, 4.502611816],
        "plain": "4823805e6abceb41",
        "guided": "fad2c727212e00e1",
    },
    "coarse": {
        "keys": ["head.weight", "head.bias", "fine.label_embed.weight", "fine.fc1.weight", "fine.fc1.bias",
            "fine.fc2.weight", "fine.fc2.bias"],
        "init": [0.004649593185, 0.0, 0.8888269096, 0.8913438571, 0.0, 0.001076918761, 0.0, 2268.880068],
        "loss": [6.911663055, 0.0, 0.0625, 0.02777777778, 0.046875, 0.046875, 6.911663055, 3.645707846,
            3.265954971, 8.287336349, 6.495259523, 6.633004453, 6.504529208, 7.493663758],
        "plain": "f4f4bde056786760",
        "guided": "66c97b7a9752a08b",
    },
    "next_token": {
        "keys": ["head.weight", "head.bias"],
        "init": [0.06708201442, 0.0, 2161.603534],
        "loss": [4.578214169, 0.0, 0.0, 0.05555555556, 0.0625, 0.03125, 4.578214169, 4.599749565, 5.138675153,
            4.709407224, 4.484591752, 4.456579566],
        "plain": "c07035cdb311040e",
        "guided": "dd23261ceca9c898",
    },
    "diffusion": {
        "keys": ["token_rms_M", "diffusion.input_proj.weight", "diffusion.input_proj.bias",
            "diffusion.level_embed.0.weight", "diffusion.level_embed.0.bias",
            "diffusion.level_embed.2.weight", "diffusion.level_embed.2.bias", "diffusion.cond_embed.weight",
            "diffusion.cond_embed.bias", "diffusion.blocks.0.mlp.0.weight", "diffusion.blocks.0.mlp.0.bias",
            "diffusion.blocks.0.mlp.2.weight", "diffusion.blocks.0.mlp.2.bias",
            "diffusion.blocks.0.modulation.weight", "diffusion.blocks.0.modulation.bias",
            "diffusion.blocks.1.mlp.0.weight", "diffusion.blocks.1.mlp.0.bias",
            "diffusion.blocks.1.mlp.2.weight", "diffusion.blocks.1.mlp.2.bias",
            "diffusion.blocks.1.modulation.weight", "diffusion.blocks.1.modulation.bias",
            "diffusion.final_modulation.weight", "diffusion.final_modulation.bias", "diffusion.output.weight",
            "diffusion.output.bias"],
        "init": [3.29999996, -2.191759675, 0.0, -0.1266333581, 0.0, -0.403221528, 0.0, -4.156494177, 0.0,
            5.270921672, 0.0, -0.1865091748, 0.0, 0.0, 0.0, -0.9435834497, 0.0, 5.588119953, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0, 3498.765421],
        "loss": [29.54194641, 29.54194641, 1.493943572, 1.491150647, 1.820255578, 3.836794701, 9.317918465,
            73.34697831],
        "plain": [-5.463002637, 15.16252337, -7.904386066, 63.35887785, -5.152798798, 206.0643447,
            -11.83700416, 315.5016055, -1.210329699, 350.950865, -0.9585746839, 118.984806],
        "guided": [-4.299899288, 11.94633429, -6.55380423, 50.86997974, -4.811954801, 165.7326592,
            -9.01281516, 253.9190156, -2.019276306, 281.8689972, -0.7119064441, 95.22509854],
    },
}
# fmt: on


@pytest.mark.parametrize("kind", KINDS)
def test_every_head_names_initialises_trains_and_samples_as_before_the_interface(kind, one_thread):
    seen, recorded = observe(kind), RECORDED[kind]
    assert seen["keys"] == recorded["keys"]  # the names weight files and checkpoints use
    assert seen["init"] == pytest.approx(recorded["init"], rel=1e-6)  # the init's random draws, in their order
    assert seen["loss"] == pytest.approx(recorded["loss"], rel=1e-5)
    for name in CONFIGS:  # the same draws from the generator, in the same order
        assert seen[name] == (recorded[name] if kind != "diffusion" else pytest.approx(recorded[name], rel=1e-5))


if __name__ == "__main__":
    torch.set_num_threads(1)
    print({kind: observe(kind) for kind in KINDS})


@pytest.mark.parametrize(
    "options, head", [({"clusters": 4}, "coarse-to-fine head"), ({"diffusion": HEAD}, "diffusion head")]
)
def test_export_var_refuses_a_head_other_than_the_softmax_naming_it(tmp_path, options, head):
    vae, var = tmp_path / "vae.pth", tmp_path / "var.pth"
    torch.save(var_vae_state_dict(), vae)
    torch.save(var_transformer_state_dict(), var)
    assert import_cli(vae, var, tmp_path / "imported").exit_code == 0
    imported = tmp_path / "imported"
    softmax, _ = load_transformer(imported / "transformer")
    other = CART(
        softmax.cfg, softmax.layout, softmax.num_classes, softmax.codebook_size, softmax.latent_channels, **options
    )
    save_transformer(tmp_path / "other", other)
    args = ["export-var", "--tokenizer", str(imported / "tokenizer"), "--transformer", str(tmp_path / "other")]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "exported")])
    assert result.exit_code == 2 and f"a {head}, which VAR's code has no place for" in " ".join(result.output.split())
    assert not (tmp_path / "exported").exists()
