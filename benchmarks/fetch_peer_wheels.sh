#!/usr/bin/env bash
# Fetch, as wheels in .whl/ (ignored by git), what benchmarks/gpu_check.sh needs on an offline GPU machine beyond
# a minimal stack (Python 3.12, torch with CUDA, triton, transformers, accelerate, pytest; no network, no
# pybind11). Run it where the network is, then copy .whl along with the checkout. All are pure-Python wheels
# (py3-none-any, ~4 MB in all). No torch: the GPU machine has its own CUDA build. gpu_check.sh installs only the wheels whose distribution the machine lacks, and goes on without
# any that is missing here (the rows or builds that need it are skipped).
#   PY=3.12 DEST=.whl bash benchmarks/fetch_peer_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
DEST=${DEST:-.whl}
common=(--dest "$DEST" --no-deps --only-binary=:all: --python-version "$PY" --platform manylinux2014_x86_64
        --platform manylinux_2_28_x86_64 --platform any)
# The peers bench_loss.py compares against. Versions are the ones our recorded comparisons used; TRL is the first release
# line with its fused LM head (trl.kernels.chunked_logprob).
python3 -m pip download "${common[@]}" liger-kernel==0.8.5 cut-cross-entropy==25.1.1 "trl>=1.15,<2"
# What `import trl.kernels.chunked_logprob` pulls in beyond transformers / accelerate (already on the machine);
# the rest of TRL (datasets, pandas, pyarrow: 70 MB) is not needed (bench_loss.py treats trl.trainer.utils as
# optional) and would not fit the carry.
python3 -m pip download "${common[@]}" dill
# pybind11: lets `pip install --no-build-isolation -e .` compile the optional epilogues there (the `cublas`
# backend and its GPU tests need alphadpo_kernels._C_cuda); without it the install still succeeds, without them.
python3 -m pip download "${common[@]}" "pybind11>=2.10"
# rich (and its pure-Python dependencies): bench_loss.py prints its tables with it. transformers >= 5 brings it
# through typer; gpu_check.sh skips these wheels where the machine has them. matplotlib is not needed:
# gpu_check.sh passes no --plot. tqdm comes with transformers.
python3 -m pip download "${common[@]}" rich markdown-it-py mdurl pygments
ls -la "$DEST"
