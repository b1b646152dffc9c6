#!/usr/bin/env bash
# CIFAR-10 on one GPU, deep not wide: VAR (order 0) and CART (order 3), one seed each, on a bare machine with one
# H100 or H200, results under $OUT in at most LIMIT seconds (default 450: 8 minutes with start-up and report).
#
#   OUT=/path bash bench/gpu_cifar10.sh [ARCHIVE]      ARCHIVE: default shared/datasets/cifar10-train.tar.gz
#   SMOKE=1 OUT=/tmp/smoke bash bench/gpu_cifar10.sh tiny.tar.gz     the CPU smoke size (tests/test_gpu_cifar10.py)
#
# The rows are params/tables.yaml's table `cifar10-gpu` on params/cifar10-gpu.yaml, run by `cart tables` (the stages of
# dvc.yaml, several at a time; a rerun on the same ROOT resumes). Writes, as stages finish:
#   $OUT/results.json   `cart tables`' results file (params, metrics, wall time of every stage, per row)
#   $OUT/tables.md      its report: Inception FID (ceiling, untrained floor, what it was measured on), then FID_ref,
#                       beside FLOPs and wall time
#   $OUT/samples/       where the machine has no FID network: per row <row>.npz, the images its Inception metrics
#                       need (samples, untrained floor, reconstructions of as many val images), and the val images
#                       once (val-<hash>.npz); measure them where the network is: `cart tables --measure
#                       $OUT/results.json` (docs/cifar10.md)
#   $OUT/logs.tar.gz    each stage's log (one file: a lent machine returns at most 8); $OUT/run.txt the run's output
# No stage starts after DEADLINE seconds; at LIMIT the run is stopped (stages resume from their checkpoints on a
# rerun) and the report written from what finished.
#
# The GPU budget is params/cifar10-gpu.yaml (its machine settings too: 12 decoding workers, 10 000-image shards and
# decomposition batches), sized from the one H200 run's per-stage times (bench/RESULTS.md, 2026-11-29) and the
# networks' FLOPs, not yet measured on a GPU (docs/cifar10.md); change it with BUDGET="key=value …" (and the
# machine's with MACHINE="key=value …"), applied over the preset. The evaluate stage reports
# FID_ref, and the Inception FID of the samples against the val images where the FID network loads (its wheel
# installed); where it does not (a bare machine without the package index), the images come back under
# $OUT/samples for `cart tables --measure`. The smoke size turns the network off, so it packs the images too.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
ARCHIVE=${1:-${CIFAR10_ARCHIVE:-$REPO/shared/datasets/cifar10-train.tar.gz}}
OUT=${OUT:?set OUT to the folder the results go to}
ROOT=${ROOT:-/tmp/gpu-cifar10}
PY=${PYTHON:-python}
LIMIT=${LIMIT:-450}
DEADLINE=${DEADLINE:-$((LIMIT - 90))}
JOBS=${JOBS:-4}

# The machine and the budget: the preset's (above), unless MACHINE or BUDGET name other values.
DEFAULT_MACHINE=""
DEFAULT_BUDGET=""
if [[ -n "${SMOKE:-}" ]]; then
  # Every stage runs, at a size the 2-core CPU finishes in about a minute: it checks the plumbing, not the numbers
  # (the FID network at 299² would be most of it: tests/test_evaluate.py checks that path).
  # val: 10 % of the tiny archive, enough images for the evaluate stage's fidelity metrics.
  DEFAULT_MACHINE="data.workers=1 data.shard_size=64 data.resolution=16 data.val_fraction=0.1 \
decompose.outer_iterations=4 decompose.batch_size=64 tokens.batch_size=16 tokenizer.train.num_workers=0 \
transformer.train.num_workers=0 evaluate.feature_batch_size=32"
  DEFAULT_BUDGET="tokenizer.model.channels=8 tokenizer.model.channel_multipliers=[1,2] \
tokenizer.model.latent_channels=8 tokenizer.model.codebook_size=64 tokenizer.model.scales=[1,2,4,8] \
tokenizer.model.attention_levels=[] tokenizer.model.mid_attention=false tokenizer.train.steps=4 \
tokenizer.train.batch_size=8 tokenizer.train.eval_every=0 tokenizer.eval_images=8 tokenizer.train.checkpoint_every=2 \
tokenizer.rfid.every=0 transformer.model.depth=1 transformer.model.width=32 transformer.model.heads=2 \
transformer.train.steps=4 transformer.train.batch_size=8 transformer.train.eval_every=0 \
transformer.train.checkpoint_every=2 evaluator.model.channels=8 evaluator.model.stages=2 \
evaluator.model.feature_dim=16 evaluator.train.steps=4 evaluator.train.batch_size=8 \
evaluator.train.checkpoint_every=2 evaluator.train.num_workers=0 evaluate.samples_per_class=2 \
evaluate.figure_per_class=1 evaluate.inception=false"
  DEADLINE=${DEADLINE_SMOKE:-$DEADLINE}
fi
MACHINE=${MACHINE:-$DEFAULT_MACHINE}
BUDGET=${BUDGET:-$DEFAULT_BUDGET}

mkdir -p "$OUT" "$ROOT"
[[ -f "$ARCHIVE" ]] || { echo "CIFAR-10 archive $ARCHIVE: no such file" >&2; exit 2; }
set -f  # the settings are word lists on purpose, split on spaces but never globbed ([1,2] is a pattern)
# shellcheck disable=SC2206
settings=("data.archive=$ARCHIVE" $MACHINE $BUDGET)
set +f
set -- --table cifar10-gpu --root "$ROOT" --jobs "$JOBS" --deadline "$DEADLINE" --fail-fast --out "$OUT/results.json" \
  --images "$OUT/samples"
for setting in "${settings[@]}"; do set -- "$@" --set "$setting"; done
# `python -m stages` is `cart`, run from this checkout (a bare machine may not have it installed).
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
{ echo "gpu_cifar10.sh $(date -u +%FT%TZ) on $(hostname)"; "$PY" -c 'import torch; print("torch", torch.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA: CPU")'; echo "cart tables $*"; } \
  | tee "$OUT/run.txt"

# Its own process group, so that stopping it at LIMIT stops the stages it started too.
setsid "$PY" -m stages tables "$@" >>"$OUT/run.txt" 2>&1 &
runner=$!
(
  for ((second = 0; second < LIMIT; second++)); do
    sleep 1
    kill -0 "$runner" 2>/dev/null || exit 0
  done
  echo "stopped at LIMIT=$LIMIT s" >>"$OUT/run.txt"
  kill -TERM -- "-$runner" 2>/dev/null || true
) &
watchdog=$!
status=0
wait "$runner" || status=$?
wait "$watchdog" || true

logs=()
for log in "$ROOT"/*/log.txt; do [[ -f "$log" ]] && logs+=("${log#"$ROOT"/}"); done
if ((${#logs[@]})); then tar -czf "$OUT/logs.tar.gz" -C "$ROOT" "${logs[@]}"; fi
if [[ -f "$OUT/results.json" ]]; then
  "$PY" -m stages tables --report "$OUT/results.json" >"$OUT/tables.md"
  cat "$OUT/tables.md"
fi
unfinished=$("$PY" -c 'import json, sys
rows = json.load(open(sys.argv[1]))["rows"] if len(sys.argv) > 1 else {}
print(" ".join(n for n, r in rows.items() if not r["finished"]) or "")' ${OUT:+"$OUT/results.json"} 2>/dev/null \
  || echo "all (no results file)")
echo "cart tables exit status $status; unfinished rows: ${unfinished:-none}; results in $OUT" | tee -a "$OUT/run.txt"
[[ $status -eq 0 && -z "$unfinished" ]]
