#!/usr/bin/env bash
# Device side: run a list of GPU steps as ONE detached job (setsid: it outlives a device call), so
# a lease's device time goes to work, not to call boundaries, and no step is cut by the 10-minute
# limit of a call. Each call with the same STEPS file (back to back: the machine goes back ~30 s
# after a call) starts the job unless it runs or has finished, waits up to WAIT_S, and copies what
# the job has written so far to $OUT as one job.tar.gz (+ the step log's tail on stdout).
#   STEPS: a file of shell lines, one step each, run in order from the repo copy made by the call
#          that started the job, with $RES = the results folder (everything under it comes back);
#          a failing step is logged and the next one runs; $GPU_TAG = h100 / h200, the card's kind.
#   JOB_ROOT (/root/job), WAIT_S (540).
# "Running" is read from the job's heartbeat file (detached_lib.sh), not from its pid: a device
# call cannot see an earlier call's processes.
# Example (after `source .gpu/p2/setup.sh` in the same or an earlier call of the lease):
#   RSPARSE_COMMIT=<sha> STEPS=benchmarks/gpu/steps_h200_session5.txt bash benchmarks/gpu/detached_steps.sh
set -uo pipefail
: "${OUT:?set OUT}" "${STEPS:?set STEPS to a steps file}"
J=${JOB_ROOT:-/root/job}
WAIT_S=${WAIT_S:-540}
mkdir -p "$J/res"
. "$(dirname "${BASH_SOURCE[0]}")/detached_lib.sh"
if job_alive "$J"; then
  echo "detached_steps.sh: job $(cat "$J/pid" 2>/dev/null) running (heartbeat $(cat "$J/heartbeat"))"
elif [ -f "$J/done" ]; then
  echo "detached_steps.sh: job finished earlier"
else
  # the job runs from its own copy of the tree: the next call re-syncs the working copy
  # (not the carried/ignored bulk: the steps need the sources, and setup.sh has run)
  rm -rf "$J/tree" && mkdir -p "$J/tree" && cp "$STEPS" "$J/steps.txt" &&
    tar -cf - --exclude=./.git --exclude=./.gpu --exclude=./.venv --exclude=./.cache --exclude=./out . | tar -xf - -C "$J/tree"
  cp "$(dirname "${BASH_SOURCE[0]}")/detached_lib.sh" "$J/detached_lib.sh"
  export PYTHONPATH=${PYTHONPATH:-/tmp/site} PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
  # steps name their result files by the card that ran them (h100 / h200): a lease gets whichever comes
  GPU_TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -oiE 'h100|h200' | tr 'A-Z' 'a-z')
  export GPU_TAG=${GPU_TAG:-gpu}
  # the whole subshell is redirected (not only setsid): a shell holding the call's stdout until
  # the job ends would keep the call (and any pipe reading it) waiting for the job
  ( cd "$J/tree" && RES="$J/res" exec setsid bash -c '
      . '"$J"'/detached_lib.sh; job_heartbeat '"$J"' $$ &
      i=0
      while IFS= read -r step || [ -n "$step" ]; do
        case "$step" in ""|\#*) continue ;; esac
        i=$((i + 1)); t0=$(date +%s)
        echo "== step $i start $(date -u +%T): $step" >> "$RES/steps.log"
        bash -c "$step" > "$RES/step$i.log" 2>&1
        echo "== step $i rc=$? after $(( $(date +%s) - t0 )) s" >> "$RES/steps.log"
      done < '"$J"'/steps.txt
      touch '"$J"'/done' ) > "$J/job.txt" 2>&1 < /dev/null &
  echo $! > "$J/pid"
  echo "detached_steps.sh: started job $(cat "$J/pid") with $(grep -cv '^\s*\(#\|$\)' "$STEPS") steps"
  job_started "$J" || echo "detached_steps.sh: no heartbeat from the job yet; see $J/job.txt"
fi
start=$(date +%s)
while job_alive "$J" && [ $(( $(date +%s) - start )) -lt "$WAIT_S" ]; do sleep 1; done
tar czf "$OUT/job.tar.gz" -C "$J" res
cat "$J/res/steps.log" 2>/dev/null
last=$(ls -t "$J"/res/step*.log 2>/dev/null | head -1); [ -n "$last" ] && { echo "-- tail of $last"; tail -n 15 "$last"; }
if job_alive "$J"; then echo "detached_steps.sh: STILL RUNNING: CALL AGAIN NOW"; else echo "detached_steps.sh: job done"; fi
