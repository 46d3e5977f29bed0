#!/usr/bin/env bash
# Device side (issue 3): zero-shot accuracy on the FULL validation sets plus held-out perplexity,
# through vLLM, strict protocol, SmolLM2-135M at sparsity 0.4, one row per method in
# $OUT/results.jsonl (eval_quality.py's row format; run label gpu-full-validation, limit 0,
# machine/versions/commit per row; each row is appended and fsync'ed when its method is done,
# so a time limit keeps the finished ones). Calibration as the committed CPU rows
# (--num-samples 8 --seq-len 512, perplexity 4 x 512 held-out tokens), on the GPU (falls back to
# the CPU per method if that fails; the row's calibration.device says which).
#
# Needs (in this order, back to back: the machine goes back ~30 s after a run):
#   bash .gpu/p1/stash.sh; bash benchmarks/gpu/quality_recv.sh q1; ... quality_recv.sh q2
#   source .gpu/p2/setup.sh && bash benchmarks/gpu/quality_run.sh
# Settings (environment): METHODS (comma list, most important first; default below), PARALLEL
# (methods at once, default 5: the model is tiny, one H200 holds 5 vLLM instances and 16 cores
# their host work), LIMIT (0 = full sets), CALIB_DEVICE (cuda), EVAL_ARGS (rsparse-eval engine
# options), QUALITY_ROOT (/root/quality).
#
# Size of the work per checkpoint (counted with the SmolLM2 tokenizer): 49,853 scoring prompts,
# 3.49 M tokens (HellaSwag 40,168 prompts / 3.19 M tokens; ARC-E 2,281 / 72 k; ARC-C 1,194 / 44 k;
# PIQA 3,676 / 133 k; WinoGrande 2,534 / 57 k) + 4 x 512 perplexity tokens. With 16,384 tokens a
# step that is ~215 eager vLLM steps; strict protocol: every linear layer of every step runs the
# masked fp32 reference path (2 x 106 M MACs a token: ~7.4e14 FLOP a checkpoint, ~20 s of fp32 at
# ~40 TFLOP/s, plus the masks; LaRoSA's exact top-k adds torch.topk on every layer).
# Estimate on one H200, all 5 at once: ~60 s start (imports, GGUF load) + calibration 20-60 s
# (greedy allocations the longest) + vLLM start ~40 s + scoring ~40-90 s per sparse checkpoint
# (the 4 sparse ones share the GPU: ~2-3 min together; dense ~15 s) + achieved sparsity ~15 s
# => ~4-6 min wall for all five (GPU-bound scoring is shared, so with PARALLEL=5 the sparse rows
# land close together near the end; dense first). To favour the first METHODS under a tight
# limit, PARALLEL=3 (dense, teal, larosa-threshold-greedy first; larosa, rsparse as slots free).
# Dry run on the 2-core CPU machine (CPU vLLM, LIMIT=4, METHODS=dense,rsparse PARALLEL=2,
# CALIB_DEVICE=cuda falling back to cpu): dense row after 122 s, rsparse after 161 s.
set -uo pipefail  # no -e: one method's failure must not stop the others
Q=${QUALITY_ROOT:-/root/quality}
REPO=$(pwd)
: "${OUT:?set OUT to the folder the results go to}"
METHODS=${METHODS:-dense,teal,larosa-threshold-greedy,larosa,rsparse}
PARALLEL=${PARALLEL:-5}
LIMIT=${LIMIT:-0}
CALIB_DEVICE=${CALIB_DEVICE:-cuda}
EVAL_ARGS=${EVAL_ARGS:---max-num-batched-tokens 16384 --max-num-seqs 512 --gpu-memory-utilization 0.1 --kv-cache-gib 4}
# PYTHONSAFEPATH: no python (children included) imports the source tree's vllm_rsparse (it lacks
# the calibration subpackage, which only the installed copy maps), whatever the cwd.
export RSPARSE_CACHE=$Q/cache PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
       VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-3} TOKENIZERS_PARALLELISM=false
if git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
  RSPARSE_COMMIT=$(git -C "$REPO" rev-parse HEAD)
else
  RSPARSE_COMMIT="$(cat "$Q/meta/commit" 2>/dev/null || echo unknown)-packed"  # the tree has no .git
fi
export RSPARSE_COMMIT
log="$OUT/run.txt"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$log"; }

# inputs: GGUF where assets.smollm2_gguf() looks, the task folders where tasks.task_dir() looks
gguf="$RSPARSE_CACHE/$(cat "$Q/meta/gguf.path")"
if [ ! -f "$gguf" ]; then
  mkdir -p "$(dirname "$gguf")" && cat "$Q"/gguf.part.* > "$gguf.partial" && mv "$gguf.partial" "$gguf"
fi
echo "$(cat "$Q/meta/gguf.sha256")  $gguf" | sha256sum -c - | tee -a "$log" || exit 1
if [ ! -f "$RSPARSE_CACHE/olmo_tasks/.unpacked" ]; then
  tar xJf "$RSPARSE_CACHE/olmo_tasks.tar.xz" -C "$RSPARSE_CACHE" && touch "$RSPARSE_CACHE/olmo_tasks/.unpacked" || exit 1
fi
python3 - <<'PY' 2>&1 | tee -a "$log"
from vllm_rsparse.evaluation import tasks
from vllm_rsparse.calibration import data
print("tasks:", {t: len(tasks.load_task(t)) for t in tasks.TASKS}, "rows via", type(tasks.load_rows(tasks.task_dir("piqa"))).__name__)
print("articles:", len(data.wiki_articles()), "calibration chars", len(data.calibration_text()), "held-out chars", len(data.heldout_text()))
PY
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader 2>/dev/null | tee -a "$log"
stamp "inputs ready; methods $METHODS, $PARALLEL at once, limit $LIMIT, calibration on $CALIB_DEVICE, eval args: $EVAL_ARGS"

mkdir -p "$Q/work"
run_one() {
  local m=$1 s
  s=$(date +%s)
  (cd "$Q/work" && python3 "$REPO/benchmarks/eval_quality.py" run --model smollm2 --methods "$m" --sparsities 0.4 \
      --limit "$LIMIT" --ppl-windows 4 --ppl-seq-len 512 --num-samples 8 --seq-len 512 \
      --workdir "$Q/work/$m" --results "$OUT/results.jsonl" --calib-device "$CALIB_DEVICE" \
      --eval-args "$EVAL_ARGS" --run-label gpu-full-validation) > "$OUT/log_$m.txt" 2>&1
  stamp "$m: rc $? after $(( $(date +%s) - s )) s: $(tail -n 1 "$OUT/log_$m.txt")"
}
( while sleep 20; do
    stamp "gpu: $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"
  done ) &
monitor=$!
for m in ${METHODS//,/ }; do
  while [ "$(jobs -rp | wc -l)" -gt "$PARALLEL" ]; do wait -n; done  # the monitor is one job
  run_one "$m" &
done
while [ "$(jobs -rp | wc -l)" -gt 1 ]; do wait -n; done
kill "$monitor" 2>/dev/null
stamp "done: $(wc -l < "$OUT/results.jsonl" 2>/dev/null || echo 0) rows in results.jsonl"
