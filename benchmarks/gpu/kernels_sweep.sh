#!/usr/bin/env bash
# One device call (no vLLM needed): install the package, smoke-test the compact kernel
# on the GPU, CUDA-graph config sweep of both one-row kernels. Results under $OUT.
# Usage on the device machine:  RSPARSE_COMMIT=<sha> bash benchmarks/gpu/kernels_sweep.sh
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
kernels=walk,compact
# an illegal address in an untested kernel would kill the sweep's CUDA context: the
# compact kernel enters the sweep only if its GPU smoke test passes
if ! timeout 120 python3 -P -m pytest -q -p no:cacheprovider tests/test_kernels.py \
    -k "compact_chunks or (test_threshold and N4096-K11008 and bf16)" >"$OUT/smoke.log" 2>&1; then
  kernels=walk
  echo "compact smoke FAILED: sweeping walk only"; tail -20 "$OUT/smoke.log"
fi
tail -2 "$OUT/smoke.log"
timeout "${SWEEP_TIMEOUT:-360}" python3 benchmarks/bench_kernels.py --out "$OUT" --graph-sweep --kernels "$kernels"
echo "sweep rc=$?"
