"""Sample-quality metrics: the reference classifier, its torch-fidelity extractor, Inception loaded offline."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data import shards
from pipeline.data.labelled import decode_labelled
from pipeline.evaluation.metrics import (
    MissingWeights,
    class_consistency,
    fidelity_metrics,
    reference_extractor,
)
from pipeline.models.evaluator import ReferenceNet, ReferenceNetConfig, load_evaluator, save_evaluator
from pipeline.training.evaluator_training import EvaluatorConfig, train_evaluator
from pipeline.training.train import RunPaths, TrainConfig

SMALL = ReferenceNetConfig(channels=8, stages=2, blocks=1, feature_dim=32)
NAMES = {"fid", "kid", "kid_std", "isc", "isc_std", "precision", "recall"}


def smooth_images(n: int, side: int = 32, seed: int = 0) -> torch.Tensor:
    """Random smooth colour images (4×4 noise upsampled), uint8 N×3×side×side."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return (F.interpolate(coarse, size=(side, side), mode="bicubic").clamp(0, 1) * 255).round().to(torch.uint8)


def noise_images(n: int, side: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8)


@pytest.fixture
def reference(tmp_path) -> Path:
    """A randomly initialised reference network saved as the train_evaluator stage would save a trained one."""
    torch.manual_seed(0)
    save_evaluator(tmp_path / "ref", ReferenceNet(ReferenceNetConfig(), num_classes=8, input_size=32).eval())
    return tmp_path / "ref"


def test_identical_sets_have_zero_distance_and_different_ones_do_not(reference):
    extractor = reference_extractor(reference)
    images, other = smooth_images(48, seed=0), smooth_images(48, seed=1)
    same = fidelity_metrics(images, images, extractor)
    like = fidelity_metrics(images, other, extractor)  # another sample of the same distribution
    unlike = fidelity_metrics(images, noise_images(48), extractor)
    # KID's unbiased estimate over random subsets is not exactly 0 even for identical sets
    assert abs(same["fid_ref"]) < 1e-4 * like["fid_ref"] and abs(same["kid_ref"]) < 0.05 * unlike["kid_ref"]
    assert same["precision_ref"] == same["recall_ref"] == 1.0
    assert 10 * like["fid_ref"] < unlike["fid_ref"] and like["kid_ref"] < unlike["kid_ref"]
    assert min(like["precision_ref"], like["recall_ref"]) > 0.8
    assert max(unlike["precision_ref"], unlike["recall_ref"]) < 0.1


def test_metric_names_carry_the_extractor_suffix(reference):
    metrics = fidelity_metrics(smooth_images(8), smooth_images(12, seed=1), reference_extractor(reference))
    assert set(metrics) == {f"{name}_ref" for name in NAMES}
    assert all(math.isfinite(v) for v in metrics.values())


def test_fid_and_prc_use_the_penultimate_features_and_is_the_logits(reference):
    """Recomputed independently from the network's outputs: FID through the nuclear norm of A·Bᵀ (the
    square-root trace of Σ₁Σ₂ without a D×D eigendecomposition), IS with one split, PRC with k = 3."""
    generated, real = smooth_images(16, seed=2), smooth_images(24, seed=3)
    metrics = fidelity_metrics(generated, real, reference_extractor(reference))
    net = load_evaluator(reference)
    with torch.no_grad():
        (f1, logits), (f2, _) = net(generated), net(real)
    f1, f2, logits = f1.double(), f2.double(), logits.double()
    a = (f1 - f1.mean(0)) / math.sqrt(len(f1) - 1)
    b = (f2 - f2.mean(0)) / math.sqrt(len(f2) - 1)
    fid = (f1.mean(0) - f2.mean(0)).square().sum() + a.square().sum() + b.square().sum()
    fid -= 2 * torch.linalg.svdvals(a @ b.T).sum()
    assert metrics["fid_ref"] == pytest.approx(float(fid), rel=1e-4)
    p = logits.softmax(1)
    isc = (p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean().exp()
    assert metrics["isc_ref"] == pytest.approx(float(isc), rel=1e-5) and metrics["isc_std_ref"] == 0.0
    radius1 = torch.cdist(f1, f1).kthvalue(4, dim=1).values  # the 3rd neighbour: the 1st is the sample itself
    radius2 = torch.cdist(f2, f2).kthvalue(4, dim=1).values
    d12 = torch.cdist(f1, f2)
    assert metrics["precision_ref"] == pytest.approx(float((d12 <= radius2).any(1).double().mean()))
    assert metrics["recall_ref"] == pytest.approx(float((d12.T <= radius1).any(1).double().mean()))


def test_extractor_is_registered_once_per_weights_file(reference, tmp_path):
    first, again = reference_extractor(reference), reference_extractor(reference)
    assert first == again and first.name.startswith("cart-ref-")
    torch.manual_seed(1)
    save_evaluator(tmp_path / "other", ReferenceNet(ReferenceNetConfig(), num_classes=8, input_size=32))
    assert reference_extractor(tmp_path / "other").name != first.name
    with pytest.raises(MissingWeights, match="train_evaluator"):
        reference_extractor(tmp_path / "absent")


def write_pattern_shards(directory: Path, per_class: int, seed: int) -> None:
    """Four classes of 16-px textures that only a spatial filter tells apart: horizontal, vertical and diagonal
    stripes and a checkerboard, in random colours, periods and phases, with pixel noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:16, 0:16].astype(float)
    samples = []
    for i in range(4 * per_class):
        cls = i % 4
        period, phase = rng.uniform(4, 7), rng.uniform(0, 2 * np.pi)
        diagonal = x + y if rng.random() < 0.5 else x - y
        coordinate = [y, x, diagonal / np.sqrt(2), None][cls]
        if coordinate is None:
            wave = np.sin(2 * np.pi * x / period + phase) * np.sin(2 * np.pi * y / period + phase)
        else:
            wave = np.sin(2 * np.pi * coordinate / period + phase)
        colours = rng.uniform(0, 255, size=(2, 3))
        t = (wave[..., None] + 1) / 2
        rgb = colours[0] * t + colours[1] * (1 - t) + rng.normal(0, 12, size=(16, 16, 3))
        png = shards.encode_png(rgb.clip(0, 255).astype(np.uint8))
        samples.append({"__key__": f"s{i:05d}", "png": png, "cls": str(cls).encode()})
    shards.write_split(directory, samples, shard_size=48)


def test_train_evaluator_learns_separable_classes_and_saves_a_loadable_net(tmp_path):
    write_pattern_shards(tmp_path / "train", per_class=48, seed=0)
    write_pattern_shards(tmp_path / "val", per_class=16, seed=1)
    train = TrainConfig(
        steps=120, batch_size=32, lr=1e-2, warmup_steps=5, weight_decay=5e-4, beta2=0.99,
        checkpoint_every=120, log_every=20, num_workers=0, shuffle_buffer=192, device="cpu",
    )  # fmt: skip
    cfg = EvaluatorConfig(model=SMALL, train=train)
    urls = {split: shards.list_shards(tmp_path / split) for split in ("train", "val")}
    paths = RunPaths(tmp_path / "checkpoints", tmp_path / "live")
    metrics = train_evaluator(cfg, urls["train"], urls["val"], 4, 16, tmp_path / "model" / "ref", paths)
    assert metrics["chance_accuracy"] == 0.25
    assert metrics["val_accuracy"] >= 0.75, metrics
    assert {p.suffix for p in (tmp_path / "model").iterdir()} == {".safetensors", ".json"}
    # The saved network is the one that was measured: its accuracy on val is the reported one.
    net = load_evaluator(tmp_path / "model" / "ref")
    images, labels = zip(*(decode_labelled(raw) for raw in shards.read_samples(urls["val"])), strict=True)
    accuracy = class_consistency(net, torch.stack(images), torch.tensor(labels))
    assert accuracy == pytest.approx(metrics["val_accuracy"])
    # Any input size ≥ 16 px is resized to the training resolution.
    features, logits = net(F.interpolate(torch.stack(images[:2]).float(), size=40).to(torch.uint8))
    assert features.shape == (2, SMALL.feature_dim) and logits.shape == (2, 4)
