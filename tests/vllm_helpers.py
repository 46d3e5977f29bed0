"""Building a real in-process vLLM engine in tests."""

from __future__ import annotations

import contextlib

from vllm_rsparse.serving import shutdown_llm


@contextlib.contextmanager
def make_llm(model_dir, **kwargs):
    from vllm import LLM

    llm = LLM(model=str(model_dir), enforce_eager=True, max_model_len=512, max_num_batched_tokens=512,
              dtype="bfloat16", seed=0, **kwargs)
    try:
        yield llm
    finally:
        shutdown_llm(llm)  # before the next engine is built in this process
