#!/usr/bin/env bash
# The GPU figures in one command, for a bare machine with one H100 or H200 (about 8 minutes at most):
#
#   OUT=/some/dir bash bench/gpu.sh            # CUDA; every output under $OUT, a summary on stdout
#   OUT=/some/dir bash bench/gpu.sh --smoke    # the same steps on the CPU at toy sizes (about a minute)
#
# Steps, each under its own time limit so that one stuck step cannot eat the others' time:
#   1. the CUDA tests (pytest -m cuda on the test files that have any);
#   2. bench/decompose.py: the AT decomposition at 256², order 3, batch 256, images/s (torch.compile'd CG);
#   3. bench/transformer.py --config d16-256: VAR-d16's training step at 256 px (10 maps; order 0, then CART's
#      order-3 layout), bf16 autocast, torch.compile, the largest batch (≤ 256, halving) whose eager step fits,
#      as MFU against 989 TFLOP/s; then guided sampling (cfg 1.5, top-k 900, top-p 0.96) images/s at batch 64.
# Without $OUT it writes to a new folder under /tmp. The machine's python3 must hold torch; the project's other
# imports (pydantic, safetensors, PyYAML, …) are checked first, and wheels in ./.whl are installed when present.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; elif [ -n "${1:-}" ]; then echo "usage: bench/gpu.sh [--smoke]" >&2; exit 2; fi
OUT=${OUT:-$(mktemp -d /tmp/gpu-bench.XXXXXX)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! $PY -c "import pipeline.models.transformer, pipeline.data.decompose, pipeline.training.train, yaml, pytest" \
    > "$OUT/preflight.txt" 2>&1; then
    echo "bench/gpu.sh: the project does not import with $PY (see $OUT/preflight.txt):" >&2
    tail -1 "$OUT/preflight.txt" >&2
    echo "install them first (make install), or carry them as wheels in ./.whl on a machine without the package index" >&2
    exit 2
fi

if [ "$SMOKE" = 1 ]; then
    DEVICE=cpu
    DECOMPOSE=(--device cpu --sizes 32 --order 3 --batch-sizes 2 --repeats 1 --scipy-images 0)
    TRANSFORMER=(--config d16-256 --device cpu --depth 1 --batch 2 --sample-batch 2 --steps 1 --warmup 0)
    LIMITS=(120 60 120)
else
    DEVICE=cuda
    DECOMPOSE=(--device cuda --compile --sizes 256 --order 3 --batch-sizes 256 --repeats 3 --scipy-images 0)
    TRANSFORMER=(--config d16-256 --device cuda --compile --fit-batch --batch 256 --steps 10 --warmup 3 --budget 60)
    LIMITS=(90 80 300)
fi
echo "bench/gpu.sh: device $DEVICE, outputs in $OUT, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null)"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" \
    | tee "$OUT/machine.txt"

status=0
run() {  # run NAME LIMIT COMMAND...: output in $OUT/NAME.txt, the exit code in the summary
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s$([ $rc = 124 ] && echo " (stopped at its $limit s limit)")" \
        >> "$OUT/steps.txt"
    [ $rc = 0 ] || status=1
}
: > "$OUT/steps.txt"
mapfile -t CUDA_TESTS < <(grep -l "mark.cuda" tests/test_*.py)
run tests "${LIMITS[0]}" $PY -m pytest -q -m cuda -p no:cacheprovider "${CUDA_TESTS[@]}"
run decompose "${LIMITS[1]}" $PY bench/decompose.py "${DECOMPOSE[@]}"
run transformer "${LIMITS[2]}" $PY bench/transformer.py "${TRANSFORMER[@]}"

echo
echo "## Summary ($DEVICE$([ "$SMOKE" = 1 ] && echo ', smoke sizes: not figures'))"
cat "$OUT/steps.txt"
echo "tests: $(tail -1 "$OUT/tests.txt")"
grep '^| decompose' "$OUT/decompose.txt" | cut -d'|' -f2,3
grep -E '^\| (config|d16)' "$OUT/transformer.txt" | cut -d'|' -f2-10,13
exit $status
