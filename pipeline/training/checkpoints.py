"""Checkpoints a killed training run resumes from: safetensors + JSON, in one directory per run,
``root/<fingerprint>/step-XXXXXXXX``.

Checkpoints hold no pickles: tensors (models, optimiser state, RNG states) go to safetensors, everything else
to JSON. A run is identified by its fingerprint (parameters and inputs): a checkpoint is reused only if its
fingerprint matches, so a changed experiment never resumes from a stale one. Runs of other experiments live in
sibling directories, so nothing one run does (resuming, pruning) reads or deletes another's checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline import atomic

log = logging.getLogger(__name__)

_TENSOR_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


class UnusableCheckpoint(ValueError):
    """A checkpoint that cannot be restored: a missing, truncated or malformed file, or tensors that do not fit."""


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
    """Write ``root/<fingerprint>/step-XXXXXXXX`` atomically, then prune the run.

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
    (``.step-*.old-<pid>``) by a replacement that was killed half-way is put back.
    """
    if not root.is_dir():
        return
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
