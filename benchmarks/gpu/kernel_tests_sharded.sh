#!/usr/bin/env bash
# Device side, one line of a steps file: the GPU set of tests/test_kernels.py in SHARDS pytest processes side
# by side. The set is bound by Triton compiles on the CPU, and the GPU machine has 16 cores: one process took
# more than 900 s in session 23, four took 4.3 min in session 27 (steps_h200_session27c.txt).
#   RES (required): where the logs go; NAME (kernel_tests_$GPU_TAG, else _h200): $RES/$NAME.log, all shards with a header;
#   SHARDS (4); LIMIT (480 s a shard); KEYWORDS: a pytest -k expression (all tests without it).
#   RSPARSE_COMMIT: named in the log's header (the device copy has no .git).
# Test ids go to pytest through a file, not the command line: parametrized ids hold spaces and quotes.
set -u
: "${RES:?set RES to the results folder}"
NAME=${NAME:-kernel_tests_${GPU_TAG:-h200}}
SHARDS=${SHARDS:-4}
LIMIT=${LIMIT:-480}
python3 -P -m pytest -q -p no:cacheprovider --collect-only -k "${KEYWORDS:-}" tests/test_kernels.py 2>/dev/null \
  | grep "::" > "$RES/$NAME.ids"
# an empty shard would be pytest.main([]): every test under the working directory
[ -s "$RES/$NAME.ids" ] || { echo "kernel_tests_sharded.sh: no tests collected" >&2; exit 1; }
# round robin: neighbouring ids (one test function's cases) spread over the shards
split -n "r/$SHARDS" -d -a 2 "$RES/$NAME.ids" "$RES/$NAME.shard"
for shard in "$RES/$NAME".shard[0-9][0-9]; do
  timeout "$LIMIT" python3 -P -c "import sys, pytest
sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-rf'] + open(sys.argv[1]).read().splitlines()))" \
    "$shard" > "$shard.log" 2>&1 &
done
wait
{ echo "# tests/test_kernels.py at commit ${RSPARSE_COMMIT:-?}: $(wc -l < "$RES/$NAME.ids") test ids in $SHARDS shards" \
       "run side by side (benchmarks/gpu/kernel_tests_sharded.sh${KEYWORDS:+, -k \"$KEYWORDS\"})"
  for shard in "$RES/$NAME".shard[0-9][0-9]; do
    echo; echo "## ${shard##*.} ($(wc -l < "$shard") ids)"; cat "$shard.log"
  done; } > "$RES/$NAME.log"
rm -f "$RES/$NAME".shard[0-9][0-9] "$RES/$NAME".shard[0-9][0-9].log
grep -E "^## |passed|failed|error" "$RES/$NAME.log"
