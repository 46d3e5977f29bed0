"""RSPARSE_BATCH_INVARIANT=1: a request's answer must not depend on its batch.

Bitwise checks, no tolerance: a threshold mask turns any last-bit difference into a
flipped channel (docs/batch-invariance.md). The op tests use vLLM's own CPU GEMM
dispatch (oneDNN / AMX kernels, as served); the engine test runs real vLLM.
"""

from __future__ import annotations

import pytest
import torch

from vllm_rsparse import batch_invariant, ops
from vllm_rsparse.config import RSparseConfigError

# SmolLM2-135M's projection shapes (qkv, o, gate_up, down) and its lm_head.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]
BATCHES = [1, 2, 7, 16, 17, 33, 100]


def vllm_cpu_layer(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter((torch.randn(n, k, generator=g) * 0.05).to(dtype), requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return layer


def rows_alone_vs_batched(fn, x: torch.Tensor, row: int = 5) -> list[tuple[int, int]]:
    """(batch size, position) pairs where x[row] inside a batch gives other bits than alone."""
    alone = fn(x[row:row + 1])[0]
    bad = []
    for m in BATCHES:
        for pos in sorted({0, m // 2, m - 1}):
            xb = x[:m].clone()
            xb[pos] = x[row]
            if not torch.equal(fn(xb)[pos], alone):
                bad.append((m, pos))
    return bad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}xK{s[1]}")
def test_blocked_vllm_cpu_gemm_is_row_invariant(shape, dtype):
    n, k = shape
    layer = vllm_cpu_layer(n, k, dtype)
    x = torch.randn(128, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    blocked = lambda xb: batch_invariant.blocked_linear(layer.cpu_linear, xb, layer.weight, None)  # noqa: E731
    assert rows_alone_vs_batched(blocked, x) == []
    # ... and blocking changes nothing but the grouping: same values as one plain call
    # of the block shape (the kernel the blocks run).
    block = x[:batch_invariant.ROW_BLOCK]
    assert torch.equal(blocked(block), layer.cpu_linear(block, layer.weight, None))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rank", [0, 8])
def test_cpu_sparse_linear_is_row_invariant_and_masks_every_batch(dtype, rank):
    n, k = 576, 1536  # down_proj: the shape where plain oneDNN fp32 is batch-dependent
    layer = vllm_cpu_layer(n, k, dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(128, k, generator=g).to(dtype)
    threshold = torch.tensor([0.7])
    up = (torch.randn(n, rank, generator=g) * 0.1).to(dtype) if rank else None
    down = (torch.randn(rank, k, generator=g) * 0.1).to(dtype) if rank else None

    def op(xb, invariant=True, max_sparse_tokens=16):
        return ops.cpu_sparse_linear(layer.cpu_linear, xb, layer.weight, None, threshold,
                                     ops.THRESHOLD_SELECTION, None, up, down, max_sparse_tokens,
                                     batch_invariant=invariant)

    assert rows_alone_vs_batched(op, x) == []
    # The sparse/dense decision does not depend on the batch: above max_sparse_tokens
    # the plain path runs dense, the invariant one still masks each row.
    big = x[:17]
    masked = torch.where(big.float().abs() > 0.7, big, torch.zeros((), dtype=dtype))
    dense = layer.cpu_linear(big, layer.weight, None)
    assert torch.equal(op(big, invariant=False), dense if rank == 0 else op(big, invariant=False))
    if rank == 0:
        expect = batch_invariant.blocked_linear(layer.cpu_linear, masked, layer.weight, None)
        assert torch.equal(op(big), expect)
        assert not torch.equal(op(big), dense)


def test_env_values(monkeypatch):
    for value, expect in [("1", True), ("on", True), ("0", False), ("", False)]:
        monkeypatch.setenv(batch_invariant.BATCH_INVARIANT_ENV, value)
        assert batch_invariant.enabled() is expect
    monkeypatch.delenv(batch_invariant.BATCH_INVARIANT_ENV)
    assert batch_invariant.enabled() is False
    monkeypatch.setenv(batch_invariant.BATCH_INVARIANT_ENV, "yes please")
    with pytest.raises(RSparseConfigError, match="RSPARSE_BATCH_INVARIANT='yes please': expected 1"):
        batch_invariant.enabled()


# Distinct lengths, so the batch mixes long and short prefills and decodes.
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old",
    "def fibonacci(n):",
    "The history of the city goes back to the Roman era, when a small settlement grew around the "
    "river crossing and became a market town for the region around it. In the middle ages",
    "Water boils at",
    "List three colours: red,",
]


@pytest.mark.vllm
def test_engine_answers_alone_equal_answers_in_a_batch(calibrated_dirs, monkeypatch):
    """Real vLLM, sparse checkpoint (TEAL 0.5): token ids and their logprobs of each
    prompt served alone equal those of the same prompt inside one batch, bitwise.
    (Without the mode, with RSPARSE_MAX_SPARSE_TOKENS=all, one of the six prompts got
    other logprob bits in the batch when this test was written.)"""
    from vllm import SamplingParams

    from vllm_helpers import make_llm

    monkeypatch.setenv(batch_invariant.BATCH_INVARIANT_ENV, "1")
    params = SamplingParams(temperature=0.0, max_tokens=10, logprobs=0)

    def answer(output):
        return list(output.token_ids), [next(iter(lp.values())).logprob for lp in output.logprobs]

    with make_llm(calibrated_dirs[0.5]) as llm:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        assert AttentionBackendEnum.CPU_ATTN.get_path().endswith("BatchInvariantCPUAttentionBackend")
        alone = [answer(llm.generate([p], params, use_tqdm=False)[0].outputs[0]) for p in PROMPTS]
        batched = [answer(o.outputs[0]) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        reordered = [answer(o.outputs[0]) for o in llm.generate(PROMPTS[::-1], params, use_tqdm=False)][::-1]
    assert batched == alone
    assert reordered == alone
    monkeypatch.delenv(batch_invariant.BATCH_INVARIANT_ENV)
    batch_invariant.sync_attention_backend()  # the next engine in this process gets vLLM's own
    assert not AttentionBackendEnum.CPU_ATTN.is_overridden()
