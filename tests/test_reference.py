"""The PyTorch reference: the contract every kernel and the CPU path are held to."""

import pytest
import torch
import torch.nn.functional as F

from vllm_rsparse import ops, reference

# rtol/atol per dtype: the reference computes in fp32 and rounds once, dense F.linear
# in the input dtype may round differently (bf16 has 8 mantissa bits: 2^-8 = 3.9e-3).
TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),  # fp32 both ways: only summation order differs
    torch.float16: dict(rtol=2e-3, atol=2e-3),  # one fp16 rounding (2^-11) plus accumulation order
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),  # one bf16 rounding (2^-8) plus accumulation order
}
SHAPES = [(64, 96), (576, 192), (63, 1000), (500, 63)]  # (d_in K, d_out N) incl. odd sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"K{s[0]}xN{s[1]}")
def test_threshold_sparse_linear_equals_dense_on_masked_input(shape, tokens, dtype):
    k, n = shape
    x = torch.randn(tokens, k).to(dtype)
    w = torch.randn(n, k).to(dtype) / k**0.5
    b = torch.randn(n).to(dtype)
    threshold = torch.tensor([0.7])
    y = reference.sparse_linear(x, w, b, threshold=threshold)
    masked = torch.where(x.float().abs() > 0.7, x.float(), 0.0)
    expected = F.linear(masked, w.float(), b.float()).to(dtype)
    torch.testing.assert_close(y, expected, **TOLERANCE[dtype])
    assert y.dtype == dtype and y.shape == (tokens, n)


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("keep", [0, 1, 17, 96])
def test_topk_keeps_exactly_k_channels_per_token(tokens, keep):
    x = torch.randn(tokens, 96)
    mask = reference.topk_mask(x, keep)
    assert mask.sum(-1).tolist() == [keep] * tokens
    if 0 < keep < 96:  # every kept |x| is >= every dropped |x|
        kept_min = torch.where(mask, x.abs(), float("inf")).min(-1).values
        dropped_max = torch.where(mask, float("-inf"), x.abs()).max(-1).values
        assert (kept_min >= dropped_max).all()


def test_score_weight_changes_the_selection():
    x = torch.ones(1, 4)
    score_weight = torch.tensor([0.1, 3.0, 0.2, 2.0])
    assert reference.topk_mask(x, 2, score_weight).tolist() == [[False, True, False, True]]
    assert reference.threshold_mask(x, torch.tensor([1.0]), score_weight).tolist() == [[False, True, False, True]]


@pytest.mark.parametrize("rank", [1, 8])
def test_lowrank_term_carries_the_dropped_channels(rank):
    k, n = 64, 48
    x, w = torch.randn(2, k), torch.randn(n, k)
    u, s, vh = torch.linalg.svd(w)
    up, down = u[:, :rank] * s[:rank], vh[:rank]
    y = reference.sparse_linear(x, w, threshold=0.5, lowrank_up=up, lowrank_down=down)
    mask = x.abs() > 0.5
    expected = F.linear(x * mask, w) + F.linear(x * ~mask, up @ down)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)  # fp32, summation order only


def test_full_rank_lowrank_term_recovers_dense():
    k, n = 40, 32
    x, w = torch.randn(3, k, dtype=torch.float64), torch.randn(n, k, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    y = reference.sparse_linear(x, w, threshold=1.0, lowrank_up=u * s, lowrank_down=vh)
    # fp32 internals over 40-term sums of O(1) values: ~1e-6 absolute (observed 1.3e-6)
    torch.testing.assert_close(y, x @ w.t(), rtol=1e-5, atol=1e-5)


def test_needs_exactly_one_selection():
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="exactly one of threshold= or keep="):
        reference.sparse_linear(x, w)
    with pytest.raises(ValueError, match="keep must be in"):
        reference.sparse_linear(x, w, keep=9)


def test_custom_op_dispatches_dense_above_max_sparse_tokens():
    from vllm_rsparse import ops

    x, w = torch.randn(5, 32), torch.randn(16, 32)
    threshold = torch.tensor([10.0])  # drops every channel when sparse
    sparse = torch.ops.rsparse.sparse_linear(x, w, None, threshold, ops.THRESHOLD_SELECTION, None, None, None, 8, True)
    dense = torch.ops.rsparse.sparse_linear(x, w, None, threshold, ops.THRESHOLD_SELECTION, None, None, None, 4, True)
    assert torch.count_nonzero(sparse) == 0
    torch.testing.assert_close(dense, F.linear(x, w))


@pytest.mark.parametrize("keep", [ops.THRESHOLD_SELECTION, 200], ids=["threshold", "topk"])
def test_cpu_path_compiled_selects_on_the_rounded_activation(keep):
    """Under torch.compile (vLLM's default mode on the CPU) the CPU sparse path gives the eager result
    bit for bit, also when the op producing x is fused with it: the mask is an opaque op, so Inductor
    cannot compare the float32 value before its rounding to bf16 (traced inline it did, and kept other
    channels than eager). 64 rows of an upstream SiLU-and-multiply, as before down_proj."""
    gen = torch.Generator().manual_seed(0)
    k, n = 576, 256
    weight = torch.randn(n, k, generator=gen).bfloat16()
    threshold = torch.tensor([0.6])

    def down_proj_input_then_sparse(gate, up):
        x = (F.silu(gate.float()) * up.float()).bfloat16()
        return ops.cpu_sparse_linear(F.linear, x, weight, None, threshold, keep, None, None, None, 2**62)

    compiled = torch.compile(down_proj_input_then_sparse, dynamic=True)
    gate, up = (torch.randn(64, k, generator=gen).bfloat16() for _ in range(2))
    x32 = F.silu(gate.float()) * up.float()
    # the premise: on these rows a float32 comparison would keep other channels than the bf16 one
    assert ((x32.abs() > 0.6) != (x32.bfloat16().float().abs() > 0.6)).any()
    assert torch.equal(compiled(gate, up), down_proj_input_then_sparse(gate, up))
