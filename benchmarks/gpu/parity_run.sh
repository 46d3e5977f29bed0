#!/usr/bin/env bash
# Device side, after every part arrived and `source .gpu/p2/setup.sh`: rebuild the two
# checkpoints, run benchmarks/parity.py on both, results under $OUT.
set -euo pipefail
cd /root/parity
cat model.part.* > model.safetensors
echo "$(cat model.sha256)  model.safetensors" | sha256sum -c -
for c in dense teal; do ln -sf /root/parity/model.safetensors "$c/model.safetensors"; done
cd - >/dev/null
export VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONUNBUFFERED=1
python3 -m pip install -q --upgrade --no-deps --no-build-isolation --target /tmp/rs .
export PYTHONPATH=/tmp/rs:${PYTHONPATH:-}
for c in dense teal; do
  python3 benchmarks/parity.py run /root/parity/$c --inputs /root/parity/inputs.json --out "$OUT/gpu_$c.json"
done
