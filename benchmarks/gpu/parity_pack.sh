#!/usr/bin/env bash
# Pack the SmolLM2 parity inputs for the device (issue 5, item 5), here on the CPU machine:
#   bash benchmarks/gpu/parity_pack.sh CKPT_DENSE CKPT_TEAL PARITY_INPUTS_JSON GGUF
# The GPU gets the GGUF the checkpoints were exported from (94 MB, two parts) rather than the
# 257 MB bf16 model.safetensors (six parts: a device call carries at most 64 MiB), re-exports
# the dense checkpoint there with the same rsparse-calibrate command, and proves it holds the
# same weights (tensor digest, parity.py digest) before anything is compared.
#   .gpu/pg1: gguf part 0 + meta (configs, TEAL's rsparse tensors, tokenizer, inputs, digests)
#   .gpu/pg2: gguf part 1
# Device, one call per folder (they may ride along with other commands):
#   carry [".gpu/pg1"]  bash benchmarks/gpu/parity_recv.sh pg1
#   carry [".gpu/pg2"]  bash benchmarks/gpu/parity_recv.sh pg2
# then, with vLLM set up:  bash benchmarks/gpu/parity_run.sh
set -euo pipefail
dense=$1 teal=$2 inputs=$3 gguf=$4
rm -rf .gpu/pg1 .gpu/pg2 && mkdir -p .gpu/pg1/meta/dense .gpu/pg1/meta/teal .gpu/pg2
python3 benchmarks/parity.py digest "$dense/model.safetensors" > .gpu/pg1/meta/dense.digest
# the TEAL checkpoint must hold the dense export's weights: then one export serves both
python3 benchmarks/parity.py digest "$teal/model.safetensors" --expect "$(cat .gpu/pg1/meta/dense.digest)" >/dev/null
for f in "$dense"/*; do [ "$(basename "$f")" = model.safetensors ] || cp "$f" .gpu/pg1/meta/dense/; done
for f in "$teal"/*; do [ "$(basename "$f")" = model.safetensors ] || cp "$f" .gpu/pg1/meta/teal/; done
cp "$inputs" .gpu/pg1/meta/inputs.json
basename "$gguf" > .gpu/pg1/meta/gguf.name
sha256sum "$gguf" | cut -d' ' -f1 > .gpu/pg1/meta/gguf.sha256
split -b 50M -d -a 1 "$gguf" .gpu/pg1/gguf.part.
mv .gpu/pg1/gguf.part.1 .gpu/pg2/
du -sh .gpu/pg1 .gpu/pg2
