#!/usr/bin/env bash
# One device call, after `source .gpu/p2/setup.sh` (issue 5, R-Sparse on this GPU): the
# low-rank term's one-token timings at each model sparsity of LOWRANK_SPARSITIES (default
# 0.4 0.5: R-Sparse's e2e levels, input sparsities 0.46 / 0.55 at share 0.9), merged into the
# dispatch table (lowrank_time.py --merge rebuilds ratios.threshold_lowrank from these files
# alone). The merged table goes to $OUT, to /root/cfg (kept for the next call of the same
# lease) and into the installed plugin, which is what bench_e2e reads. LOWRANK_ARGS: more
# lowrank_time.py arguments (--epilogues: the u^T term's ways on the committed layouts). A later call re-installs
# the tree's committed table with setup.sh: copy /root/cfg/dispatch.json back first, e.g.
#   source .gpu/p2/setup.sh && bash benchmarks/gpu/lowrank_measure.sh --install-only && python3 -P benchmarks/bench_e2e.py ...
set -u
export PYTHONUNBUFFERED=1
site_configs=$(python3 -P -c "import os, vllm_rsparse.kernels as k; print(os.path.join(os.path.dirname(k.__file__), 'configs'))") || exit 1
if [ "${1:-}" = "--install-only" ]; then
  cp /root/cfg/dispatch.json "$site_configs/dispatch.json" && echo "installed /root/cfg/dispatch.json" && exit 0
  echo "lowrank_measure.sh: /root/cfg/dispatch.json is missing (a fresh machine?)" >&2; exit 1
fi
gpu=$(python3 -P -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())") || exit 1
files=()
for s in ${LOWRANK_SPARSITIES:-0.4 0.5}; do
  f="$OUT/lowrank_${gpu}_s${s}.json"
  python3 -P benchmarks/gpu/lowrank_time.py ${LOWRANK_ARGS:-} --sparsity "$s" --out "$f" || exit 1
  files+=("$f")
done
python3 -P benchmarks/gpu/lowrank_time.py --merge "${files[@]}" --into kernels/configs/dispatch.json || exit 1
mkdir -p /root/cfg && cp kernels/configs/dispatch.json /root/cfg/dispatch.json
cp kernels/configs/dispatch.json "$OUT/dispatch.json" && cp kernels/configs/dispatch.json "$site_configs/dispatch.json"
python3 - <<'PY'
import json
t = json.load(open("kernels/configs/dispatch.json"))["ratios"]["threshold_lowrank"]
for key, levels in t.items():
    print(key, {level: r["1"] for level, r in levels.items()})
PY
