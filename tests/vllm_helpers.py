"""Building a real in-process vLLM engine in tests."""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def make_llm(model_dir, **kwargs):
    from vllm import LLM

    llm = LLM(model=str(model_dir), enforce_eager=True, max_model_len=512, max_num_batched_tokens=512,
              dtype="bfloat16", seed=0, **kwargs)
    try:
        yield llm
    finally:
        # Shut the in-process engine down now: if it were left to the garbage
        # collector, its teardown would destroy the distributed state of the NEXT
        # LLM built in this process.
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
