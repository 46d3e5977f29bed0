#!/usr/bin/env bash
# Pack the SmolLM2 parity inputs for the device (issue 5, item 5), here on the CPU machine:
#   bash benchmarks/gpu/parity_pack.sh CKPT_DENSE CKPT_TEAL PARITY_INPUTS_JSON
# -> .gpu/parity/meta (configs, rsparse tensors, tokenizer, inputs: small) and
#    .gpu/parity/w1..wN (the shared model.safetensors in <= 50 MB parts: a device call carries
#    at most 64 MiB). Dense and TEAL checkpoints of one export share their weights bit for bit
#    (checked below), so the weights travel once.
# On the device, one call per part (carry [".gpu/parity/wK"]):  bash benchmarks/gpu/parity_recv.sh wK
# then with vLLM set up:  bash benchmarks/gpu/parity_run.sh
set -euo pipefail
dense=$1 teal=$2 inputs=$3
out=.gpu/parity
rm -rf "$out" && mkdir -p "$out/meta/dense" "$out/meta/teal"
python3 - "$dense" "$teal" <<'PY'
import sys
import torch
from safetensors import safe_open
a, b = (safe_open(p + "/model.safetensors", "pt") for p in sys.argv[1:3])
assert set(a.keys()) == set(b.keys()) and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys()), \
    "dense and teal checkpoints do not share their weights: ship both"
PY
for f in "$dense"/*; do [ "$(basename "$f")" = model.safetensors ] || cp "$f" "$out/meta/dense/"; done
for f in "$teal"/*; do [ "$(basename "$f")" = model.safetensors ] || cp "$f" "$out/meta/teal/"; done
cp "$inputs" "$out/meta/inputs.json"
sha256sum "$dense/model.safetensors" | cut -d' ' -f1 > "$out/meta/model.sha256"
split -b 50M -d -a 1 "$dense/model.safetensors" "$out/model.part."
i=1
for part in "$out"/model.part.*; do mkdir -p "$out/w$i"; mv "$part" "$out/w$i/"; i=$((i + 1)); done
du -sh "$out"/*
