#!/usr/bin/env bash
# One device call on the GPU machine: install, run the GPU-marked tests and the benchmark at the real shapes,
# leave logs, JSON and the plot under $OUT. Without a GPU it is a dry run at tiny shapes (same steps):
#     OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh
# Peer packages (liger-kernel, cut-cross-entropy) travel as wheels in .whl/ (see ../shared/GPU.md).
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
if python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  BENCH_ARGS=()                                   # the Llama-3-8B head, T = 1k..32k, both regimes, every method
else
  echo "no GPU: dry run at tiny shapes"
  BENCH_ARGS=(--T 16 32 --H 32 --V 128 --repeats 1 --warmup 0)
fi
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest tests -m gpu -q -ra 2>&1 | tee "$OUT/tests.log"
# Block sizes measured on this card (cached in $OUT/tuning.json and used by the benchmark below).
export ALPHADPO_TUNING_CACHE="$OUT/tuning.json"
timeout "${TUNE_TIMEOUT:-150}" python3 benchmarks/autotune.py 2>&1 | tee "$OUT/autotune.log"
tests_rc=${PIPESTATUS[0]}
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench_loss.py "${BENCH_ARGS[@]}" --no-progress \
  --json "$OUT/bench.json" --plot "$OUT/bench.png" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$tests_rc bench rc=$bench_rc; results in $OUT"
# pytest exits 5 when every test is deselected or skipped (the dry run): not a failure here.
[ "$tests_rc" -eq 0 ] || [ "$tests_rc" -eq 5 ] && [ "$bench_rc" -eq 0 ]
