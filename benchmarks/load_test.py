"""Load test of vLLM's OpenAI-compatible server with an rsparse checkpoint.

Starts the server as a subprocess on 127.0.0.1 (nothing else is ever contacted), then:
  1. sends every request of the workload ALONE (one at a time): the reference answers;
  2. runs ``--rounds`` rounds of ``--clients`` concurrent clients, each sending
     ``--requests-per-client`` requests of mixed prompt and output lengths, temperature 0;
  3. compares every concurrent answer with the same request's answer alone, counts errors,
     samples the server's resident memory (process tree) after each round, and reports
     p50/p99 latency. Bounded in count and time (--deadline-s); it stops by itself.

    python benchmarks/load_test.py CKPT --batch-invariant --out benchmarks/results/load_cpu.json

RSS "flat": after --rss-warmup-rounds rounds, every per-round sample lies within
--rss-flat-pct of the first kept one (max - min, relative; the JSON holds every
sample, the growth, the range and the verdict).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing: the serving helper

def workload(n: int, seed: int) -> list[dict]:
    """n distinct requests: passages of held-out Wikipedia text of 4..150 words (never
    calibration text), 4..48 output tokens."""
    from vllm_rsparse.calibration import data

    words = data.heldout_text().split()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(4, 150)
        start = rng.randrange(0, len(words) - length)
        out.append({"id": i, "prompt": " ".join(words[start:start + length]), "max_tokens": rng.randint(4, 48)})
    return out


def complete(url: str, model: str, req: dict, timeout: float) -> tuple[str | None, float, str | None]:
    payload = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
               "seed": 0}
    start = time.perf_counter()
    try:
        r = urllib.request.Request(url + "/v1/completions", data=json.dumps(payload).encode(),
                                   headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(r, timeout=timeout) as resp:
            text = json.loads(resp.read())["choices"][0]["text"]
        return text, time.perf_counter() - start, None
    except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
        return None, time.perf_counter() - start, repr(e)


def find_tcmalloc() -> str:
    import glob

    for pattern in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
                    "/usr/lib64/libtcmalloc*.so*", "/usr/lib/libtcmalloc*.so*"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise SystemExit("--allocator tcmalloc: no libtcmalloc found (apt-get install libtcmalloc-minimal4)")


def rss_verdict(rss_rounds: list[float], warmup: int, flat_pct: float) -> dict:
    """Flat = after the warm-up rounds, every per-round sample lies within flat_pct of
    the first kept one (max - min over the kept rounds, relative): a drop counts against
    flatness as much as a rise. rss_rounds: one sample after each round."""
    kept = rss_rounds[warmup:]
    if len(kept) < 2:
        return {"rounds_checked": len(kept), "range_pct": None, "flat": None}
    range_pct = 100.0 * (max(kept) - min(kept)) / kept[0]
    return {"rounds_checked": len(kept), "first_mb": round(kept[0], 1), "last_mb": round(kept[-1], 1),
            "growth_pct": round(100.0 * (kept[-1] - kept[0]) / kept[0], 2), "range_pct": round(range_pct, 2),
            "limit_pct": flat_pct, "flat": range_pct < flat_pct}


def tree_rss_mb(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    procs = [proc] + proc.children(recursive=True)
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


def markdown(r: dict) -> str:
    return "\n".join([
        f"# Load test: {r['checkpoint']}",
        "",
        f"commit {r['commit']}, {r['machine']}, " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
        + f". Command: `{r['command']}`. Server env {r['server_env']}, args `{' '.join(r['server_args'])}`.",
        "",
        "| clients | requests | errors | mismatches vs alone | RSS start -> end (MB) | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
        f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['mismatches']} | {r['rss_start_mb']:.0f} -> "
        f"{r['rss_end_mb']:.0f} | {r['p50_ms']} | {r['p99_ms']} |",
        "",
        f"RSS at start, after the solo pass and after each round: {r['rss_per_round_mb']}",
        f"RSS flatness (after {r['rss_flat']['rounds_checked']} rounds past warm-up): {r['rss_flat']}",
        "",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-s", type=float, default=1500.0, help="stop sending after this long")
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--start-timeout-s", type=float, default=900.0, help="server start (slow on a busy machine)")
    p.add_argument("--max-sparse-tokens", default="all",
                   help="RSPARSE_MAX_SPARSE_TOKENS for the server ('all': every batch sparse, per-row masks)")
    p.add_argument("--dtype", default="bfloat16", help="model dtype on the server (float32 isolates rounding)")
    p.add_argument("--prefix-caching", action="store_true", help="leave vLLM's prefix caching on")
    p.add_argument("--batch-invariant", action="store_true",
                   help="serve with RSPARSE_BATCH_INVARIANT=1 (docs/batch-invariance.md)")
    p.add_argument("--allocator", choices=["glibc", "tcmalloc"], default="glibc",
                   help="tcmalloc: LD_PRELOAD libtcmalloc_minimal (vLLM-CPU's recommendation)")
    p.add_argument("--rss-warmup-rounds", type=int, default=3, help="rounds left out of the RSS flatness check")
    p.add_argument("--rss-flat-pct", type=float, default=1.0, help="max RSS growth after warm-up, in percent")
    p.add_argument("--out", default="benchmarks/results/load_cpu.json")
    args = p.parse_args()

    from vllm_rsparse.serving import VLLMServer

    requests = workload(args.clients * args.requests_per_client, args.seed)
    server_args = ["--enforce-eager", "--max-model-len", "1024", "--max-num-batched-tokens", "1024",
                   "--dtype", args.dtype, "--max-num-seqs", str(args.clients)]
    if not args.prefix_caching:
        # A cached prefix was computed in another batch: one more source of batch-dependent
        # rounding, and not what "the same request sent alone" means.
        server_args.append("--no-enable-prefix-caching")
    env = {"RSPARSE_MAX_SPARSE_TOKENS": args.max_sparse_tokens}
    if args.batch_invariant:
        env["RSPARSE_BATCH_INVARIANT"] = "1"
    if args.allocator == "tcmalloc":
        env["LD_PRELOAD"] = find_tcmalloc()
    log = Path(args.out).with_suffix(".server.log")
    started = time.time()
    with VLLMServer(args.checkpoint, extra_args=server_args, env=env, log_path=log,
                    start_timeout=args.start_timeout_s) as server:
        model = str(args.checkpoint)
        rss = [tree_rss_mb(server.pid)]
        alone = {}
        for req in requests:  # reference: each request alone
            text, _, err = complete(server.url, model, req, args.request_timeout_s)
            if err:
                raise RuntimeError(f"request {req['id']} failed alone: {err}")
            alone[req["id"]] = text
        rss.append(tree_rss_mb(server.pid))
        latencies, errors, mismatches, sent, rounds_done = [], [], [], 0, 0
        for round_index in range(args.rounds):
            if time.time() - started > args.deadline_s:
                break
            order = list(requests)
            random.Random(args.seed + round_index + 1).shuffle(order)
            with ThreadPoolExecutor(max_workers=args.clients) as pool:
                results = list(pool.map(lambda r: (r, *complete(server.url, model, r, args.request_timeout_s)),
                                        order))
            for req, text, latency, err in results:
                sent += 1
                if err:
                    errors.append({"id": req["id"], "error": err})
                    continue
                latencies.append(latency)
                if text != alone[req["id"]]:
                    mismatches.append({"round": round_index, "id": req["id"], "alone": alone[req["id"]],
                                       "concurrent": text})
            rss.append(tree_rss_mb(server.pid))
            rounds_done += 1
            print(f"round {round_index}: {len(results)} requests, errors {len(errors)}, "
                  f"mismatches {len(mismatches)}, rss {rss[-1]:.0f} MB", flush=True)
        pid = server.pid
    lat = sorted(latencies)
    import torch
    import vllm

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "command": "python benchmarks/load_test.py " + " ".join(sys.argv[1:]),
        "checkpoint": str(args.checkpoint),
        "server_env": env,
        "server_args": server_args,
        "clients": args.clients,
        "requests": sent,
        "rounds": rounds_done,
        "errors": len(errors),
        "mismatches": len(mismatches),
        "mismatch_examples": mismatches[:5],
        "error_examples": errors[:5],
        "rss_start_mb": round(rss[1], 1),
        "rss_end_mb": round(rss[-1], 1),
        "rss_per_round_mb": [round(x, 1) for x in rss],
        "rss_flat": rss_verdict(rss[2:], args.rss_warmup_rounds, args.rss_flat_pct),
        "allocator": args.allocator,
        "p50_ms": round(1e3 * statistics.median(lat), 1) if lat else None,
        "p99_ms": round(1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
        "wall_s": round(time.time() - started, 1),
        "server_pid": pid,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    Path(args.out).with_suffix(".md").write_text(markdown(result))
    print(json.dumps({k: v for k, v in result.items() if "examples" not in k}, indent=1))


if __name__ == "__main__":
    main()
