"""The one training loop, shared by the tokenizer and the transformer.

A ``Task`` owns the models and says how to compute losses; this module does everything else the same way for
both: device and DDP, AdamW with warm-up and cosine decay, gradient clipping, bf16 autocast on CUDA, dvclive
logging, periodic evaluation, and checkpoints every N steps that a killed run resumes from.

Checkpoints hold no pickles: tensors (models, optimiser state, RNG states) go to safetensors, everything else
to JSON. A checkpoint is reused only if its fingerprint (parameters and inputs of the run) matches, so a changed
experiment never resumes from a stale one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline import atomic
from pipeline.config import Field, section
from pipeline.progress import Progress, Silent
from pipeline.runtime import Dist, barrier, dist_from_env, init_distributed, resolve_device


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
    """What the loop trains. ``modules`` holds all state to checkpoint; ``wrap`` receives them DDP-wrapped."""

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
    from pipeline.data.loader import ShardLoader

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
    """Whether ``precision`` means bf16 autocast on ``device``. auto: where bf16 is native. On a 2-core CPU with
    AVX512-BF16 and AMX the demo transformer's training step ran 1.37× and the reference classifier's 2.06× faster
    in bf16 (bench/RESULTS.md); a CPU without them emulates bf16 and would run slower than fp32."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and torch.cpu._is_avx512_bf16_supported())


def autocast_context(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(cfg.precision, device) else nullcontext()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: safetensors + JSON, in one directory per run: root/<fingerprint>/step-XXXXXXXX
#
# A run is identified by its fingerprint (parameters and inputs). Runs of other experiments live in sibling
# directories, so nothing one run does (resuming, pruning) reads or deletes another's checkpoints.

log = logging.getLogger(__name__)

_TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


def _optimizer_tensors(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{name}.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(name: str, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        prefix, index, slot = key.split(".", 2)
        if prefix == name:
            state.setdefault(int(index), {})[slot] = value
    for key, value in meta["scalars"].items():
        index, slot = key.split(".", 1)
        state.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)  # MT19937: {"key": uint32 array, "pos": int}, ...
    numpy_state["state"] = {"key": numpy_state["state"]["key"].tolist(), "pos": numpy_state["state"]["pos"]}
    return tensors, {"python": [version, list(internal), gauss], "numpy": numpy_state}


def _rng_setter(tensors: dict[str, torch.Tensor], meta: dict) -> Callable[[], None]:
    """Parse a saved RNG state into the function that sets it; a malformed one raises here, having set nothing."""
    torch_state = tensors["torch"]
    torch.Generator().set_state(torch_state)
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    version, internal, gauss = meta["python"]
    python_state = (version, tuple(internal), gauss)
    random.Random().setstate(python_state)
    numpy_state = dict(meta["numpy"])
    numpy_state["state"] = {
        "key": np.array(numpy_state["state"]["key"], dtype=np.uint32),
        "pos": numpy_state["state"]["pos"],
    }
    np.random.RandomState().set_state(numpy_state)

    def set_rng() -> None:
        torch.set_rng_state(torch_state)
        if torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(python_state)
        np.random.set_state(numpy_state)

    return set_rng


def state_dict_tensors(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v.detach().cpu().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()
    }


def load_state_dict_tensors(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})


def save_checkpoint(
    root: Path,
    step: int,
    fingerprint: str,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    keep: int,
) -> Path:
    """Write ``root/<fingerprint>/step-XXXXXXXX`` atomically, point the run's ``latest.json`` at it, prune the run.

    Only this run's older checkpoints are pruned (to ``keep``): those of other fingerprints are other experiments'.
    """
    run = root / fingerprint
    target = run / f"step-{step:08d}"
    optim_tensors, optim_meta = {}, {}
    for name, optimizer in optimizers.items():
        tensors, meta = _optimizer_tensors(name, optimizer)
        optim_tensors.update(tensors)
        optim_meta[name] = meta
    rng_tensors, rng_meta = _rng_state()
    with atomic.atomic_dir(target) as tmp:
        save_file(state_dict_tensors(modules), str(tmp / "model.safetensors"))
        save_file(optim_tensors or {"_empty": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        sizes = {}
        for name in _TENSOR_FILES:  # on disk before the rename, so that a power cut cannot truncate a "complete" one
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
            sizes[name] = (tmp / name).stat().st_size
        state = {"step": step, "fingerprint": fingerprint, "sizes": sizes, "optimizers": optim_meta, "rng": rng_meta}
        atomic.write_json(tmp / "state.json", state)
    # The pointer moves once the checkpoint is in place and pruning keeps the newest: it never names a missing one.
    atomic.write_json(run / "latest.json", {"step": step, "path": target.name, "fingerprint": fingerprint})
    for old in _checkpoints(run)[:-keep]:
        shutil.rmtree(old)
    return target


def _checkpoints(run: Path) -> list[Path]:
    """The complete checkpoints of a run directory, oldest first (step numbers are fixed-width: names sort)."""
    return sorted(run.glob("step-*"))


def resume(
    root: Path,
    fingerprint: str,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    restore_rng: bool,
) -> int:
    """Restore the newest usable checkpoint of the run ``fingerprint``; return its step (0: start from scratch).

    A checkpoint that cannot be used is named in a warning and the one before it is tried; never a crash.
    """
    candidates = _checkpoints(root / fingerprint)[::-1]
    for i, path in enumerate(candidates):
        try:
            return load_checkpoint(path, modules, optimizers, restore_rng)
        except UnusableCheckpoint as err:
            then = f"trying {candidates[i + 1].name}" if i + 1 < len(candidates) else "training starts from step 0"
            log.warning("checkpoint %s cannot be used: %s; %s", path, err, then)
    return 0


def tidy_checkpoints(root: Path, fingerprint: str) -> None:
    """Before a run (main process only): clear what killed runs left, and say which other runs' checkpoints stay.

    Half-written checkpoints (``.step-*.tmp-<pid>``) of dead processes are deleted; a checkpoint moved aside
    (``.step-*.old-<pid>``) by a replacement that was killed half-way is put back. Checkpoints written before
    each run had its own directory (``root/step-*``) move into their run's directory.
    """
    if not root.is_dir():
        return
    for flat in _checkpoints(root):
        try:
            owner = json.loads((flat / "state.json").read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s has no readable state.json: not a checkpoint this version can use; left as it is", flat)
            continue
        (root / owner).mkdir(exist_ok=True)
        if (root / owner / flat.name).exists():
            shutil.rmtree(flat)
        else:
            os.replace(flat, root / owner / flat.name)
    (root / "latest.json").unlink(missing_ok=True)
    for leftover in (root / fingerprint).glob(".step-*"):
        name, _, pid = leftover.name[1:].rpartition("-")
        if not pid.isdigit() or _process_alive(int(pid)):
            continue
        if name.endswith(".old") and not (leftover.parent / name[: -len(".old")]).exists():
            os.replace(leftover, leftover.parent / name[: -len(".old")])
        else:
            shutil.rmtree(leftover)
    others = [p for p in root.iterdir() if p.is_dir() and p.name != fingerprint and _checkpoints(p)]
    if others:
        size = sum(f.stat().st_size for p in others for f in p.rglob("*") if f.is_file())
        log.info(
            "%s also holds the checkpoints of %d other run(s) (other params or inputs, %.1f MB): they are kept for "
            "those experiments to resume; delete the directories of runs you will not resume",
            root,
            len(others),
            size / 1e6,
        )


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def load_checkpoint(
    path: Path, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], restore_rng: bool
) -> int:
    """Restore the checkpoint at ``path`` and return its step.

    Every file is read and checked against the models and optimisers before anything is set: a checkpoint that
    cannot be used raises ``UnusableCheckpoint`` naming the file and leaves the models, optimisers and RNGs as
    they were.
    """
    state = _read_json(path / "state.json")
    if not isinstance(state, dict) or not isinstance(state.get("sizes", {}), dict):
        raise UnusableCheckpoint("state.json does not describe a checkpoint")
    for name, size in state.get("sizes", {}).items():
        found = (path / name).stat().st_size if (path / name).exists() else None
        if found != size:
            what = "is missing" if found is None else f"has {found} bytes where {size} were written (truncated?)"
            raise UnusableCheckpoint(f"{name} {what}")
    model = _read_tensors(path / "model.safetensors")
    optim_tensors = _read_tensors(path / "optimizer.safetensors")
    rng_tensors = _read_tensors(path / "rng.safetensors") if restore_rng else {}
    try:
        _check_fits(modules, model)
        for name, optimizer in optimizers.items():
            _check_optimizer_fits(name, optimizer, optim_tensors, state["optimizers"][name])
        set_rng = _rng_setter(rng_tensors, state["rng"]) if restore_rng else None
        step = int(state["step"])
    except UnusableCheckpoint:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        raise UnusableCheckpoint(
            f"state.json does not describe this run's state ({type(err).__name__}: {err})"
        ) from err
    # All checked: nothing below can fail half-way.
    load_state_dict_tensors(modules, model)
    for name, optimizer in optimizers.items():
        _load_optimizer(name, optimizer, optim_tensors, state["optimizers"][name])
    if set_rng is not None:
        set_rng()
    return step


class UnusableCheckpoint(ValueError):
    """A checkpoint that cannot be restored: a missing, truncated or malformed file, or tensors that do not fit."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UnusableCheckpoint(f"{path.name} is missing") from None
    except (OSError, ValueError) as err:
        raise UnusableCheckpoint(f"{path.name} is not readable JSON ({err})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise UnusableCheckpoint(f"{path.name} is missing")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise UnusableCheckpoint(f"{path.name} is not a readable safetensors file ({err})") from None


def _check_fits(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """The saved tensors are exactly the modules' state, shape for shape (else the model changed since)."""
    expected = {f"{n}.{k}": tuple(v.shape) for n, m in modules.items() for k, v in m.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if found == expected:
        return
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    resized = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    parts = [
        f"{label} {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
        for label, keys in (("missing", missing), ("unexpected", extra), ("other shape", resized))
        if keys
    ]
    raise UnusableCheckpoint(f"model.safetensors does not fit the model ({'; '.join(parts)})")


def _check_optimizer_fits(name: str, optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    saved = [len(group["params"]) for group in meta["param_groups"]]
    if saved != [len(group["params"]) for group in optimizer.param_groups]:
        raise UnusableCheckpoint(f"optimizer {name}: parameter groups of sizes {saved} do not fit this model")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for key, value in tensors.items():
        if not key.startswith(f"{name}.") or value.ndim == 0:  # another optimiser's, or a step count
            continue
        if value.shape != params[int(key.split(".", 2)[1])].shape:
            raise UnusableCheckpoint(
                f"optimizer.safetensors: {key} has shape {tuple(value.shape)}, not that of its parameter"
            )


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


class _Live:
    """dvclive on the main process, with the history of a resumed run cut back to its checkpoint."""

    def __init__(self, directory: Path, start_step: int, enabled: bool):
        self.live = None
        if not enabled:
            return
        if start_step > 0:
            _truncate_history(directory, start_step)
        self.live = _files_only_live(directory, resume=start_step > 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.live is None:
            return
        self.live.step = step
        for key, value in metrics.items():
            self.live.log_metric(key, float(value))
        self.live.make_summary()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()


def _files_only_live(directory: Path, resume: bool):
    """dvclive writing its metric files and nothing else.

    Its Git and DVC integration (experiment names, Studio) is of no use here and is harmful: in a Git repository
    without a commit it stops with ``SCMError: Empty git repo``, and in one without DVC it runs ``dvc init``.
    """
    from dvclive import Live

    class FilesOnly(Live):
        def _init_dvc(self) -> None:
            pass

    return FilesOnly(dir=str(directory), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)


def _truncate_history(directory: Path, start_step: int) -> None:
    """Drop logged rows at or after ``start_step``: the resumed run logs those steps again.

    A row cut short by a kill (or a full disk) is dropped too, rather than stopping the resumed run.
    """
    for tsv in (directory / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        if not lines:
            continue
        header, rows = lines[0], lines[1:]
        columns = header.split("\t")
        step_col = columns.index("step")
        kept = [r for r in rows if _logged_step(r, len(columns), step_col) < start_step]
        atomic.write_bytes(tsv, ("\n".join([header, *kept]) + "\n").encode())


def _logged_step(row: str, width: int, step_col: int) -> float:
    """The step of a logged row; infinity (dropped) for a row that was not written to its end."""
    fields = row.split("\t")
    try:
        float(fields[-1])
        return int(fields[step_col]) if len(fields) == width else math.inf
    except ValueError:
        return math.inf


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
    live = _Live(paths.live, start_step, enabled=dist.is_main)
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
    metrics: dict[str, float] = {}
    window_start, window_samples = time.perf_counter(), 0
    for step in range(start_step, cfg.steps):
        micro = [task.to_device(next(batches), device) for _ in range(accumulation)]
        factor = lr_factor(step, cfg)
        logs: dict[str, float] = {"lr": cfg.lr * factor}
        for phase in phases:
            for group in phase.optimizer.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
            phase.optimizer.zero_grad(set_to_none=True)
            phase_logs, stepping = [], False
            for i, batch in enumerate(micro):
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
        logs.update(task.after_step(step, micro[-1]))
        window_samples += cfg.batch_size * accumulation * dist.world_size
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            elapsed = time.perf_counter() - window_start
            logs["samples_per_s"] = window_samples / max(elapsed, 1e-9)
            live.log(step, {f"train/{k}" if "/" not in k else k: v for k, v in logs.items()})
            window_start, window_samples = time.perf_counter(), 0
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            metrics = _evaluate(task, dist)
            live.log(step, metrics)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            if dist.is_main:
                save_checkpoint(paths.checkpoints, done, fingerprint, modules, optimizers, cfg.keep_checkpoints)
            barrier(dist)
        progress.advance()
    if start_step >= cfg.steps:  # already finished: evaluate what the checkpoint holds
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
