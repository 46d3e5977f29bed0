#!/usr/bin/env bash
# Device side: keep one carried folder of the quality inputs (.gpu/q1 or .gpu/q2) on the machine
# (QUALITY_ROOT, default /root/quality), for benchmarks/gpu/quality_run.sh.
set -euo pipefail
Q=${QUALITY_ROOT:-/root/quality}
mkdir -p "$Q"
cp -r .gpu/"$1"/. "$Q"/
ls -laR "$Q" | grep -v '^total' | head -30
