#!/usr/bin/env bash
# One device call (no vLLM needed): install the package, run the full GPU set of
# tests/test_kernels.py (log: $OUT/kernel_tests_h100.log), then the CUDA-graph config
# sweep of both one-row kernels (results under $OUT).
# Usage on the device machine:  RSPARSE_COMMIT=<sha> bash benchmarks/gpu/kernels_sweep.sh
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
kernels=walk,compact
# the full test set first: a sweep of kernels that give wrong results would be worthless
{ echo "# $(nvidia-smi --query-gpu=name --format=csv,noheader) run of tests/test_kernels.py at commit ${RSPARSE_COMMIT:-?} (full GPU set)"
  timeout "${TEST_TIMEOUT:-300}" python3 -P -m pytest -q -p no:cacheprovider -rf tests/test_kernels.py 2>&1; } \
  >"$OUT/kernel_tests_h100.log"
tail -3 "$OUT/kernel_tests_h100.log"
# an illegal address in a broken kernel would kill the sweep's CUDA context: the
# compact kernel enters the sweep only if its tests passed
if grep -q "^FAILED.*compact" "$OUT/kernel_tests_h100.log"; then
  kernels=walk
  echo "compact tests FAILED: sweeping walk only"; grep "^FAILED" "$OUT/kernel_tests_h100.log" | head -20
fi
timeout "${SWEEP_TIMEOUT:-400}" python3 benchmarks/bench_kernels.py --out "$OUT" --graph-sweep --kernels "$kernels"
echo "sweep rc=$?"
# keep the new tables on the machine for a following call of the same lease (e2e with them)
mkdir -p /root/cfg && cp "$OUT"/sparse_gemv.json "$OUT"/dispatch.json /root/cfg/ 2>/dev/null; ls /root/cfg
