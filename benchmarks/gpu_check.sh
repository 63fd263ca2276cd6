#!/usr/bin/env bash
# One short run on a GPU machine, at most ~6 minutes on an H200 (BUDGET_S, default 330 s, after install):
# results land under $OUT as they are measured, the rows that matter first, so a run cut short keeps them:
#   1. every method at N = 16k tokens (2 pairs x 2 x 4096), uniform logits: the time and memory targets (docs/design.md §4)
#   2. the GPU tests (real compilation, exactness at a real head, the memory bounds of docs/design.md §3 by the caching allocator)
#   3. the T sweep (N = 4k, 64k, 128k... as GPU_PAIRS gives), 4. peaked logits, 5. ragged lengths padded vs
#   packed, 6. the block-size autotuner
# Without a GPU it is a dry run of the same steps at tiny shapes:   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh
# What the machine lacks (liger-kernel, cut-cross-entropy, trl's fused head, pybind11 for the compiled epilogues,
# rich for the tables) travels as wheels in .whl/ (WHL_DIR), fetched beforehand with
# benchmarks/fetch_peer_wheels.sh (the GPU machine has no network). A wheel that is missing or does not install
# only costs the rows that need it. The package itself installs without pybind11 (setup.py then skips the
# compiled epilogues); .ci/gpu_like_dryrun.sh runs this script in CI in a venv holding only what the GPU
# machine has. Dry-run knobs: BUDGET_S (seconds for all steps), STEP_SCALE (multiplies each step's limit).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
WHL_DIR=${WHL_DIR:-.whl}
SITE=$(mktemp -d)/site  # not under $OUT: everything there is carried back
WANT_PY='
import importlib.metadata as md, os, sys
for path in sys.argv[1:]:
    name = os.path.basename(path).split("-")[0]
    try:  # never shadow a package the machine has (its torch / transformers stack) with a fetched one
        print(f"peer wheel not needed, {name} {md.version(name)} is installed", file=sys.stderr)
    except md.PackageNotFoundError:
        print(path)
'
if ls "$WHL_DIR"/*.whl >/dev/null 2>&1; then
  mapfile -t WANT < <(python3 -c "$WANT_PY" "$WHL_DIR"/*.whl 2>>"$OUT/peers.log")
  PIPT=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
  if [ "${#WANT[@]}" -gt 0 ] && ! "${PIPT[@]}" "${WANT[@]}" >>"$OUT/peers.log" 2>&1; then
    for whl in "${WANT[@]}"; do  # one by one, so that one bad wheel costs only itself
      "${PIPT[@]}" "$whl" >>"$OUT/peers.log" 2>&1 || echo "warning: peer wheel not installed: $whl (see peers.log)"
    done
  fi
  [ -d "$SITE" ] && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
else
  echo "warning: no wheels in $WHL_DIR (benchmarks/fetch_peer_wheels.sh): peer rows skipped; without pybind11 the" \
       "compiled epilogues are not built"
fi
# Compile the CUDA epilogue for this card only (one nvcc pass instead of two); no GPU: setup.py's default.
if [ -z "${ALPHADPO_CUDA_ARCHS:-}" ] && CAP=$(python3 -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null); then
  export ALPHADPO_CUDA_ARCHS=$CAP
fi
python3 -m pip install -v --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { tail -n 80 "$OUT/install.log"; echo "install failed: python3 -m pip install --no-deps --no-build-isolation -e ."; exit 1; }
grep -o "warning: optional extension.*" "$OUT/install.log" | sort -u
{ nvidia-smi || true; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
  python3 -c "import alphadpo_kernels as a; print('alphadpo_kernels backends', a.backends())" || true
  python3 -c "
import importlib.util
for mod in ('pybind11', 'rich', 'liger_kernel', 'cut_cross_entropy', 'trl.kernels.chunked_logprob'):
    try:
        found = importlib.util.find_spec(mod) is not None
    except ImportError:
        found = False
    print(f'{mod}:', 'yes' if found else 'MISSING')
" || true
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

START=$(date +%s)
BUDGET_S=${BUDGET_S:-330}
STEP_SCALE=${STEP_SCALE:-1}
RC=0
step() {  # step NAME TIMEOUT_S CMD...: run with the smaller of its timeout and the time left; log under $OUT
  local name=$1 limit=$(($2 * STEP_SCALE)) left
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
