#!/usr/bin/env bash
# Fetch the peers that bench_loss.py compares against, as wheels in .whl/ (ignored by git), for a GPU machine
# with no network (run here, then let the device call carry .whl). Versions are the ones SPEC §3 measured; TRL
# is the first release line with its fused LM head (trl.kernels.chunked_logprob). No torch: the GPU machine
# has its own CUDA build. Target: Python 3.12, x86_64 (what the GPU machine had, ../shared/GPU.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
common=(--dest .whl --no-deps --only-binary=:all: --python-version "$PY" --platform manylinux2014_x86_64
        --platform manylinux_2_28_x86_64 --platform any)
python3 -m pip download "${common[@]}" liger-kernel==0.8.5 cut-cross-entropy==25.1.1 "trl>=1.15,<2"
# what `import trl.kernels.chunked_logprob` pulls in beyond transformers / accelerate (already on the machine);
# the rest of TRL (datasets, pandas, pyarrow: 70 MB) is not needed and would not fit a device call's 64 MiB carry
python3 -m pip download "${common[@]}" dill
ls -la .whl
