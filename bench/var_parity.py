"""Order 0 against the official VAR code: same random weights and inputs, compare tokens, images, logits, samples.

    git clone https://github.com/FoundationVision/VAR /tmp/VAR        # outside this repository; MIT licence
    pip install --target /tmp/var-deps huggingface_hub              # VAR's models/var.py imports it
    PYTHONPATH=/tmp/var-deps python bench/var_parity.py --var-repo /tmp/VAR

Nothing of VAR's is copied here: its classes are imported from the clone. The script builds VAR's VQVAE and a
depth-4 VAR with their own constructors and initialisation (perturbed, so that no block is near-identity),
saves their state dicts as VAR would, imports them with ``pipeline.models.var_checkpoints.import_var`` (what
``cart import-var`` runs) and compares, for the demo's 7-map schedule at 128 px and VAR's 10-map schedule at
256 px: tokens of the same images, reconstructions, teacher-forcing inputs, teacher-forced logits (relative to the
largest), greedy (top-k 1) guided samples with VAR's cfg 1.5 = our guidance 2.5, and the export back: VAR's
classes load ``export_var``'s files with ``strict=True`` and compute the same logits and tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.models.tokenizer import load_tokenizer
from pipeline.models.transformer import SamplingConfig, generate, load_transformer
from pipeline.models.var_checkpoints import export_var, import_var


def build_var(patch_nums, V, Cz, ch, depth, classes, seed):
    with contextlib.redirect_stdout(sys.stderr):  # VAR's constructors print; keep stdout for the results
        return _build_var(patch_nums, V, Cz, ch, depth, classes, seed)


def _build_var(patch_nums, V, Cz, ch, depth, classes, seed):
    from models.var import VAR
    from models.vqvae import VQVAE

    torch.manual_seed(seed)
    vae = VQVAE(vocab_size=V, z_channels=Cz, ch=ch, test_mode=True, v_patch_nums=patch_nums)
    with torch.no_grad():  # codes at the scale of the encoder's outputs, so that every map picks varied codes
        vae.quantize.embedding.weight.mul_(0.3)
    var = VAR(
        vae,
        num_classes=classes,
        depth=depth,
        embed_dim=64 * depth,
        num_heads=depth,
        attn_l2_norm=True,
        patch_nums=patch_nums,
        drop_path_rate=0.1 * depth / 24,
        flash_if_available=False,
        fused_if_available=False,
    )
    var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    with torch.no_grad():  # VAR's init makes every block near-identity: shake it so that every part matters
        for p in var.parameters():
            p.add_(0.05 * torch.randn_like(p))
    var.eval()
    var.cond_drop_rate = 0.0  # VAR's forward drops labels even in eval mode
    return vae, var


def compare(patch_nums, resolution, V=256, Cz=16, ch=32, depth=4, classes=10, B=4, seed=0) -> dict:
    import models.var as var_module

    vae, var = build_var(patch_nums, V, Cz, ch, depth, classes, seed)
    tmp = Path(tempfile.mkdtemp())
    torch.save(vae.state_dict(), tmp / "vae.pth")
    torch.save(var.state_dict(), tmp / "var.pth")
    import_var(tmp / "vae.pth", tmp / "var.pth", tmp / "ours", scales=list(patch_nums))
    tokenizer, _ = load_tokenizer(tmp / "ours" / "tokenizer")
    model, _ = load_transformer(tmp / "ours" / "transformer")

    g = torch.Generator().manual_seed(seed)
    image_B3HW = F.avg_pool2d(torch.rand(B, 3, resolution, resolution, generator=g), 5, 1, 2)  # in [0, 1]
    label_B = torch.arange(B) % classes
    out: dict = {"patch_nums": list(patch_nums), "resolution": resolution}
    with torch.no_grad():
        theirs = vae.img_to_idxBl(image_B3HW * 2 - 1)
        ours = tokenizer.tokenize(image_B3HW, image_B3HW.new_zeros(B, 0, 3, resolution, resolution))
        out["tokens_identical"] = all(torch.equal(a, b.flatten(1)) for a, b in zip(theirs, ours, strict=True))
        out["distinct_codes"] = int(torch.cat([t.flatten() for t in theirs]).unique().numel())
        rec_theirs = vae.idxBl_to_img(theirs, same_shape=True, last_one=True)  # in [−1, 1]
        out["reconstruction_max_abs_diff"] = float((rec_theirs - (tokenizer.reconstruct(ours) * 2 - 1)).abs().max())
        x_theirs, x_ours = vae.quantize.idxBl_to_var_input(theirs), tokenizer.teacher_forcing_inputs(ours)
        out["teacher_forcing_inputs_max_abs_diff"] = float((x_theirs - x_ours).abs().max())
        logits_theirs, logits_ours = var(label_B, x_theirs), model.head(model.hidden(label_B, x_ours))
        out["logits_max_abs_diff_relative"] = float(
            (logits_theirs - logits_ours).abs().max() / logits_theirs.abs().max()
        )
        drawn = []  # VAR returns images only: record the codes its sampler draws
        sampler = var_module.sample_with_top_k_top_p_

        def recording(*args, **kwargs):
            idx = sampler(*args, **kwargs)
            drawn.append(idx[:, :, 0].clone())
            return idx

        var_module.sample_with_top_k_top_p_ = recording
        try:
            image_theirs = var.autoregressive_infer_cfg(B, label_B, g_seed=seed, cfg=1.5, top_k=1, top_p=0.0)
        finally:
            var_module.sample_with_top_k_top_p_ = sampler
        idx_ours = generate(model, tokenizer, label_B, SamplingConfig(guidance=2.5, top_k=1))
        out["greedy_samples_identical"] = all(
            torch.equal(a, b.flatten(1)) for a, b in zip(drawn, idx_ours, strict=True)
        )
        out["greedy_image_max_abs_diff"] = float((image_theirs - tokenizer.reconstruct(idx_ours)).abs().max())

    files = export_var(tmp / "ours" / "tokenizer", tmp / "ours" / "transformer", tmp / "exported")
    vae2, var2 = build_var(patch_nums, V, Cz, ch, depth, classes, seed + 1)  # other weights, then overwritten
    vae2.load_state_dict(torch.load(files["vae"], weights_only=True), strict=True)
    var2.load_state_dict(torch.load(files["var"], weights_only=True), strict=True)
    with torch.no_grad():
        out["exported_logits_identical"] = bool(torch.equal(var2(label_B, x_theirs), logits_theirs))
        tokens2 = vae2.img_to_idxBl(image_B3HW * 2 - 1)
        out["exported_tokens_identical"] = all(torch.equal(a, b) for a, b in zip(tokens2, theirs, strict=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--var-repo", type=Path, required=True, help="a clone of FoundationVision/VAR")
    args = parser.parse_args()
    sys.path.insert(0, str(args.var_repo.resolve()))
    torch.set_num_threads(2)
    results = [compare((1, 2, 3, 4, 5, 6, 8), 128), compare((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 256)]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
