"""benchmarks/gpu/detached_steps.sh + detached_lib.sh: a detached device job is recognised as
running by a later call that cannot see its processes (each device call runs in its own process
namespace; session 5 lost a job's results to a restart because `kill -0 <pid>` said "gone").
The second call runs in a new PID namespace where `unshare` allows it, as on the device."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu" / "detached_steps.sh"


def call(job: Path, out: Path, steps: Path, wait_s: int, own_namespace: bool) -> str:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OUT=str(out), JOB_ROOT=str(job), STEPS=str(steps), WAIT_S=str(wait_s),
               RSPARSE_COMMIT="abc123", HEARTBEAT_EVERY_S="1", HEARTBEAT_STALE_S="5")
    cmd = ["bash", str(SCRIPT)]
    if own_namespace:
        cmd = ["unshare", "--pid", "--fork", "--mount-proc"] + cmd
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode == 0


def test_a_later_call_waits_on_the_running_job_instead_of_restarting_it(tmp_path):
    steps = tmp_path / "steps.txt"
    steps.write_text("# comment lines and blank lines are skipped\n\n"
                     "echo first > $RES/first.txt; sleep 6\n"
                     "false\n"
                     "echo second $RSPARSE_COMMIT > $RES/second.txt\n")
    job = tmp_path / "job"
    first = call(job, tmp_path / "out1", steps, wait_s=1, own_namespace=False)
    assert "started job" in first and "CALL AGAIN NOW" in first
    second = call(job, tmp_path / "out2", steps, wait_s=30, own_namespace=namespaces_work())
    assert "running" in second and "started job" not in second
    assert "job done" in second
    log = (job / "res" / "steps.log").read_text()
    assert log.count("== step 1 start") == 1, log  # not restarted
    assert "== step 2 rc=1" in log, log  # a failing step is logged, the next one runs
    assert (job / "res" / "second.txt").read_text().strip() == "second abc123"
    assert (tmp_path / "out2" / "job.tar.gz").is_file()
    third = call(job, tmp_path / "out3", steps, wait_s=1, own_namespace=False)
    assert "finished earlier" in third
