"""The shared loop's gradient accumulation, the transformer's weight average (EMA) and activation checkpointing."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.training.train import Phase, RunPaths, TrainConfig, ema_copy, ema_update, train
from pipeline.training.transformer_training import TransformerTask, TransformerTrainConfig
from tests.test_transformer import make_model, make_tokenizer, random_indices


class SGDTransformer(TransformerTask):
    """The transformer's own loss under plain SGD: an update is lr × gradient, so any error in the gradient's scale
    shows (AdamW would normalise it away)."""

    def phases(self, cfg: TrainConfig) -> list[Phase]:
        optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr)
        return [Phase("transformer", optimizer, self.loss, list(self.model.parameters()))]


def token_batches(tokenizer, samples: int, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    idx_NL = torch.cat([m.flatten(1) for m in random_indices(tokenizer, samples, seed)], dim=1)
    label_N = torch.arange(samples) % 5
    return [(idx_NL[i : i + batch_size], label_N[i : i + batch_size]) for i in range(0, samples, batch_size)]


def run(task, cfg: TrainConfig, batches: list, root, stop_after: int | None = None) -> None:
    """train() over ``batches`` epoch after epoch; with ``stop_after``, killed (KeyboardInterrupt) after that many."""
    served = []

    def epoch_batches(epoch):
        for batch in batches:
            if stop_after is not None and len(served) == stop_after:
                raise KeyboardInterrupt
            served.append(1)
            yield batch

    train(
        task, cfg, epoch_batches, RunPaths(root / "checkpoints", root / "live"), "run", batches_per_epoch=len(batches)
    )


def test_accumulated_micro_batches_make_the_step_of_one_large_batch(tmp_path):
    tokenizer = make_tokenizer()
    # fp32: the claim is about the loop's arithmetic; bf16 would round micro-batches and the large batch apart
    common = dict(steps=3, lr=0.5, warmup_steps=0, grad_clip=0.0, checkpoint_every=100, device="cpu", precision="fp32")
    results = {}
    for name, batch_size, accumulation in (("large", 8, 1), ("accumulated", 2, 4), ("small", 2, 1)):
        model = make_model(tokenizer, class_dropout=0.0, drop_path=0.0)
        cfg = TrainConfig(batch_size=batch_size, grad_accumulation=accumulation, **common)
        run(
            SGDTransformer(model.train(), tokenizer, lambda: iter(())),
            cfg,
            token_batches(tokenizer, 24, batch_size),
            tmp_path / name,
        )
        results[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(results["accumulated"], results["large"], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(results["small"], results["large"], atol=1e-3)  # the test can tell batches apart


def test_an_average_with_decay_0_is_the_weights_and_otherwise_the_exponential_average():
    model = make_model(make_tokenizer())
    average, zero = ema_copy(model), ema_copy(model)
    w = [torch.cat([p.detach().flatten() for p in model.parameters()]).clone()]
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        w.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
        ema_update(average, model, 0.5)
        ema_update(zero, model, 0.0)
        assert all(torch.equal(a, b) for a, b in zip(zero.parameters(), model.parameters(), strict=True))
    averaged = torch.cat([p.flatten() for p in average.parameters()])
    assert torch.allclose(averaged, 0.25 * w[0] + 0.25 * w[1] + 0.5 * w[2], atol=1e-6)
    assert not any(p.requires_grad for p in average.parameters())


def test_a_killed_run_resumes_its_weight_average_exactly(tmp_path):
    tokenizer = make_tokenizer()
    batches = token_batches(tokenizer, 16, 4)
    cfg = TransformerTrainConfig(
        steps=8, batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=3, device="cpu", ema_decay=0.8
    )

    def task():
        return TransformerTask(make_model(tokenizer).train(), tokenizer, lambda: iter(()), cfg.ema_decay)

    uninterrupted = task()
    run(uninterrupted, cfg, batches, tmp_path / "uninterrupted")
    killed = task()
    try:
        run(killed, cfg, batches, tmp_path / "killed", stop_after=5)  # after the checkpoint of step 3
    except KeyboardInterrupt:
        pass
    resumed = task()
    run(resumed, cfg, batches, tmp_path / "killed")
    for a, b in zip(resumed.ema.parameters(), uninterrupted.ema.parameters(), strict=True):
        assert torch.equal(a, b)
    ema, raw = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (resumed.ema, resumed.model))
    assert not torch.allclose(ema, raw)  # the average is not simply the weights


def saved_bytes(model, tokenizer, checkpointing: bool) -> tuple[int, list[torch.Tensor]]:
    """Bytes the autograd graph keeps for one training step, and the gradients of that step (same seed)."""
    from pipeline.models.transformer import teacher_forcing_inputs

    indices = random_indices(tokenizer, 4)
    x_BlC = teacher_forcing_inputs(model, tokenizer, indices)
    target = torch.cat([m.flatten(1) for m in indices], dim=1)
    model.checkpoint_activations = checkpointing
    model.zero_grad(set_to_none=True)
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    torch.manual_seed(0)  # class dropout, stochastic depth and dropout draw the same in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model.head(model.hidden(torch.tensor([0, 1, 2, 3]), x_BlC))
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), target)
    loss.backward()
    return total, [p.grad.clone() for p in model.parameters()]


def test_activation_checkpointing_keeps_less_and_gives_the_same_gradients():
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, depth=3, heads=2, drop_path=0.3, dropout=0.2).train()
    kept, grads = saved_bytes(model, tokenizer, checkpointing=False)
    kept_checkpointed, grads_checkpointed = saved_bytes(model, tokenizer, checkpointing=True)
    assert kept_checkpointed < 0.6 * kept
    for a, b in zip(grads, grads_checkpointed, strict=True):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-6)


def test_auto_precision_is_bf16_where_the_hardware_has_it(monkeypatch):
    from pipeline.training.train import uses_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert uses_bf16("bf16", cpu) and not uses_bf16("fp32", cuda)
    assert uses_bf16("auto", cuda)
    for native in (True, False):  # a CPU without AVX512-BF16 / AMX emulates bf16: slower than fp32
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        assert uses_bf16("auto", cpu) is native
