"""``rsparse-eval``: perplexity and zero-shot accuracy of a checkpoint, through vLLM.

Needs a ``if __name__ == "__main__"`` entry (vLLM may spawn processes): the console
script provides one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    from vllm_rsparse.evaluation.harness import PROTOCOLS, EvalConfig
    from vllm_rsparse.evaluation.tasks import TASKS

    d = EvalConfig(checkpoint="")
    p = argparse.ArgumentParser(
        prog="rsparse-eval",
        description="Held-out perplexity and zero-shot accuracy of a checkpoint (rsparse or dense), "
                    "computed through vLLM prompt_logprobs.")
    p.add_argument("checkpoint", help="local model directory (rsparse checkpoint or plain dense export)")
    p.add_argument("--tasks", default=",".join(d.tasks),
                   help=f"comma-separated subset of {sorted(TASKS)}, or '' for none (default: all five)")
    p.add_argument("--limit", type=int, default=d.limit,
                   help=f"examples per task, a fixed seeded subset; 0 = full validation split (default: {d.limit})")
    p.add_argument("--ppl-windows", type=int, default=d.ppl_windows,
                   help=f"held-out perplexity windows, 0 = none (default: {d.ppl_windows})")
    p.add_argument("--ppl-seq-len", type=int, default=d.ppl_seq_len, help=f"tokens per window (default: {d.ppl_seq_len})")
    p.add_argument("--protocol", choices=PROTOCOLS, default=d.protocol,
                   help="strict: sparse path on every token incl. the prompt (default); dense-prompt: "
                        "the checkpoint's max_sparse_tokens applies (prefill runs dense)")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len, help=f"(default: {d.max_model_len})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"subset seed (default: {d.seed})")
    p.add_argument("--compiled", action="store_true",
                   help="score with vLLM's default torch.compile mode (CUDA graphs on a GPU), as a server runs, "
                        "instead of eager; its rounding differs, which a threshold mask amplifies (a few percent of "
                        "perplexity: benchmarks/results/compiled_cpu.md) (default: eager)")
    g = p.add_argument_group("engine (batching and memory only; the scores do not depend on them)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per vLLM step (default: --max-model-len; e.g. 16384 on a GPU)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="sequences per vLLM step (default: vLLM's)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None, help="(default: vLLM's)")
    g.add_argument("--kv-cache-gib", type=float, default=None,
                   help="fixed KV cache size in GiB, no memory profiling (several evaluations on one GPU)")
    p.add_argument("-o", "--output", help="write the JSON result here (default: stdout only)")
    return p


def main(argv: list[str] | None = None) -> int:
    from vllm_rsparse.evaluation.harness import EngineOptions, EvalConfig, evaluate

    ns = build_parser().parse_args(argv)
    if ns.limit < 0:
        # EvalConfig's own check speaks of None (the library's "full split"); the CLI's word for it is 0
        print(f"rsparse-eval: error: --limit must be >= 0 (0 = the full validation split), got {ns.limit}",
              file=sys.stderr)
        return 2
    if not os.path.isdir(ns.checkpoint):
        # a local directory (there is no model hub here); without this vLLM reads the path as a
        # hub repo id and refuses its characters
        print(f"rsparse-eval: error: {ns.checkpoint}: no such checkpoint directory", file=sys.stderr)
        return 2
    if ns.output:
        # checked before the evaluation (minutes to hours), not when its result is written
        out_dir = os.path.dirname(os.path.abspath(ns.output))
        problem = ("is a directory; give a file name" if os.path.isdir(ns.output) else
                   f"its directory {out_dir} does not exist" if not os.path.isdir(out_dir) else
                   f"its directory {out_dir} is not writable" if not os.access(out_dir, os.W_OK) else None)
        if problem:
            print(f"rsparse-eval: error: -o {ns.output}: {problem}", file=sys.stderr)
            return 2
    try:
        config = EvalConfig(
            checkpoint=ns.checkpoint,
            tasks=tuple(t for t in ns.tasks.split(",") if t),
            limit=None if ns.limit == 0 else ns.limit,
            ppl_windows=ns.ppl_windows, ppl_seq_len=ns.ppl_seq_len, protocol=ns.protocol,
            max_model_len=ns.max_model_len, seed=ns.seed,
            engine=EngineOptions(max_num_batched_tokens=ns.max_num_batched_tokens, max_num_seqs=ns.max_num_seqs,
                                 gpu_memory_utilization=ns.gpu_memory_utilization, kv_cache_gib=ns.kv_cache_gib,
                                 enforce_eager=not ns.compiled),
        )
        started = time.time()
        result = evaluate(config)
        result["seconds"] = round(time.time() - started, 1)
    except (ValueError, OSError) as e:
        print(f"rsparse-eval: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    print(text)  # first: whatever happens to the file, the result is on stdout
    if ns.output:
        try:
            with open(ns.output, "w") as f:
                f.write(text)
        except OSError as e:
            print(f"rsparse-eval: error: could not write -o {ns.output} ({e}); the result is printed above",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
