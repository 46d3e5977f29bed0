#!/usr/bin/env bash
# Device side (issue 3): zero-shot accuracy on the FULL validation sets plus held-out perplexity,
# through vLLM, strict protocol, at sparsity 0.4, one row per method (eval_quality.py's row
# format; run label gpu-full-validation, limit 0, machine/versions/commit per row; each row is
# appended and fsync'ed when its method is done, so a time limit keeps the finished ones).
# Calibration as the committed CPU rows (--num-samples 8 --seq-len 512), on the GPU (falls back
# to the CPU per method if that fails; the row's calibration.device says which).
#   MODEL=smollm2 (default; as run in session 4): rows in $OUT/results.jsonl, perplexity 4 x 512.
#   MODEL=qwen: rows kept on the machine in $QUALITY_ROOT/results_qwen.jsonl and copied to
#     $OUT/results.jsonl by every call; perplexity 2 x 512 (the committed Qwen CPU rows' setting,
#     so the dense ppl checks against 25.37); the run is DETACHED (setsid) so it outlives a call:
#     each call (the same command) starts it if it is not running and not finished, waits up to
#     WAIT_S, copies run.txt / log_<method>.txt / results.jsonl to $OUT and returns; the next call
#     (back to back: the machine goes back ~30 s after a call) waits on. A job that died is
#     restarted and skips the methods whose row is already in the results file (a calibrated
#     checkpoint in $QUALITY_ROOT/work is reused). Call sequence + time estimate:
#     benchmarks/gpu/README-quality.md.
#
# SmolLM2 needs (in this order, back to back: the machine goes back ~30 s after a run):
#   bash .gpu/p1a/stash.sh; bash .gpu/p1b/stash.sh; bash benchmarks/gpu/quality_recv.sh q1; ... quality_recv.sh q2
#   source .gpu/p2/setup.sh && bash benchmarks/gpu/quality_run.sh
# Settings (environment): MODEL, METHODS (comma list, most important first; defaults below),
# PARALLEL (methods at once, default 5: one H200 holds 5 vLLM instances, 16 cores their host
# work), LIMIT (0 = full sets), CALIB_DEVICE (cuda), EVAL_ARGS (rsparse-eval engine options),
# QUALITY_ROOT (/root/quality), PPL_WINDOWS, NUM_SAMPLES / CALIB_SEQ_LEN (8 / 512: keep them
# for real rows; smaller only for dry runs), DETACH (qwen 1, smollm2 0), WAIT_S (540),
# RESULTS (the rows file).
#
# Size of the work per checkpoint (counted with the SmolLM2 tokenizer): 49,853 scoring prompts,
# 3.49 M tokens (HellaSwag 40,168 prompts / 3.19 M tokens; ARC-E 2,281 / 72 k; ARC-C 1,194 / 44 k;
# PIQA 3,676 / 133 k; WinoGrande 2,534 / 57 k) + 4 x 512 perplexity tokens. With 16,384 tokens a
# step that is ~215 eager vLLM steps; strict protocol: every linear layer of every step runs the
# masked fp32 reference path (2 x 106 M MACs a token: ~7.4e14 FLOP a checkpoint, ~20 s of fp32 at
# ~40 TFLOP/s, plus the masks; LaRoSA's exact top-k adds torch.topk on every layer).
# SmolLM2 measured on one H200 (session 4, PARALLEL=3): per method 240-293 s wall = calibration
# 56-82 s (GGUF load ~50 s of it) + rsparse-eval 153-190 s (GPU mostly idle: host-bound) +
# achieved sparsity ~25 s; dense, teal, larosa-threshold-greedy at 247-300 s, larosa and rsparse
# at 509/538 s (second wave).
# Qwen2.5-Coder-0.5B estimate (README-quality.md for the basis): per method ~2 min calibration
# (GGUF load 2.1x SmolLM2's, measured on the CPU machine), eval ~3.5-5 min (host work as
# SmolLM2's, plus 3.4x the fp32 linear FLOP: ~2.5e15 a sparse checkpoint, ~60 s of fp32 GEMM
# each, GPU-bound once 4 share the GPU), achieved sparsity ~1 min; all 5 at once: ~9-12 min,
# so over one 10-minute call: hence DETACH.
# Qwen call sequence (fresh machine, back to back; after `MODEL=qwen bash benchmarks/gpu/quality_pack.sh`
# here, which makes .gpu/qw1 .. .gpu/qw8, 59.25 MiB each):
#   1  carry [".gpu/p1a"]  bash .gpu/p1a/stash.sh, then [".gpu/p1b"] bash .gpu/p1b/stash.sh (pack_gpu.sh)
#   2  carry [".gpu/p2"]   source .gpu/p2/setup.sh
#   3-9 carry [".gpu/qwK"] bash benchmarks/gpu/quality_recv.sh qwK            (K = 1..7, qw1 first)
#   10 carry [".gpu/qw8"]  bash benchmarks/gpu/quality_recv.sh qw8 && MODEL=qwen bash benchmarks/gpu/quality_run.sh
#   11 carry []            MODEL=qwen bash benchmarks/gpu/quality_run.sh      (again while it says CALL AGAIN NOW)
#   timeout_s 600 for 10 and 11; then results.jsonl -> benchmarks/results/quality_gpu_full_qwen.jsonl here.
set -uo pipefail  # no -e: one method's failure must not stop the others
MODEL=${MODEL:-smollm2}
Q=${QUALITY_ROOT:-/root/quality}
REPO=${QUALITY_REPO:-$(pwd)}
: "${OUT:?set OUT to the folder the results go to}"
case "$MODEL" in
  smollm2) meta=gguf parts=gguf commit_meta=commit work=work; def_methods=dense,teal,larosa-threshold-greedy,larosa,rsparse
           def_ppl=4 def_detach=0 def_results="$OUT/results.jsonl" ;;
  # qwen: dense first (every paired delta needs it), then LaRoSA (the best method on Qwen at
  # every sparsity on the CPU), the best combination, R-Sparse, TEAL
  qwen) meta=qwen.gguf parts=qwen commit_meta=qwen.commit work=work/qwen; def_methods=dense,larosa,larosa-threshold-greedy,rsparse,teal
        def_ppl=2 def_detach=1 def_results="$Q/results_qwen.jsonl" ;;
  *) echo "quality_run.sh: MODEL is smollm2 or qwen, not $MODEL" >&2; exit 2 ;;
esac
METHODS=${METHODS:-$def_methods}
PARALLEL=${PARALLEL:-5}
LIMIT=${LIMIT:-0}
CALIB_DEVICE=${CALIB_DEVICE:-cuda}
PPL_WINDOWS=${PPL_WINDOWS:-$def_ppl}
NUM_SAMPLES=${NUM_SAMPLES:-8}
CALIB_SEQ_LEN=${CALIB_SEQ_LEN:-512}
DETACH=${DETACH:-$def_detach}
WAIT_S=${WAIT_S:-540}
RESULTS=${RESULTS:-$def_results}
EVAL_ARGS=${EVAL_ARGS---max-num-batched-tokens 16384 --max-num-seqs 512 --gpu-memory-utilization 0.1 --kv-cache-gib 4}
. "$(dirname "${BASH_SOURCE[0]}")/detached_lib.sh"  # job_alive / job_heartbeat: a call cannot see an earlier call's pids
if [ -n "${QUALITY_JOB:-}" ]; then
  # the detached job: heartbeat first (before the slow imports below); disowned, since the
  # method loop counts this shell's jobs
  job_heartbeat "$Q/job" $$ & disown
fi

# a later call than the one that sourced .gpu/p2/setup.sh: vLLM and this project are in /tmp/site
if ! python3 -c "import vllm" 2>/dev/null && [ -f /tmp/site/vllm/__init__.py ]; then
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH VLLM_USE_FLASHINFER_SAMPLER=0
fi

has_row() {  # a row of this model and method at this limit is in $RESULTS
  [ -f "$RESULTS" ] && python3 - "$RESULTS" "$MODEL" "$1" "$LIMIT" <<'PY'
import json, sys
path, model, method, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
rows = [json.loads(l) for l in open(path) if l.strip()]
sys.exit(0 if any(r["model"] == model and r["method"] == method and r.get("limit") == limit for r in rows) else 1)
PY
}
if [ "$DETACH" = 1 ] && [ -z "${QUALITY_JOB:-}" ]; then
  # --- the calling side: start the job unless it runs or is done, wait, copy its files to $OUT
  jobout="$Q/out_$MODEL" && mkdir -p "$jobout" "$Q/job"
  copy_out() {
    cp "$jobout"/run.txt "$jobout"/log_*.txt "$OUT"/ 2>/dev/null
    [ -f "$RESULTS" ] && cp "$RESULTS" "$OUT/results.jsonl"
  }
  rows() { [ -f "$RESULTS" ] && grep -c . "$RESULTS" || echo 0; }
  n_methods=$(echo "$METHODS" | tr ',' '\n' | grep -c .)
  todo=$(for m in ${METHODS//,/ }; do has_row "$m" || printf '%s ' "$m"; done)
  if job_alive "$Q/job"; then
    echo "quality_run.sh: the $MODEL job (pid $(cat "$Q/job/pid" 2>/dev/null)) is running; $(rows) rows so far"
  elif [ -z "$todo" ]; then
    echo "quality_run.sh: every method of $METHODS has its row in $RESULTS: nothing to start"
  else
    cp "$REPO/benchmarks/gpu/quality_run.sh" "$REPO/benchmarks/gpu/detached_lib.sh" "$Q/job/"  # a re-synced tree cannot change them
    QUALITY_JOB=1 QUALITY_REPO="$REPO" OUT="$jobout" MODEL="$MODEL" METHODS="$METHODS" PARALLEL="$PARALLEL" \
      LIMIT="$LIMIT" CALIB_DEVICE="$CALIB_DEVICE" PPL_WINDOWS="$PPL_WINDOWS" NUM_SAMPLES="$NUM_SAMPLES" \
      CALIB_SEQ_LEN="$CALIB_SEQ_LEN" RESULTS="$RESULTS" EVAL_ARGS="$EVAL_ARGS" QUALITY_ROOT="$Q" \
      setsid bash "$Q/job/quality_run.sh" > "$Q/job/job.txt" 2>&1 < /dev/null &
    echo $! > "$Q/job/pid"
    echo "quality_run.sh: started the $MODEL job (pid $!) for ${todo}($(rows) rows already in $RESULTS)"
    job_started "$Q/job" || echo "quality_run.sh: no heartbeat from the job yet; see $Q/job/job.txt"
  fi
  start=$(date +%s)
  while job_alive "$Q/job" && [ $(( $(date +%s) - start )) -lt "$WAIT_S" ]; do
    sleep 10; copy_out
  done
  copy_out
  tail -n 25 "$jobout/run.txt" 2>/dev/null
  if job_alive "$Q/job"; then
    echo "quality_run.sh: still running after ${WAIT_S} s of this call, $(rows) rows: CALL AGAIN NOW (same command)"
  else
    tail -n 5 "$Q/job/job.txt" 2>/dev/null
    echo "quality_run.sh: the job is not running; $(rows) of $n_methods rows in $RESULTS (copied to \$OUT/results.jsonl)"
  fi
  exit 0
fi

# --- the run itself (in the foreground, or the detached job)
# PYTHONSAFEPATH: no python (children included) imports the source tree's vllm_rsparse (it lacks
# the calibration subpackage, which only the installed copy maps), whatever the cwd.
export RSPARSE_CACHE=$Q/cache PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
       VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-3} TOKENIZERS_PARALLELISM=false
if [ -n "${RSPARSE_COMMIT:-}" ]; then
  :  # given by the caller
elif [ -f "$Q/meta/$commit_meta" ]; then
  # the device machine's copy of the tree carries a stale .git (session 4 recorded ca2655a for
  # code at 10a9e9e): HEAD (+ -dirty) of the tree that packed the inputs names the code
  RSPARSE_COMMIT="$(cat "$Q/meta/$commit_meta")-packed"
elif git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
  RSPARSE_COMMIT=$(git -C "$REPO" rev-parse HEAD)
else
  RSPARSE_COMMIT=unknown
fi
export RSPARSE_COMMIT
mkdir -p "$OUT"
log="$OUT/run.txt"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$log"; }

# inputs: GGUF where assets.<model>_gguf() looks, the task folders where tasks.task_dir() looks
gguf="$RSPARSE_CACHE/$(cat "$Q/meta/$meta.path")" || exit 1
if [ ! -f "$gguf" ]; then
  if [ -f "$Q/meta/$parts.parts.sha256" ]; then
    missing=$(cd "$Q" && while read -r _ f; do [ -f "$f" ] || printf '%s ' "$f"; done < "meta/$parts.parts.sha256")
    [ -z "$missing" ] || { stamp "missing parts: $missing(send their .gpu folders with quality_recv.sh)"; exit 1; }
  fi
  mkdir -p "$(dirname "$gguf")" && cat "$Q"/"$parts".part.* > "$gguf.partial" && mv "$gguf.partial" "$gguf"
fi
echo "$(cat "$Q/meta/$meta.sha256")  $gguf" | sha256sum -c - | tee -a "$log" || exit 1
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
stamp "inputs ready; $MODEL, methods $METHODS, $PARALLEL at once, limit $LIMIT, ppl $PPL_WINDOWS x 512," \
      "calibration $NUM_SAMPLES x $CALIB_SEQ_LEN on $CALIB_DEVICE, eval args: $EVAL_ARGS, rows to $RESULTS, commit $RSPARSE_COMMIT"

mkdir -p "$Q/$work"
run_one() {
  local m=$1 s rc
  s=$(date +%s)
  (cd "$Q/$work" && python3 "$REPO/benchmarks/eval_quality.py" run --model "$MODEL" --methods "$m" --sparsities 0.4 \
      --limit "$LIMIT" --ppl-windows "$PPL_WINDOWS" --ppl-seq-len 512 --num-samples "$NUM_SAMPLES" \
      --seq-len "$CALIB_SEQ_LEN" --workdir "$Q/$work/$m" --results "$RESULTS" \
      --calib-device "$CALIB_DEVICE" --eval-args "$EVAL_ARGS" --run-label gpu-full-validation) \
      > "$OUT/log_$m.txt" 2>&1
  rc=$?
  [ "$RESULTS" = "$OUT/results.jsonl" ] || cp "$RESULTS" "$OUT/results.jsonl" 2>/dev/null
  stamp "$m: rc $rc after $(( $(date +%s) - s )) s: $(tail -n 1 "$OUT/log_$m.txt")"
}
( while sleep 20; do
    stamp "gpu: $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"
  done ) &
monitor=$!
for m in ${METHODS//,/ }; do
  if has_row "$m"; then stamp "$m: row already in $RESULTS, skipped"; continue; fi
  while [ "$(jobs -rp | wc -l)" -gt "$PARALLEL" ]; do wait -n; done  # the monitor is one job
  run_one "$m" &
done
while [ "$(jobs -rp | wc -l)" -gt 1 ]; do wait -n; done
kill "$monitor" 2>/dev/null
[ "$RESULTS" = "$OUT/results.jsonl" ] || [ ! -f "$RESULTS" ] || cp "$RESULTS" "$OUT/results.jsonl"
stamp "done: $(grep -c . "$RESULTS" 2>/dev/null || echo 0) rows in $RESULTS"
