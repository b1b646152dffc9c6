"""The README's comparison tables, row by row: dvc.yaml's stages run once per distinct input, many at a time.

    cart tables --table cifar10 --root /tmp/tables --jobs 8 --out tables-cifar10.json \
        --set data.archive=/path/to/cifar-10-binary.tar.gz \
        --set evaluate.reference_stats=/path/to/cifar10_train_stats.npz \
        --set tokenizer.rfid.reference_stats=/path/to/cifar10_train_stats.npz
        # data.archive: or leave it out (the shard stage downloads); the statistics: `cart reference-stats` of
        # the training images, for sample_fid (the table asks for it) and the tokenizer's rFID
    cart tables --table demo --root /tmp/tables-demo --jobs 1 --only o0 --only o0-ctf
    cart tables --table cifar10 --until train_tokenizer ...   # only the rows' stages up to their tokenizers
    cart tables --report tables-cifar10.json          # the markdown tables of a finished run

A row is the table's params file with a few keys changed (params/tables.yaml, as `dvc exp run -S key=value` changes
them; a table's `set` changes keys for all its rows). Each stage of dvc.yaml runs exactly as `dvc repro` runs it,
`python -m stages <command>` in a directory of its own that holds the row's params.yaml and symbolic links to its
upstream stages' outputs. A stage's directory is named by a hash of the params keys dvc.yaml lists for it and of its
upstream stages' names, so rows share a stage whose inputs are equal (every row of a table shares one shard and one
reference classifier; seeds of the transformer share the tokenizer), as DVC's cache would.

A code change that adds a params key (with a default that keeps what the old code did) renames every stage that
reads its section, and so every stage after it: ``--adopt`` links the finished directories under their new names
where the old params file equals today's but for the keys it lacks, and their upstream directories agree, so a run
resumes instead of starting again (``adopt``); a value that differs is never adopted.

Why not `dvc exp run --queue`: it needs Git and DVC where it runs (a lent GPU machine has neither), and it runs
each experiment's stages one after another; here independent stages of all rows run side by side (``--jobs``) to
fill one GPU, stages already finished are not run again (rerunning the command after a kill resumes: each stage
resumes from its own checkpoints), and no new stage starts after ``--deadline`` seconds.

The results file holds, per row, its params, every metrics file its stages wrote, and each stage's wall time; it is
rewritten as each stage finishes, so a run stopped from outside keeps what was finished. Every row is reported
with its cost beside its quality: the transformer's training FLOPs (model FLOPs, 3 × forward, times the images it
was trained on) and the wall time of the stages that train the row (decompose, tokenizer, tokens, transformer;
stages run side by side share the machine, so compare wall times of one run at --jobs 1).

dvc.yaml's sample_fid stage (the field's protocol: ``sample_fid.per_class`` samples of every class, their Inception
FID against `evaluate.reference_stats`, a `cart reference-stats` file of the training images) runs only for a table
with ``sample_fid: true`` (the CIFAR-10 rows of issue 28: ``cifar10``), after each row's tokenizer and transformer.
Such a table refuses, before any stage runs, a row whose `evaluate.reference_stats` is not an absolute path to a
file (exit 2, naming the key, the row and the table): the stage would draw thousands of samples and measure
nothing. Its report leads with that FID (mean ± std over the seeds) and what it was measured on, then evaluate's
FIDs, marked "vs val" (samples, ceiling and floor against the val images, e.g. 1 000 against 1 000). Tables
without it keep evaluate's FIDs first. The other tables leave it off: a lent GPU machine has no FID network and
cannot return 10 000 images, a swept table would draw them once per weight, the demo has no training statistics.

A table with a `guidance` key (``{common: w, sweep: [w, …]}``) evaluates each of its rows at every weight of the
sweep (rows ``<row>@w<w>``, which share everything but the evaluate stage, and the same sampling seed), and its
report gives each setting at the common weight and at its own best weight of the sweep, as papers report their
rows.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.evaluation.experiments import (
    EVAL_FILE,
    FID_FILE,
    SAMPLE_FID,
    cell,
    experiment_points,
    flatten,
    group_runs,
)

REPO = Path(__file__).resolve().parent.parent  # the checkout whose dvc.yaml, code and params files the rows run
ROWS = REPO / "params" / "tables.yaml"

CODE = ("pipeline", "stages")  # linked into every stage directory: dvc.yaml's code deps
# sample_fid's protocol (thousands of samples against a dataset's reference statistics) runs only for a table that
# asks for it (``sample_fid: true``): it needs `evaluate.reference_stats` and the FID network, and costs as much
# sampling as its samples. Other tables' FIDs are evaluate's (Inception first, FID_ref second), against the val
# images; or, for a run on a machine without the FID network, its Inception metrics as `measure_inception`
# measured them afterwards from its images.
OPTIONAL_STAGES = ("sample_fid",)
REFERENCE_STATS = "evaluate.reference_stats"  # what sample_fid measures against


# ---------------------------------------------------------------------------------------------------------------
# dvc.yaml's stages, and one row's jobs


@dataclass(frozen=True)
class Stage:
    name: str
    command: list[str]  # argv after the interpreter
    deps: tuple[str, ...]  # data deps: outputs of earlier stages
    params: tuple[str, ...]
    outs: tuple[str, ...]
    metrics: tuple[str, ...]


def _paths(entries: list) -> tuple[str, ...]:
    return tuple(next(iter(e)) if isinstance(e, dict) else e for e in entries or [])


def read_stages(dvc_yaml: Path, optional: tuple[str, ...] = ()) -> list[Stage]:
    """dvc.yaml's stages in file order (which is an order that runs each after its deps), with those of
    ``OPTIONAL_STAGES`` named in ``optional``."""
    stages = []
    for name, spec in yaml.safe_load(dvc_yaml.read_text())["stages"].items():
        if name in OPTIONAL_STAGES and name not in optional:
            continue
        argv = spec["cmd"].split()
        if argv[0] != "python":
            raise ValueError(f"{dvc_yaml}: stage {name}: expected a `python -m stages …` command, got {spec['cmd']!r}")
        deps = tuple(d for d in _paths(spec.get("deps")) if d.split("/", 1)[0] not in CODE)
        outs = _paths(spec.get("outs")) + _paths(spec.get("metrics")) + _paths(spec.get("plots"))
        stages.append(Stage(name, argv[1:], deps, _paths(spec.get("params")), outs, _paths(spec.get("metrics"))))
    return stages


def _lookup(values: dict, dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"params key {dotted!r} (named in dvc.yaml) is not in the params file")
        node = node[part]
    return node


def set_key(values: dict, dotted: str, value: Any) -> None:
    """``-S a.b.c=value``: the key must exist (a typo would otherwise run an unchanged row)."""
    *parents, last = dotted.split(".")
    node = values
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise KeyError(f"override {dotted!r}: no such section in the params file")
    if last not in node:
        raise KeyError(f"override {dotted!r}: no such key in the params file")
    node[last] = value


@dataclass(eq=False)  # a job is itself: `in` and `is` by identity
class Job:
    stage: Stage
    key: str
    params: dict
    upstream: dict[str, Job]  # dep path -> the job that writes it
    rows: list[str] = field(default_factory=list)
    status: str = "pending"  # pending, running, done, failed, skipped
    seconds: float | None = None
    process: subprocess.Popen | None = None
    started: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.stage.name}-{self.key}"


def plan(rows: dict[str, dict], stages: list[Stage]) -> tuple[dict[str, Job], dict[str, list[Job]]]:
    """Every distinct job of the rows (in row order: the first row's stages first), and each row's jobs."""
    jobs: dict[str, Job] = {}
    row_jobs: dict[str, list[Job]] = {}
    for row, params in rows.items():
        writer: dict[str, Job] = {}
        mine = []
        for stage in stages:
            missing = [d for d in stage.deps if d not in writer]
            if missing:
                raise ValueError(f"dvc.yaml: stage {stage.name} depends on {missing}, which no earlier stage writes")
            upstream = {d: writer[d] for d in stage.deps}
            identity = {
                "stage": stage.name,
                "params": {p: _lookup(params, p) for p in stage.params},
                "upstream": sorted({j.name for j in upstream.values()}),
            }
            key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
            job = jobs.setdefault(f"{stage.name}-{key}", Job(stage, key, params, upstream))
            job.rows.append(row)
            mine.append(job)
            writer |= {out: job for out in stage.outs}
        row_jobs[row] = mine
    return jobs, row_jobs


# ---------------------------------------------------------------------------------------------------------------
# Running


def _prepare(job: Job, root: Path) -> Path:
    """The job's directory: the code, the row's params.yaml, links to the upstream outputs it reads."""
    directory = root / job.name
    directory.mkdir(parents=True, exist_ok=True)
    for name in CODE:
        link = directory / name
        if link.is_symlink() and link.readlink() != REPO / name:  # a root another checkout started: run this one's
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(REPO / name)
    (directory / "params.yaml").write_text(yaml.safe_dump(job.params, sort_keys=False))
    for dep, writer in job.upstream.items():
        link = directory / dep
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to((root / writer.name / dep).resolve())
    return directory


def _within(old: Any, new: Any) -> bool:
    """``old`` equals ``new`` but for keys ``old`` lacks (keys added to the params since ``old`` was written)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return all(k in new and _within(v, new[k]) for k, v in old.items())
    return old == new


def adopt(jobs: dict[str, Job], root: Path, say: Callable[[str], None]) -> dict[str, str]:
    """Link finished stage directories under the names today's params give them, where a params key added since
    (with the value the old code behaved as) renamed them: a job without a directory adopts the one finished
    directory of its stage whose params equal the job's except keys the old file lacks, and whose upstream
    directories are the job's (adopted ones included). Returns {new name: adopted name}."""
    finished = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (p / ".done").exists()]
    real: dict[str, str] = {}  # job name -> the directory it stands for
    adopted: dict[str, str] = {}
    for name, job in jobs.items():  # plan order: upstream first
        if (root / name).exists():
            real[name] = (root / name).resolve().name
            continue
        upstream = {real.get(j.name, j.name) for j in job.upstream.values()}
        matches = []
        for path in finished:
            if not path.name.startswith(f"{job.stage.name}-"):
                continue
            old = yaml.safe_load((path / "params.yaml").read_text())
            keys = [k for k in job.stage.params if _has(old, k)]  # a params entry dvc.yaml lists since: not in old
            links = {path / dep for dep in job.upstream}
            if all(_within(_lookup(old, k), _lookup(job.params, k)) for k in keys) and upstream == {
                link.resolve().relative_to(root.resolve()).parts[0] for link in links if link.is_symlink()
            }:
                matches.append(path.name)
        if len(matches) == 1:
            (root / name).symlink_to(matches[0])
            real[name] = adopted[name] = matches[0]
            say(f"adopted {matches[0]} as {name} for {', '.join(job.rows)}")
    return adopted


def _has(values: dict, dotted: str) -> bool:
    try:
        _lookup(values, dotted)
    except KeyError:
        return False
    return True


def run(
    jobs: dict[str, Job],
    root: Path,
    parallel: int,
    deadline: float,
    fail_fast: bool,
    on_finish: Callable[[], None],
    say: Callable[[str], None],
) -> None:
    """Start every ready job in plan order, up to ``parallel`` at a time, until all are done or the deadline.

    With ``fail_fast``, a stage failing before any row has finished stops the run (the others are terminated:
    they resume from their checkpoints when it is run again): that is a fault of the code on this machine, and
    every row would meet it, so waiting on the rest only spends the machine's time.
    """
    start = time.monotonic()
    finals = {job.name for job in jobs.values() if not any(job in j.upstream.values() for j in jobs.values())}
    pending = [j for j in jobs.values() if not (root / j.name / ".done").exists()]
    for job in jobs.values():
        if job not in pending:
            job.status = "done"
            job.seconds = float((root / job.name / ".done").read_text() or "nan")
    running: list[Job] = []
    while pending or running:
        for job in list(running):
            code = job.process.poll()
            if code is None:
                continue
            running.remove(job)
            job.seconds = time.monotonic() - job.started
            job.status = "done" if code == 0 else "failed"
            if code == 0:
                (root / job.name / ".done").write_text(f"{job.seconds:.1f}")
            say(f"[{time.monotonic() - start:7.1f} s] {job.status:6s} {job.name} ({job.seconds:.1f} s)")
            on_finish()
            if code != 0 and fail_fast and not any(jobs[n].status == "done" for n in finals):
                for other in running:
                    other.process.terminate()
                    other.process.wait()
                    other.status = "failed"
                say(f"stopped: {job.name} failed before any row finished (log: {root / job.name / 'log.txt'})")
                on_finish()
                return
        for job in list(pending):
            if any(u.status in ("failed", "skipped") for u in job.upstream.values()):
                job.status = "skipped"
                pending.remove(job)
        late = time.monotonic() - start > deadline
        for job in list(pending):
            if late or len(running) >= parallel:
                break
            if all(u.status == "done" for u in job.upstream.values()):
                directory = _prepare(job, root)
                log = (directory / "log.txt").open("a")
                env = os.environ | {"PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "COLUMNS": "160"}
                job.process = subprocess.Popen(
                    [sys.executable, *job.stage.command], cwd=directory, stdout=log, stderr=subprocess.STDOUT, env=env
                )
                job.started = time.monotonic()
                job.status = "running"
                pending.remove(job)
                running.append(job)
                say(f"[{time.monotonic() - start:7.1f} s] start  {job.name} for {', '.join(job.rows)}")
        if late and not running:
            break
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------------------------
# Results


def results(rows: dict[str, dict], row_jobs: dict[str, list[Job]], root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for row, params in rows.items():
        metrics: dict[str, Any] = {}
        for job in row_jobs[row]:
            for path in job.stage.metrics:
                file = root / job.name / path
                if job.status == "done" and file.exists():
                    metrics[path] = json.loads(file.read_text())
        out[row] = {
            "finished": all(j.status == "done" for j in row_jobs[row]),
            "params": params,
            "metrics": metrics,
            "seconds": {j.stage.name: j.seconds for j in row_jobs[row]},
            "failed": {j.stage.name: _tail(root / j.name / "log.txt") for j in row_jobs[row] if j.status == "failed"},
        }
    return out


def _tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def _row_point(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """The run as `dvc exp show` gives it: flattened params and metrics in one dict; sample-fid's metrics under
    their file's name (``metrics/fid.json:fid_inception``), apart from evaluate's of the same names."""
    point = {"Experiment": name} | flatten(result["params"])
    for path, values in result["metrics"].items():
        flat = flatten(values)
        point |= {f"{path}:{k}": v for k, v in flat.items()} if path == FID_FILE else flat
    return point


TRAINING_STAGES = ("decompose", "train_tokenizer", "extract_tokens", "train_transformer")


def row_cost(result: dict[str, Any]) -> dict[str, float]:
    """A run's training cost: the transformer's training FLOPs (per image × the images of its steps) and the wall
    seconds of the stages that train the row (the shard and the reference classifier are every row's)."""
    train = result["params"]["transformer"]["train"]
    images = train["steps"] * train["batch_size"] * train.get("grad_accumulation", 1)
    per_image = result["metrics"].get("metrics/transformer.json", {}).get("train_flops_per_image", math.nan)
    seconds = [result["seconds"].get(stage) for stage in TRAINING_STAGES]
    wall = sum(seconds) if all(isinstance(t, int | float) for t in seconds) else math.nan
    return {"train_flops": per_image * images, "train_seconds": wall}


def _mean_std(row: dict, key: str, values: list[float]) -> None:
    row[key] = statistics.fmean(values)
    row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0


def settings(finished: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished runs grouped by setting (seeds averaged) as ``group_runs`` rows, with the training cost (mean
    and sample std over the seeds) added."""
    points_in = [_row_point(n, r) for n, r in finished.items()]
    names = sorted({k for p in points_in for k in flatten(finished[p["Experiment"]]["params"])})
    points = experiment_points(points_in, names, lambda p: flatten(finished[p["Experiment"]]["params"]))
    rows = group_runs(points)
    for row in rows:
        costs = [row_cost(finished[n]) for n in row["names"]]
        for key in ("train_flops", "train_seconds"):
            _mean_std(row, key, [c[key] for c in costs])
    return rows


def _short(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _label(row: dict[str, Any], names: list[str]) -> str:
    label = ", ".join([f"order {row['order']}"] + [f"{k}={_short(v)}" for k, v in row["differs"].items()])
    return f"{label} ({', '.join(names)})"


def _cost_cells(row: dict[str, Any]) -> str:
    minutes = {"train_seconds": row["train_seconds"] / 60, "train_seconds_std": row["train_seconds_std"] / 60}
    return (
        f"| {row['train_flops_per_image'] / 1e9:.2f} | {row['train_flops'] / 1e15:.3f} "
        f"| {cell(minutes | {'runs': row['runs']}, 'train_seconds', 1)} "
    )


def _fid_set(row: dict[str, Any]) -> str:
    """What the row's FIDs were measured on, and why a row has no Inception FID."""
    return "; ".join(text for text in (row["fid_set"], row["inception_note"]) if text) or "–"


def _has_sample_fid(rows: list[dict[str, Any]]) -> bool:
    """Whether any of the table's settings has sample-fid's FID (its table ran sample_fid): then it leads."""
    return any(math.isfinite(row[SAMPLE_FID]) for row in rows)


# Every table's FID columns: the field's FID (Inception) with its ceiling and floor, what it was measured on, then
# FID_ref with its own (secondary: comparable only between runs sharing the reference classifier). A table whose
# rows ran sample_fid leads with its FID (the field's protocol: thousands of samples against the training set's
# statistics) and what it was measured on; evaluate's FIDs follow, marked as measured against the val images.
def _fid_header(where: str = "", sample_fid: bool = False) -> str:
    lead, val = "", ""
    if sample_fid:
        lead = f"| FID (Inception, sample-fid vs reference statistics){where} ↓ | sample-fid measured on "
        val = " vs val"
    return (
        f"{lead}| FID (Inception){val}{where} ↓ | ceiling | untrained floor | FID measured on "
        f"| FID_ref{val}{where} ↓ | ceiling FID_ref | untrained floor FID_ref "
    )


def _fid_cells(row: dict[str, Any], sample_fid: bool = False) -> str:
    lead = f"| {cell(row, SAMPLE_FID, 2)} | {row['sample_fid_set'] or '–'} " if sample_fid else ""
    return (
        f"{lead}| {cell(row, 'fid_inception', 2)} | {cell(row, 'reconstruction_fid_inception', 2)} "
        f"| {cell(row, 'untrained_fid_inception', 2)} | {_fid_set(row)} | {cell(row, 'fid_ref', 2)} "
        f"| {cell(row, 'reconstruction_fid_ref', 2)} | {cell(row, 'untrained_fid_ref', 2)} "
    )


def markdown(table_rows: dict[str, dict[str, Any]], group: list[str]) -> str:
    """One line per setting (seeds averaged, mean ± sample std), labelled by what sets it apart."""
    finished = {name: table_rows[name] for name in group if table_rows.get(name, {}).get("finished")}
    if not finished:
        return "(no finished row)\n"
    rows = settings(finished)
    sample_fid = _has_sample_fid(rows)
    header = (
        f"| setting | runs {_fid_header('', sample_fid)}| class consistency ↑ | precision_ref | recall_ref | tokens "
        "| maps | transformer params | train GFLOP/image | transformer train PFLOP | train wall min "
        "| sampling images/s |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for row in rows:
        lines.append(
            f"| {_label(row, row['names'])} | {row['runs']} {_fid_cells(row, sample_fid)}"
            f"| {cell(row, 'class_consistency_ref', 3)} | {cell(row, 'precision_ref', 3)} "
            f"| {cell(row, 'recall_ref', 3)} | {row['tokens']:.0f} | {row['maps']:.0f} "
            f"| {row['parameters'] / 1e6:.2f} M {_cost_cells(row)}| {cell(row, 'sampling_images_per_s', 1)} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Guidance sweeps


GUIDANCE_KEY = "transformer.sampling.guidance"
_FIXED_IN_SWEEPS = (GUIDANCE_KEY, "transformer.sampling.seed", "transformer.sampling.preset")


def swept(name: str, weight: float) -> str:
    return f"{name}@w{weight:g}"


def expand_guidance(rows: dict[str, dict | None], guidance: dict[str, Any]) -> dict[str, dict]:
    """Each row once per weight of the sweep, named ``<row>@w<w>``: the same row (so the same training stages) and
    the same sampling seed, evaluated at that guidance weight."""
    sweep, common = [float(w) for w in guidance["sweep"]], float(guidance["common"])
    if common not in sweep:
        raise ValueError(f"guidance: the common weight {common:g} is not in the sweep {sweep}")
    out = {}
    for name, overrides in rows.items():
        fixed = sorted(set(overrides or {}) & set(_FIXED_IN_SWEEPS))
        if fixed:
            raise ValueError(f"row {name}: {', '.join(fixed)} is set by the table's guidance sweep for every row")
        for weight in sweep:
            out[swept(name, weight)] = dict(overrides or {}) | {GUIDANCE_KEY: weight}
    return out


def markdown_sweep(table_rows: dict[str, dict[str, Any]], group: list[str], guidance: dict[str, Any]) -> str:
    """One line per setting: its FID at the common weight and at its own best weight of the sweep (the lowest mean
    over its seeds of the Inception FID, or of FID_ref where a weight's runs lack the Inception FID), with the
    cost beside them."""
    common = float(guidance["common"])
    by_weight: dict[float, dict[str, dict[str, Any]]] = {}
    for weight in (float(w) for w in guidance["sweep"]):
        finished = {
            n: table_rows[swept(n, weight)] for n in group if table_rows.get(swept(n, weight), {}).get("finished")
        }
        by_weight[weight] = {_base_names(r): r for r in settings(finished)} if finished else {}
    keys = list(dict.fromkeys(k for rows in by_weight.values() for k in rows))
    if not keys:
        return "(no finished row)\n"
    sample_fid = _has_sample_fid([row for rows in by_weight.values() for row in rows.values()])
    header = (
        f"| setting | runs | FID (Inception) at w={common:g} ↓ | best w {_fid_header(' at best w', sample_fid)}"
        f"| FID_ref at w={common:g} | FID at each w (Inception; FID_ref where a row has none) | tokens "
        "| train GFLOP/image | transformer train PFLOP | train wall min |"
    )
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for key in keys:
        at = {w: rows[key] for w, rows in by_weight.items() if key in rows}
        lead = "fid_inception" if all(math.isfinite(r["fid_inception"]) for r in at.values()) else "fid_ref"
        best = min(at, key=lambda w: at[w][lead] if math.isfinite(at[w][lead]) else math.inf)
        row = at[best]
        each = ", ".join(f"{w:g}: {at[w][lead]:.2f}" for w in sorted(at))
        lines.append(
            f"| {_label(row, list(key))} | {row['runs']} "
            f"| {cell(at[common], 'fid_inception', 2) if common in at else '–'} "
            f"| {best:g}{'' if lead == 'fid_inception' else ' (by FID_ref)'} {_fid_cells(row, sample_fid)}"
            f"| {cell(at[common], 'fid_ref', 2) if common in at else '–'} | {each} | {row['tokens']:.0f} "
            f"{_cost_cells(row)}|"
        )
    return "\n".join(lines) + "\n"


def _base_names(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(name.rsplit("@w", 1)[0] for name in row["names"])


def report(saved: dict[str, Any]) -> str:
    text = []
    guidance = saved.get("guidance")
    for title, group in saved["tables"].items():
        table = markdown_sweep(saved["rows"], group, guidance) if guidance else markdown(saved["rows"], group)
        text.append(f"### {title}\n\n{table}")
    failed = {n: r["failed"] for n, r in saved["rows"].items() if r["failed"]}
    for name, stages in failed.items():
        for stage, tail in stages.items():
            text.append(f"row {name}: stage {stage} failed:\n{tail}\n")
    return "\n".join(text)


# ---------------------------------------------------------------------------------------------------------------
# A table's run


def table_rows(
    rows_file: Path, table: str, overrides: list[str], only: list[str] | None
) -> tuple[dict[str, Any], dict[str, dict]]:
    """The table's spec in ``rows_file`` and its rows' params: the table's params file (relative to the checkout)
    with the table's own ``set`` keys, then ``overrides`` (``key=value``, for every row), then each row's keys
    changed; with ``only``, just those rows (a swept table's ``<row>@w<w>`` with them)."""
    spec = yaml.safe_load(rows_file.read_text())[table]
    base = yaml.safe_load((REPO / spec["params"]).read_text())
    for key, value in (spec.get("set") or {}).items():
        set_key(base, key, value)
    for item in overrides:
        key, value = item.split("=", 1)
        set_key(base, key, yaml.safe_load(value))
    rows = {}
    row_overrides = spec["rows"] if "guidance" not in spec else expand_guidance(spec["rows"], spec["guidance"])
    chosen = only and {n for n in row_overrides if n.rsplit("@w", 1)[0] in only or n in only}
    for name, changes in row_overrides.items():
        if only and name not in chosen:
            continue
        params = copy.deepcopy(base)
        for key, value in (changes or {}).items():
            set_key(params, key, value)
        rows[name] = params
    return spec, rows


def table_stages(table: str, spec: dict[str, Any], rows: dict[str, dict], until: str | None) -> list[Stage]:
    """The stages the table's rows run: dvc.yaml's, with sample_fid where the table asks for it (``sample_fid:
    true``), up to ``until``. sample_fid with a row whose `evaluate.reference_stats` is not a file is refused
    (``InvalidInput``) before any stage runs: it would draw thousands of samples it cannot measure."""
    from pipeline.config import InvalidInput

    wanted = spec.get("sample_fid", False)
    if not isinstance(wanted, bool):
        raise InvalidInput(f"table {table}: sample_fid: {wanted!r} is not true or false")
    stages = stages_until(read_stages(REPO / "dvc.yaml", OPTIONAL_STAGES if wanted else ()), until)
    if "sample_fid" not in {s.name for s in stages}:
        return stages
    for row, params in rows.items():
        value = _lookup(params, REFERENCE_STATS)
        if value is None or not Path(value).is_absolute() or not Path(value).is_file():
            raise InvalidInput(
                f"table {table} (sample_fid: true): row {row}: {REFERENCE_STATS} is {value!r}; sample_fid measures "
                f"its samples against it: give an absolute path to the training images' statistics (each stage "
                f"runs in a directory of its own), --set {REFERENCE_STATS}=/path/to/train_stats.npz "
                "(`cart reference-stats`; docs/cifar10.md)"
            )
    return stages


def stages_until(stages: list[Stage], until: str | None) -> list[Stage]:
    """dvc.yaml's stages up to and including ``until`` (all of them for None): e.g. the rows' tokenizers alone."""
    if until is None:
        return stages
    names = [s.name for s in stages]
    if until not in names:
        raise KeyError(f"--until {until!r}: not a stage that tables run ({', '.join(names)})")
    return stages[: names.index(until) + 1]


def run_table(
    table: str,
    spec: dict[str, Any],
    rows: dict[str, dict],
    overrides: list[str],
    root: Path,
    parallel: int,
    deadline: float,
    fail_fast: bool,
    out: Path | None,
    say: Callable[[str], None],
    images: Path | None = None,
    until: str | None = None,
    adopt_finished: bool = False,
) -> None:
    """Run the rows' stages (see the module's docstring), or only those up to ``until``; with ``out``, rewrite the
    results file as each stage finishes and ``say`` the report at the end; ``say`` hears every line of progress.
    With ``images``, each finished row whose evaluate could not measure the Inception metrics has its images packed
    there as it finishes (``pack_images``), for ``measure_inception`` on a machine that has the FID network."""
    jobs, row_jobs = plan(rows, table_stages(table, spec, rows, until))
    if adopt_finished and root.is_dir():
        adopt(jobs, root, say)
    say(f"{len(rows)} rows, {len(jobs)} distinct stages, {parallel} at a time")
    packed: set[str] = set()

    def save() -> None:
        if images:
            pack_images(row_jobs, root, images, packed, say)
        if out:
            saved = {"table": table, "set": overrides, "tables": spec["tables"]}
            if "guidance" in spec:
                saved["guidance"] = spec["guidance"]
            saved["rows"] = results(rows, row_jobs, root)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(saved, indent=1))
            tmp.replace(out)

    root.mkdir(parents=True, exist_ok=True)
    run(jobs, root, parallel, deadline, fail_fast, save, say)
    save()
    if out:
        say(report(json.loads(out.read_text())))


# ---------------------------------------------------------------------------------------------------------------
# Inception metrics measured after the run, from the images it returned (pipeline.evaluation.deferred)


def pack_images(
    row_jobs: dict[str, list[Job]], root: Path, folder: Path, packed: set[str], say: Callable[[str], None]
) -> None:
    """``folder/<row>.npz`` for each finished row not yet in ``packed`` whose evaluate left its images (it had no
    FID network); a row whose evaluate measured them itself has nothing to pack."""
    from pipeline.evaluation.deferred import IMAGES, pack

    for row, mine in row_jobs.items():
        if row in packed or not all(j.status == "done" for j in mine):
            continue
        packed.add(row)
        source = next(root / j.name / "reports" / "evaluate" / IMAGES for j in mine if j.stage.name == "evaluate")
        if source.is_file():
            written = pack(source, folder, row)
            size = written.stat().st_size / 2**20
            say(f"row {row}: the images for its Inception metrics in {written} ({size:.1f} MiB)")


def measure_inception(
    results_file: Path,
    folder: Path,
    weights: str | None,
    reference_stats: Path | None,
    say: Callable[[str], None],
) -> str:
    """Measure the Inception metrics of every finished row that lacks them from its images in ``folder``
    (``folder/<row>.npz``, as ``pack_images`` wrote them), merge them into the row's ``metrics/eval.json`` in
    ``results_file`` (rewritten after each row, so a killed run keeps the rows it measured and a rerun measures
    the rest), write the report to ``tables.md`` beside it and return the report."""
    from pipeline import atomic
    from pipeline.config import InvalidInput
    from pipeline.evaluation.deferred import file_name, measure
    from pipeline.evaluation.evaluation import HEADLINE
    from pipeline.evaluation.sample_fid import load_reference_stats
    from pipeline.runtime import resolve_device

    try:
        saved = json.loads(results_file.read_text())
        rows = saved["rows"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InvalidInput(f"{results_file}: not a results file of `cart tables` ({err!r})") from None
    todo = {
        name: folder / file_name(name)
        for name, row in rows.items()
        if row.get("finished") and "fid_inception" not in row["metrics"].get(EVAL_FILE, {"fid_inception": None})
    }
    reference = None
    if reference_stats is not None:
        reference = load_reference_stats(reference_stats, "--reference-stats") | {"path": str(reference_stats)}
    if todo:
        batch = min(rows[n]["params"]["evaluate"]["feature_batch_size"] for n in todo)

        def merge(name: str, metrics: dict[str, Any]) -> None:
            values = rows[name]["metrics"][EVAL_FILE] | metrics
            rows[name]["metrics"][EVAL_FILE] = {k: values[k] for k in HEADLINE if k in values} | values
            atomic.write_json(results_file, saved)
            say(f"row {name}: FID (Inception) {metrics['fid_inception']:.2f} from {todo[name]}")

        measure(todo, weights, resolve_device("auto"), batch, reference, merge)
    else:
        say(f"{results_file}: no finished row lacks the Inception metrics")
    text = report(saved)
    atomic.write_bytes(results_file.parent / "tables.md", text.encode())
    return text
