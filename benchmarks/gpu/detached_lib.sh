# Sourced by the detached device jobs (quality_run.sh, detached_steps.sh).
# A device call runs in its own process namespace: a later call cannot see an earlier call's
# processes, so `kill -0 <pid>` says "gone" while the job runs on (session 5: detached_steps.sh
# restarted a running job that way, and the two copies overwrote each other's files). A job
# therefore proves it is alive by rewriting a heartbeat file, and callers read that file.
HEARTBEAT_EVERY_S=${HEARTBEAT_EVERY_S:-5}
HEARTBEAT_STALE_S=${HEARTBEAT_STALE_S:-30}

# job_heartbeat DIR PID: run in the background of job PID; rewrites DIR/heartbeat (epoch seconds)
# while PID lives (an orphaned loop would otherwise keep a dead job "alive"), then removes it
job_heartbeat() {
  while kill -0 "$2" 2>/dev/null; do
    date +%s > "$1/heartbeat.tmp" && mv -f "$1/heartbeat.tmp" "$1/heartbeat"
    sleep "$HEARTBEAT_EVERY_S"
  done
  rm -f "$1/heartbeat"
}

# job_alive DIR: the job's heartbeat is fresh
job_alive() {
  local beat
  beat=$(cat "$1/heartbeat" 2>/dev/null) || return 1
  [ -n "$beat" ] && [ $(( $(date +%s) - beat )) -lt "$HEARTBEAT_STALE_S" ]
}

# job_started DIR: wait (up to HEARTBEAT_STALE_S) for a job just started to write its first heartbeat
job_started() {
  local i
  for i in $(seq "$HEARTBEAT_STALE_S"); do job_alive "$1" && return 0; sleep 1; done
  return 1
}
