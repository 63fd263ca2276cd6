#!/usr/bin/env bash
# CI: benchmarks/gpu_check.sh end to end (its no-GPU dry run at tiny shapes) in a fresh venv that holds only what
# the GPU machine has: torch, triton, transformers, accelerate, pytest; no pybind11, so no
# build isolation either. Proves that the GPU machine's one short call cannot be lost at `pip install`, and that
# every step of the script runs. Exits non-zero if the install or any step fails.
#   bash .ci/gpu_like_dryrun.sh          # ~2-4 min; GPU_DRYRUN_OUT=DIR keeps the script's $OUT there
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
T0=$(date +%s)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
OUT=${GPU_DRYRUN_OUT:-$(mktemp -d)}
VENV=$WORK/venv
python3 -m venv "$VENV"  # no system site packages

# Each at the version this machine already has, so the install comes from local disk / pip's cache.
pin() {
  local v
  if v=$(python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null); then
    echo "$1==$v"
  else
    echo "$1"
  fi
}
# torch 2.13.0: the CPU build on this machine's disk (an open range would pull a CUDA build). setuptools: the GPU
# machine has a current one (torch's wheels require it on Python >= 3.12, and its pip ran this setup.py), while a
# Python 3.11 venv comes with setuptools 65, which cannot build an editable wheel without the `wheel` package.
"$VENV/bin/python" -m pip install -q torch==2.13.0 "$(pin triton)" "$(pin transformers)" "$(pin accelerate)" \
  "$(pin pytest)" "$(pin setuptools)" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
"$VENV/bin/python" -c "import torch, triton, transformers, accelerate, pytest" \
  || { echo "gpu-like dry run: venv install failed"; exit 1; }
if "$VENV/bin/python" -c "import pybind11" 2>/dev/null; then
  echo "gpu-like dry run: pybind11 is importable in the venv; it must not be (the GPU machine has none)"; exit 1
fi
T1=$(date +%s)
echo "gpu-like dry run: venv ready in $((T1 - T0)) s (pybind11 absent, as on the GPU machine)"

# The peer wheels, as fetch_peer_wheels.sh fetches them for the GPU machine but for this Python, less pybind11:
# the install must work without it, and gpu_check.sh must go on when a wheel is missing. No network: no peers.
PYV=$("$VENV/bin/python" -c "import sys; print('%d.%d' % sys.version_info[:2])")
if ! PY=$PYV DEST="$WORK/whl" bash benchmarks/fetch_peer_wheels.sh >"$WORK/fetch.log" 2>&1; then
  echo "gpu-like dry run: warning: peer wheels not fetched (tail of the log below); going on without them"
  tail -n 5 "$WORK/fetch.log"
fi
rm -f "$WORK"/whl/pybind11-*.whl

# What CI exports for its own install (.ci/run) is not set on the GPU machine: without pybind11,
# ALPHADPO_REQUIRE_EXTENSIONS=1 would (rightly) fail the install.
rc=0
env -u ALPHADPO_REQUIRE_EXTENSIONS -u ALPHADPO_BUILD_CUDA -u PYTHONPATH -u VIRTUAL_ENV PATH="$VENV/bin:$PATH" \
  OUT="$OUT" WHL_DIR="$WORK/whl" BUDGET_S="${BUDGET_S:-900}" STEP_SCALE="${STEP_SCALE:-4}" \
  bash benchmarks/gpu_check.sh || rc=$?
T2=$(date +%s)
fail() { echo "gpu-like dry run FAILED: $*"; FAILED=1; }
FAILED=0
[ "$rc" -eq 0 ] || fail "benchmarks/gpu_check.sh exited $rc (install or a step failed; logs in $OUT)"
grep -q "warning: optional extension alphadpo_kernels._C not built (pybind11 is not installed" "$OUT/install.log" \
  || fail "the install did not skip the compiled epilogue with setup.py's pybind11 warning ($OUT/install.log)"
grep -q "skipped: out of time" "$OUT/steps.log" 2>/dev/null && fail "steps skipped for lack of time ($OUT/steps.log)"
[ -s "$OUT/steps.log" ] || fail "no step ran"
echo "gpu-like dry run: venv $((T1 - T0)) s, gpu_check.sh $((T2 - T1)) s, total $((T2 - T0)) s; results in $OUT"
[ "$FAILED" -eq 0 ] && echo "gpu-like dry run: OK"
exit "$FAILED"
