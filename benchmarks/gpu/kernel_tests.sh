#!/usr/bin/env bash
# (python3 -P: the repo root must not shadow the installed package, whose kernels/ lives
# at vllm_rsparse.kernels only once installed)
# One device call: the full GPU set of tests/test_kernels.py, log under $OUT.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site
{ echo "# H100 run of tests/test_kernels.py at commit ${RSPARSE_COMMIT:-?} (full GPU set)"
  timeout "${TEST_TIMEOUT:-420}" python3 -P -m pytest -q -p no:cacheprovider -rf tests/test_kernels.py 2>&1; } \
  | tee "$OUT/kernel_tests_h100.log" | grep -v "^\.\+\|^s\+" | tail -40
