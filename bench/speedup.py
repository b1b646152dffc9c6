"""New code against old, alternately in one run: the training steps of issue 27, each timed in a subprocess that
imports ``pipeline`` from one tree or the other.

    git worktree add /tmp/base e85da5f --detach
    python bench/speedup.py --base /tmp/base --rounds 3 --cases cifar-o0 cifar-o3 demo tokenizer

Every round runs each case once with the old tree, once with this one (which first alternates from round to
round), so a change in the load of a shared machine hits both alike. The step scripts are this tree's
(``bench/transformer.py --json``, ``bench/tokenizer.py --json``) for both: only ``pipeline`` differs. Prints a
markdown row per case: each tree's median step time, the speed-up (the median of the per-round ratios, and their
range), and the new tree's tokens/s and CPU MFU (``bench/transformer.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CIFAR = ["--params", "params/cifar10.yaml", "--set", "transformer.model.depth=8", "transformer.model.width=384"]
CIFAR += ["transformer.model.heads=6", "transformer.train.batch_size=128"]
TRANSFORMER = [str(HERE / "transformer.py"), "--config", "demo", "--no-sampling", "--json"]
CASES = {
    "cifar-o0": [*TRANSFORMER, *CIFAR, "decompose.order=0"],
    "cifar-o3": [*TRANSFORMER, *CIFAR, "decompose.order=3"],
    "demo": TRANSFORMER,
    "tokenizer": [str(HERE / "tokenizer.py"), "--json", "--params", "params/cifar10.yaml", "--set"]
    + ["tokenizer.model.channels=64", "tokenizer.train.batch_size=128"],
}


def run(tree: Path, case: str, steps: int, warmup: int, threads: int) -> dict:
    """One timing of ``case`` with ``pipeline`` imported from ``tree``: the step script's JSON."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, *CASES[case], "--steps", str(steps), "--warmup", str(warmup)]
    command += ["--threads", str(threads)]
    done = subprocess.run(command, cwd=HERE.parent, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{case} with {tree} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[0])
    if Path(result["code"]) != tree:
        raise SystemExit(f"{case}: imported pipeline from {result['code']}, not {tree}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="The old code's tree (a worktree of e85da5f).")
    parser.add_argument("--new", type=Path, default=HERE.parent, help="The new code's tree (default: this one).")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="Timed steps per run (their median counts).")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    trees = {"old": args.base.resolve(), "new": args.new.resolve()}
    for tree in trees.values():  # else the subprocess would import the installed package instead, unseen
        if not (tree / "pipeline" / "__init__.py").is_file():
            raise SystemExit(f"{tree} holds no pipeline/ package: not a tree of this project")
    print(f"<!-- {datetime.date.today()} · python bench/speedup.py {' '.join(sys.argv[1:])} -->")
    print("| case | old s/step | new s/step | speed-up (range over rounds) | new tokens/s | new CPU MFU | load |")
    print("|---|---|---|---|---|---|---|")
    for case in args.cases:
        results: dict[str, list[dict]] = {"old": [], "new": []}
        for r in range(args.rounds):
            for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                results[name].append(run(trees[name], case, args.steps, args.warmup, args.threads))
        seconds = {name: [x["seconds"] for x in runs] for name, runs in results.items()}
        ratios = [old / new for old, new in zip(seconds["old"], seconds["new"], strict=True)]
        last = results["new"][-1]
        tokens = (
            f"{statistics.median(x['tokens_per_s'] for x in results['new']):.0f}" if "tokens_per_s" in last else "–"
        )
        mfu = [x["cpu_mfu"] for x in results["new"] if x.get("cpu_mfu") is not None]
        loads = [float(x["note"].rpartition("load average ")[2].split(";")[0]) for x in results["new"] + results["old"]]
        print(
            f"| {case} | {statistics.median(seconds['old']):.2f} | {statistics.median(seconds['new']):.2f} | "
            f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) | {tokens} | "
            f"{f'{statistics.median(mfu):.0%}' if mfu else '–'} | {min(loads)}–{max(loads)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
