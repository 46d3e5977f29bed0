#!/usr/bin/env bash
# CPU machine, once per checkout: pack vLLM 0.26 for the GPU machine in parts that fit a device call.
# A call carries the working tree plus its carry paths in at most 64 MiB. The shared packer
# (../shared/gpu/pack-vllm-gpu.sh) makes .gpu/p1 of 58 MiB and .gpu/p2 of 56 MiB (the archive's last
# 8 MiB + the wheels), and this tree's tracked files take about 11 MiB, so neither fits beside it.
# This script splits the archive's first part in two (.gpu/p1a, .gpu/p1b, each with its own stash
# script) and moves the archive's last part from p2 into p1b, so p2 holds setup.sh and the wheels.
# setup.sh joins /root/stash/vllm.part.* in name order (aa, aab, ab), then p2's parts (none now:
# its glob stays unmatched and cat says so on stderr; the joined stream is whole). The first piece
# keeps the name vllm.part.aa: setup.sh takes a missing /root/stash/vllm.part.aa for a fresh machine
# and stops (session 23 lost a call to pieces named aa-aa / aa-ab).
#
#   bash benchmarks/gpu/pack_gpu.sh
# Then, on a fresh GPU machine, three calls back to back (the machine goes back ~30 s after a call):
#   1) carry [".gpu/p1a"]:  bash .gpu/p1a/stash.sh
#   2) carry [".gpu/p1b"]:  bash .gpu/p1b/stash.sh
#   3) carry [".gpu/p2"]:   source .gpu/p2/setup.sh >/dev/null 2>&1; <command>
# (benchmarks/gpu/README.md: the whole lease, with detached_steps.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PACKER="${RSPARSE_GPU_PACKER:-../shared/gpu/pack-vllm-gpu.sh}"
[ -f "$PACKER" ] || { echo "pack_gpu.sh: $PACKER not found (set RSPARSE_GPU_PACKER)" >&2; exit 1; }
bash "$PACKER"
[ -f .gpu/p1/vllm.part.aa ] || { echo "pack_gpu.sh: the packer made no .gpu/p1/vllm.part.aa" >&2; exit 1; }
rm -rf .gpu/p1a .gpu/p1b && mkdir -p .gpu/p1a .gpu/p1b
# the stash folder holds pieces whose names sort in the archive's order: aa, then aab, aac..., then
# p2's ab (a name sorts before any longer name it starts, and aa? before ab)
split -b 29M -a 1 .gpu/p1/vllm.part.aa .gpu/p1a/vllm.part.aa
mv .gpu/p1a/vllm.part.aaa .gpu/p1a/vllm.part.aa
mv .gpu/p1a/vllm.part.aa[b-z] .gpu/p1b/
mv .gpu/p2/vllm.part.* .gpu/p1b/
. benchmarks/gpu/carry_lib.sh
tree=$(tracked_tree_bytes)
for part in p1a p1b p2; do
  size=$(( $(du -sb ".gpu/$part" | cut -f1) + tree ))
  [ "$size" -le "$CALL_CARRY_LIMIT_BYTES" ] ||
    echo "pack_gpu.sh: WARNING: .gpu/$part + the tracked tree = $(( size >> 20 )) MiB, over a call's 64 MiB" >&2
done
for part in p1a p1b; do
  cat > ".gpu/$part/stash.sh" <<EOF
#!/usr/bin/env bash
# GPU machine: keep these pieces of the vLLM archive outside the work tree (setup.sh joins /root/stash/vllm.part.*
# in name order).
set -e
mkdir -p /root/stash && cp .gpu/$part/vllm.part.* /root/stash/ && ls -la /root/stash
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
EOF
done
rm -rf .gpu/p1
du -sh .gpu/p1a .gpu/p1b .gpu/p2
echo "ready: calls with .gpu/p1a, .gpu/p1b (stash.sh each), then .gpu/p2 (source .gpu/p2/setup.sh)"
