#!/usr/bin/env bash
# Device side, after both parts arrived and `source .gpu/p2/setup.sh` (vLLM + this project in
# /tmp/site): rebuild the GGUF, re-export the dense checkpoint with rsparse-calibrate, check
# its tensors against the CPU checkpoint's digest, give the TEAL checkpoint the same weights,
# then benchmarks/parity.py run on both; results under $OUT.
set -euo pipefail
P=/root/parity
gguf="$P/$(cat $P/meta/gguf.name)"
cat "$P"/gguf.part.* > "$gguf"
echo "$(cat $P/meta/gguf.sha256)  $gguf" | sha256sum -c -
rm -rf "$P/dense" "$P/teal"
python3 -P -m vllm_rsparse.calibration.cli "$gguf" -o "$P/dense" --method dense 2>&1 | tail -3
python3 -P benchmarks/parity.py digest "$P/dense/model.safetensors" --expect "$(cat $P/meta/dense.digest)"
# the CPU checkpoints' own config, tokenizer and rsparse files; the weights from this export
cp "$P/dense/model.safetensors" "$P/model.safetensors"
for c in dense teal; do
  rm -rf "$P/$c" && mkdir -p "$P/$c" && cp -r "$P/meta/$c/." "$P/$c/"
  ln -sf "$P/model.safetensors" "$P/$c/model.safetensors"
done
export VLLM_ENABLE_V1_MULTIPROCESSING=0 PYTHONUNBUFFERED=1
for c in dense teal; do
  python3 -P benchmarks/parity.py run "$P/$c" --inputs "$P/meta/inputs.json" --out "$OUT/gpu_$c.json"
done
