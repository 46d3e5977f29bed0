"""Held-out perplexity of one checkpoint through vLLM in eager mode and in vLLM's default compiled
mode (torch.compile: the mode `vllm serve` runs in), per window, paired -- and the same for copies
whose thresholds are scaled by a hair (e.g. 1.0001), which measures how far rounding-size changes of
the mask move perplexity at all.

Why: the committed quality rows are eager; a server compiles. Compiled kernels round the activations
differently in the last bits (Inductor keeps fused intermediates in float32), a threshold mask turns
that into a few other channels, and a sparse decoder amplifies those. The question is whether the
compiled mode is a different model or the same one seen through rounding noise.

    python benchmarks/compiled_vs_eager.py out/demo/smollm2-teal-0.5 --windows 16 \
        --threshold-scales 1.0 1.0001 -o benchmarks/results/compiled_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

MODES = ("eager", "compiled")


def scaled_copy(checkpoint: str, scale: float, root: str) -> str:
    """The checkpoint with every rsparse_threshold multiplied by `scale` (1.0: the checkpoint itself)."""
    if scale == 1.0:
        return checkpoint
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vllm_rsparse.checkpoint import RSPARSE_FILE

    out = os.path.join(root, f"thresholds-x{scale}")
    shutil.copytree(checkpoint, out)
    with safe_open(os.path.join(checkpoint, RSPARSE_FILE), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: v * scale if k.endswith("rsparse_threshold") else v for k, v in tensors.items()}
    save_file(tensors, os.path.join(out, RSPARSE_FILE), metadata=metadata)
    return out


def window_nll(checkpoint: str, windows: int, seq_len: int, mode: str) -> list[float]:
    """Mean negative log-likelihood of each held-out window (strict protocol: sparse on every token)."""
    from vllm_rsparse.calibration import data
    from vllm_rsparse.evaluation.harness import EngineOptions, VllmScorer
    from vllm_rsparse.serving import shutdown_llm

    scorer = VllmScorer(checkpoint, "strict", max(1024, seq_len + 1), EngineOptions(enforce_eager=mode == "eager"))
    try:
        ids = data.token_windows(scorer.tokenizer, data.heldout_text(), windows, seq_len, source="held-out text")
        lps = scorer.token_logprobs([w.tolist() for w in ids])
    finally:
        shutdown_llm(scorer.llm)
        del scorer
        gc.collect()
    return [-sum(x) / len(x) for x in lps]


def paired(base: list[float], other: list[float]) -> dict:
    """other - base per window: mean, its standard error, the perplexity ratio and how many windows got worse."""
    d = [o - b for b, o in zip(base, other)]
    mean = statistics.mean(d)
    return {"mean_dnll": mean, "se": statistics.stdev(d) / math.sqrt(len(d)), "ppl_ratio": math.exp(mean),
            "windows_worse": sum(v > 0 for v in d), "windows": len(d)}


def report_md(result: dict) -> str:
    runs = result["runs"]
    lines = [f"# Eager vs compiled vLLM on the CPU: perplexity of `{result['checkpoint']}`", "",
             f"commit `{result['commit']}`, {result['machine']}, {result['versions']}", "",
             f"Command: `{result['command']}`", "",
             f"{result['windows']} held-out windows x {result['seq_len']} tokens, strict protocol (sparse on every token), "
             "bf16; each run is its own vLLM engine (eager: `enforce_eager=True`, the committed quality rows' mode; "
             "compiled: vLLM's default torch.compile mode, as a server runs). Paired differences are per window.", "",
             "| thresholds | ppl eager | ppl compiled | compiled / eager (paired) | se of the ratio | windows worse |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        p = run["compiled_vs_eager"]
        lines.append(f"| x {run['threshold_scale']} | {run['ppl']['eager']:.3f} | {run['ppl']['compiled']:.3f} | "
                     f"{p['ppl_ratio']:.4f} | {p['se']:.4f} | {p['windows_worse']}/{p['windows']} |")
    if len(runs) > 1:
        lines += ["", "Scaling the thresholds by a hair, same mode (paired against x 1.0):", "",
                  "| mode | thresholds | ppl ratio | se | windows worse |", "|---|---|---|---|---|"]
        for run in runs[1:]:
            for mode in MODES:
                p = run["vs_unscaled"][mode]
                lines.append(f"| {mode} | x {run['threshold_scale']} | {p['ppl_ratio']:.4f} | {p['se']:.4f} | "
                             f"{p['windows_worse']}/{p['windows']} |")
    lines += ["", result.get("reading", "")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threshold-scales", type=float, nargs="+", default=[1.0])
    p.add_argument("-o", "--out", help="JSON result; the markdown table goes next to it")
    p.add_argument("--report", metavar="JSON", help="only render a result JSON (with its 'reading') to its markdown")
    args = p.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            result = json.load(f)
        with open(os.path.splitext(args.report)[0] + ".md", "w") as f:
            f.write(report_md(result))
        return 0
    if not args.out:
        p.error("-o/--out is required (or --report)")
    if args.threshold_scales[0] != 1.0:
        p.error("the first --threshold-scales value must be 1.0 (the checkpoint itself: the others pair against it)")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tp_cpu import provenance

    result = {**provenance(sys.argv[1:] if argv is None else argv, "benchmarks/compiled_vs_eager.py"),
              "checkpoint": args.checkpoint, "windows": args.windows, "seq_len": args.seq_len,
              "runs": []}
    started = time.time()
    with tempfile.TemporaryDirectory() as root:
        for scale in args.threshold_scales:
            ckpt = scaled_copy(args.checkpoint, scale, root)
            nll = {mode: window_nll(ckpt, args.windows, args.seq_len, mode) for mode in MODES}
            run = {"threshold_scale": scale, "nll": nll,
                   "ppl": {m: math.exp(statistics.mean(v)) for m, v in nll.items()},
                   "compiled_vs_eager": paired(nll["eager"], nll["compiled"])}
            if result["runs"]:
                run["vs_unscaled"] = {m: paired(result["runs"][0]["nll"][m], nll[m]) for m in MODES}
            result["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "nll"}), flush=True)
    result["seconds"] = round(time.time() - started, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(report_md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
