"""The one training loop, shared by the tokenizer, the transformer and the reference classifier.

A ``Task`` owns the models and says how to compute losses; this module does everything else the same way for
all: device and DDP, AdamW with warm-up and cosine decay, gradient clipping, bf16 autocast, periodic evaluation,
dvclive logging (``live.py``) and checkpoints every N steps that a killed run resumes from (``checkpoints.py``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from pipeline.config import Field, section
from pipeline.data.loader import ShardLoader
from pipeline.progress import Progress, Silent
from pipeline.runtime import Dist, barrier, dist_from_env, init_distributed, resolve_device
from pipeline.training.checkpoints import resume, save_checkpoint, tidy_checkpoints
from pipeline.training.live import LiveLog

log = logging.getLogger(__name__)


@section
class TrainConfig:
    steps: int = Field(1000, ge=1, description="Optimiser steps in all.")
    batch_size: int = Field(32, ge=1, description="Samples per step on each process (DDP: per GPU).")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (after warm-up).")
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up from 0 to lr.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay ends at lr × this.")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay (never on norms, biases, embedding tables but the class embedding)."
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW β1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW β2.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the gradient norm to this (0: no clipping).")
    grad_accumulation: int = Field(
        1,
        ge=1,
        description="Batches whose gradients are summed into each optimiser step: a step sees batch_size × "
        "grad_accumulation × processes samples (the paper's batch on fewer GPUs). Equal to one large batch but for "
        "batch statistics (BatchNorm in the reference classifier).",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Autocast precision: auto is bf16 where the hardware computes it natively (CUDA; CPUs with "
        "AVX512-BF16 or AMX) and fp32 on other CPUs, which only emulate bf16.",
    )
    compile: bool = Field(False, description="torch.compile the model (worth it on GPU for long runs).")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints (a killed run loses fewer).")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept on disk.")
    log_every: int = Field(10, ge=1, description="Steps between logged training metrics.")
    eval_every: int = Field(0, ge=0, description="Steps between validation passes (0: only at the end).")
    num_workers: int = Field(1, ge=0, description="Data-loading worker processes per training process.")
    shuffle_buffer: int = Field(1000, ge=1, description="Samples in the shuffle buffer of the shard loader.")
    seed: int = Field(0, ge=0, description="Seed of initialisation, data order and dropout.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available.")


@dataclass
class Phase:
    """One optimiser update per step: the loss of a batch, the optimiser, the parameters it clips."""

    name: str
    optimizer: torch.optim.Optimizer
    loss: Callable[[Any, int], tuple[torch.Tensor | None, dict[str, float]]]  # (batch, step) → (loss or None, logs)
    parameters: list[nn.Parameter] = field(default_factory=list)


class Task(Protocol):
    """What the loop trains. ``modules`` holds all state to checkpoint; ``wrap`` receives them DDP-wrapped.

    A task may also define ``measure(done) -> dict``, called after each step with the steps done (what it returns
    is logged at that step: the tokenizer's rFID), and ``stopped() -> bool``: once true, the run checkpoints and
    ends before ``cfg.steps`` (early stopping), and a rerun resumed from that checkpoint trains no further.
    """

    def modules(self) -> dict[str, nn.Module]: ...

    def wrap(self, wrapped: dict[str, nn.Module]) -> None: ...

    def phases(self, cfg: TrainConfig) -> list[Phase]: ...

    def to_device(self, batch: Any, device: torch.device) -> Any: ...

    def after_step(self, step: int, batch: Any) -> dict[str, float]: ...

    def evaluate(self) -> dict[str, float]: ...


@dataclass
class RunPaths:
    checkpoints: Path  # a DVC `persist` directory: survives between runs so that a killed run resumes
    live: Path  # dvclive's directory (metrics and plots)


def shard_training_loader(
    urls: list[str], decode: Callable, count: int, cfg: TrainConfig, select: Callable | None = None
):
    """The loader every training stage reads, and its batches per epoch (``count`` samples in ``urls``, of those
    ``select`` keeps when given).

    Resampled mode: every DDP rank yields the same number of batches, so ranks never disagree on the step count.
    """
    per_epoch = max(1, count // (cfg.batch_size * dist_from_env().world_size))
    loader = ShardLoader(
        urls,
        decode,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        resampled=True,
        batches_per_epoch=per_epoch,
        shuffle_buffer=cfg.shuffle_buffer,
        num_workers=cfg.num_workers,
        select=select,
    )
    return loader, per_epoch


def ema_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` to hold the exponential moving average of its weights (``ema_update``).

    Without trainable parameters it is neither DDP-wrapped nor optimised by the loop; as one of a task's
    ``modules`` it is checkpointed and checked with the others, so a resumed run continues the same average.
    """
    return copy.deepcopy(module).requires_grad_(False).eval()


@torch.no_grad()
def ema_update(average: nn.Module, module: nn.Module, decay: float) -> None:
    """average ← decay·average + (1 − decay)·weights, for every parameter; buffers are copied. Decay 0 copies."""
    averaged, current = list(average.parameters()), [p.detach() for p in module.parameters()]
    # lerp with weight 1 returns its end exactly (end − (end − start)·0): decay 0 is the raw weights, bit for bit.
    torch._foreach_lerp_(averaged, current, 1.0 - decay)
    for kept, buffer in zip(average.buffers(), module.buffers(), strict=True):
        kept.copy_(buffer)


def adamw(groups: list[dict], cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


def decay_groups(module: nn.Module, weight_decay: float, decayed_embeddings: list[nn.Parameter] = ()) -> list[dict]:
    """Weight decay on matrices and convolution kernels only: never on norms, biases or embedding tables, except
    the tables in ``decayed_embeddings`` (VAR decays its class embedding)."""
    decay, no_decay = [], []
    exempt = {id(p) for p in decayed_embeddings}
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)} - exempt
    for p in module.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from 1 to min_lr_ratio over the remaining steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether ``precision`` means bf16 autocast on ``device``. auto: where bf16 is native, CUDA and CPUs with
    AVX512-BF16 or AMX, where it trains faster than fp32 (bench/RESULTS.md, bench/precision.py); a CPU without
    them emulates bf16 and would run slower than fp32."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and torch.cpu._is_avx512_bf16_supported())


def autocast_context(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(cfg.precision, device) else nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# The loop


def batches_from(epoch_batches: Callable[[int], Iterator], batches_per_epoch: int | None, start_step: int) -> Iterator:
    """Batches from ``start_step`` on, epoch after epoch: a resumed run reads what the uninterrupted one would."""
    epoch, skip = (start_step // batches_per_epoch, start_step % batches_per_epoch) if batches_per_epoch else (0, 0)
    while True:
        produced = 0
        for i, batch in enumerate(epoch_batches(epoch)):
            produced += 1
            if i >= skip:
                yield batch
        if produced == 0:
            raise ValueError("the training split yields no full batch: lower batch_size or add data")
        epoch, skip = epoch + 1, 0


def train(
    task: Task,
    cfg: TrainConfig,
    epoch_batches: Callable[[int], Iterator],
    paths: RunPaths,
    fingerprint: str,
    *,
    batches_per_epoch: int | None = None,
    progress: Progress | None = None,
) -> dict[str, float]:
    """Train ``task`` for ``cfg.steps`` steps (resuming from a matching checkpoint); return the final evaluation.

    ``epoch_batches(e)`` yields the batches of epoch e. With ``batches_per_epoch`` given (the resampled DDP mode)
    a resumed run skips to its exact position; otherwise it starts the epoch it was in from the top.
    """
    progress = progress or Silent()
    device = resolve_device(cfg.device)
    dist = init_distributed(device)
    torch.manual_seed(cfg.seed + dist.rank)
    # modules: the task's models as checkpointed and saved; wrapped: the same, DDP-wrapped and compiled where
    # trainable, as the forward and backward passes run them (their parameters are the modules').
    modules = task.modules()
    for module in modules.values():
        module.to(device)
    wrapped = _wrap(modules, dist, device, cfg)
    task.wrap(wrapped)
    phases = task.phases(cfg)
    optimizers = {phase.name: phase.optimizer for phase in phases}

    if dist.is_main:
        tidy_checkpoints(paths.checkpoints, fingerprint)
    barrier(dist)
    start_step = resume(paths.checkpoints, fingerprint, modules, optimizers, restore_rng=not dist.enabled)
    if start_step and dist.enabled:  # per-rank RNG streams are not checkpointed: continue from a distinct seed
        torch.manual_seed(cfg.seed + 1_000_003 * start_step + dist.rank)
    live = LiveLog(paths.live, start_step, enabled=dist.is_main)
    accumulation = cfg.grad_accumulation
    batches = batches_from(epoch_batches, batches_per_epoch, start_step * accumulation)
    if dist.is_main and start_step < cfg.steps:
        log.info(
            "batch per optimiser step: %d = batch_size %d × grad_accumulation %d × %d process(es); %s autocast",
            cfg.batch_size * accumulation * dist.world_size,
            cfg.batch_size,
            accumulation,
            dist.world_size,
            "bf16" if uses_bf16(cfg.precision, device) else "no (fp32)",
        )
    progress.start(f"train from step {start_step}", cfg.steps - start_step, unit="steps")
    measure = getattr(task, "measure", lambda done: {})
    stopped = getattr(task, "stopped", lambda: False)
    last = start_step if stopped() else cfg.steps  # a run that stopped early, rerun: nothing more to train
    metrics: dict[str, float] = {}
    window_start, window_samples = time.perf_counter(), 0
    for step in range(start_step, last):
        micro_batches = [task.to_device(next(batches), device) for _ in range(accumulation)]
        factor = lr_factor(step, cfg)
        logs: dict[str, float] = {"lr": cfg.lr * factor}
        for phase in phases:
            for group in phase.optimizer.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
            phase.optimizer.zero_grad(set_to_none=True)
            phase_logs, stepping = [], False
            for i, batch in enumerate(micro_batches):
                with autocast_context(cfg, device):
                    loss, batch_logs = phase.loss(batch, step)
                phase_logs.append(batch_logs)
                if loss is None:
                    continue
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"step {step}: {phase.name} loss is {loss.item()} (lower lr or check data)"
                    )
                # Mean losses over micro-batches of equal size, summed: the gradient of the mean over all of them.
                # DDP averages over processes once, at the last micro-batch.
                with _no_sync(wrapped) if i + 1 < accumulation else nullcontext():
                    (loss / accumulation).backward()
                stepping = True
            logs.update(_mean_logs(phase_logs))
            if not stepping:
                continue
            if cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(phase.parameters, cfg.grad_clip)
                logs[f"grad_norm_{phase.name}"] = float(norm)
            phase.optimizer.step()
        logs.update(task.after_step(step, micro_batches[-1]))
        window_samples += cfg.batch_size * accumulation * dist.world_size
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - window_start
            logs["samples_per_s"] = window_samples / max(elapsed, 1e-9)
            live.log(step, {f"train/{k}" if "/" not in k else k: v for k, v in logs.items()})
            window_start, window_samples = time.perf_counter(), 0
        if measured := measure(done):
            live.log(step, measured)
        stop = stopped()
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps or stop:
            metrics = _evaluate(task, dist)
            live.log(step, metrics)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
            if dist.is_main:
                save_checkpoint(paths.checkpoints, done, fingerprint, modules, optimizers, cfg.keep_checkpoints)
            barrier(dist)
        progress.advance()
        if stop:
            log.info("stopped early after step %d of %d", done, cfg.steps)
            break
    if start_step >= last:  # already finished (or stopped early): evaluate what the checkpoint holds
        metrics = _evaluate(task, dist)
    live.close()
    return metrics


@contextlib.contextmanager
def _no_sync(wrapped: dict[str, nn.Module]) -> Iterator[None]:
    """Gradients accumulate locally in every DDP module: no all-reduce until the last micro-batch."""
    with contextlib.ExitStack() as stack:
        for module in wrapped.values():
            ddp = getattr(module, "_orig_mod", module)  # torch.compile wraps the DDP module
            if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
                stack.enter_context(ddp.no_sync())
        yield


def _mean_logs(logs: list[dict[str, float]]) -> dict[str, float]:
    """Each logged value averaged over the micro-batches that logged it."""
    keys = dict.fromkeys(k for entry in logs for k in entry)
    return {k: sum(e[k] for e in logs if k in e) / sum(k in e for e in logs) for k in keys}


def _wrap(modules: dict[str, nn.Module], dist: Dist, device: torch.device, cfg: TrainConfig) -> dict[str, nn.Module]:
    """Each module as training runs it: DDP-wrapped under torchrun and compiled with ``cfg.compile``, if it has
    trainable parameters (an EMA copy has none: it stays as it is)."""
    wrapped = {}
    for name, module in modules.items():
        trainable = any(p.requires_grad for p in module.parameters())
        if dist.enabled and trainable:
            ids = [device.index] if device.type == "cuda" else None
            module = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
        if cfg.compile and trainable:
            module = torch.compile(module)
        wrapped[name] = module
    return wrapped


def _evaluate(task: Task, dist: Dist) -> dict[str, float]:
    """Validation on the main process (the others wait): val sets are small next to training."""
    metrics: dict[str, float] = {}
    if dist.is_main:
        with torch.no_grad():
            metrics = task.evaluate()
    barrier(dist)
    return metrics
