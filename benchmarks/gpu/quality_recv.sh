#!/usr/bin/env bash
# Device side: keep one carried folder of the quality inputs (.gpu/q1, .gpu/q2 for SmolLM2;
# .gpu/qw1 .. .gpu/qwN for Qwen) on the machine (QUALITY_ROOT, default /root/quality), for
# benchmarks/gpu/quality_run.sh. Where the folder set has a parts list (meta/qwen.parts.sha256,
# in qw1: send it first), every part that has arrived so far is sha256-checked against it and
# the missing ones are named.
set -euo pipefail
Q=${QUALITY_ROOT:-/root/quality}
mkdir -p "$Q"
cp -r .gpu/"$1"/. "$Q"/
ls -laR "$Q" | grep -v '^total' | head -30
for list in "$Q"/meta/*.parts.sha256; do
  [ -f "$list" ] || continue
  (cd "$Q" && sha256sum -c --ignore-missing "$list") || { echo "quality_recv.sh: a part is corrupt" >&2; exit 1; }
  missing=$(cd "$Q" && while read -r _ f; do [ -f "$f" ] || printf '%s ' "$f"; done < "$list")
  echo "$(basename "$list"): missing ${missing:-none}"
done
