#!/usr/bin/env bash
# One device call on the GPU machine, at most ~6 minutes on an H200 (BUDGET_S, default 330 s, after install):
# results land under $OUT as they are measured, the rows that matter first, so a run cut short keeps them:
#   1. every method at N = 16k tokens (2 pairs x 2 x 4096), uniform logits: the SPEC §4 time and memory targets
#   2. the GPU tests (real compilation, exactness at a real head, SPEC §4 memory bounds by the caching allocator)
#   3. the T sweep (N = 4k, 64k, 128k... as GPU_PAIRS gives), 4. peaked logits, 5. ragged lengths padded vs
#   packed, 6. the block-size autotuner
# Without a GPU it is a dry run of the same steps at tiny shapes:   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh
# Peers (liger-kernel, cut-cross-entropy, trl and its pure-Python dependencies) travel as wheels in .whl/,
# fetched beforehand with benchmarks/fetch_peer_wheels.sh (the GPU machine has no network).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
{ nvidia-smi || true; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"; } >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

START=$(date +%s)
BUDGET_S=${BUDGET_S:-330}
RC=0
step() {  # step NAME TIMEOUT_S CMD...: run with the smaller of its timeout and the time left; log under $OUT
  local name=$1 limit=$2 left
  shift 2
  left=$((BUDGET_S - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then echo "== $name skipped: out of time" | tee -a "$OUT/steps.log"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)" | tee -a "$OUT/steps.log"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name rc=$rc at $(($(date +%s) - START))s" | tee -a "$OUT/steps.log"
  # pytest exits 5 when everything is deselected or skipped (the dry run): not a failure
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then RC=1; fi
}

BENCH=(python3 benchmarks/bench_loss.py --no-progress --jsonl "$OUT/bench.jsonl")
if python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  step bench-16k 110 "${BENCH[@]}" --T 4096 --regimes uniform --methods fused fused-lean cublas naive trl cce liger
  step tests 100 python3 -m pytest tests/test_gpu.py tests/test_extension.py -m gpu -q -ra -x
  step bench-sweep 100 "${BENCH[@]}" --T 16384 32768 1024 --regimes uniform \
    --methods fused fused-lean cublas naive trl cce liger
  step bench-peaked 45 "${BENCH[@]}" --T 4096 --regimes peaked --methods fused fused-filter liger naive
  step bench-ragged 30 "${BENCH[@]}" --T 4096 16384 --regimes ragged --methods fused fused-packed
  export ALPHADPO_TUNING_CACHE="$OUT/tuning.json"  # measured block sizes, for the next session to adopt
  step autotune 60 python3 benchmarks/autotune.py --repeats 3
else
  echo "no GPU: dry run at tiny shapes"
  TINY=(--H 32 --V 128 --repeats 1 --warmup 0)
  step bench-16k 60 "${BENCH[@]}" "${TINY[@]}" --T 16 --regimes uniform --methods fused fused-lean cublas naive trl
  step tests 60 python3 -m pytest tests/test_gpu.py -m gpu -q -ra
  step bench-sweep 60 "${BENCH[@]}" "${TINY[@]}" --T 8 32 --regimes uniform --methods fused naive
  step bench-peaked 60 "${BENCH[@]}" "${TINY[@]}" --T 16 --regimes peaked --methods fused fused-filter naive
  step bench-ragged 60 "${BENCH[@]}" "${TINY[@]}" --T 16 --regimes ragged --methods fused-torch fused-torch-packed
  step autotune 30 python3 benchmarks/autotune.py
fi
[ -f "$OUT/bench.jsonl" ] && python3 benchmarks/render_results.py "$OUT/bench.jsonl" >"$OUT/summary.md" 2>&1
[ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
echo "results in $OUT (rc=$RC, $(($(date +%s) - START))s)"
exit $RC
