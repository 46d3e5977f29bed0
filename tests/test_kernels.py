"""Triton kernels (kernels/, vllm_rsparse/launchers.py) against the PyTorch reference.

Every test draws fresh random inputs (seeded from its own id, so a failure
reproduces) and runs with ``torch.empty`` poisoned with NaN: an output element or a
split-K partial that a kernel never writes shows up as NaN and fails the test.

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 (about 0.1 s a
launch), on a small subset of the cases; with CUDA the full set runs (its log is
committed as benchmarks/results/kernel_tests_h100.log).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import zlib

from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # must be set before the kernel modules are imported (launchers imports them lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from benchmark_scripts import load_benchmark  # noqa: E402
from vllm_rsparse import launchers, reference  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
# The interpreter returns arbitrary values in the masked-off lanes of an atomic (measured: leftover
# memory, e.g. 32, 40, 48, 56), so the fixed-point finish's lanes past N or M hold garbage when they
# are cast to the output dtype; numpy then warns of an fp16 overflow although the masked store never
# writes those lanes (the outputs are NaN-poisoned and compared, so a real overflow fails a test).
# The warning comes and goes with what that memory held before.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
RESULTS = BENCHMARKS / "results"  # committed measurements the report tests rebuild
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# One table per dtype. Kernel and reference both accumulate in f32 and round once to
# the output dtype; they differ only in f32 summation order, so an element can land
# on the neighbouring representable value: 1 ulp, i.e. rtol = 2^-(mantissa bits) at
# the bottom of a binade. atol covers f32 reordering error in outputs that cancel to
# near zero (sums of ~10^4 terms, f32 eps 6e-8), relative to the largest |output|.
TOLERANCE = {
    torch.bfloat16: {"rtol": 2.0**-7, "atol": 2.0**-14, "why": "1 bf16 ulp (7 mantissa bits) + f32 reorder"},
    torch.float16: {"rtol": 2.0**-10, "atol": 2.0**-14, "why": "1 fp16 ulp (10 mantissa bits) + f32 reorder"},
}

# (N, K) shapes: odd sizes and the model sizes. CPU: what the interpreter can afford.
GPU_SHAPES = [(576, 896), (896, 576), (1000, 4096), (4096, 1000), (4096, 11008), (11008, 4096),
              (14336, 4096), (4096, 14336)]
CPU_SHAPES = [(96, 200), (576, 1000)]
SHAPES = GPU_SHAPES if HAS_CUDA else CPU_SHAPES
SPARSITIES = [0.0, 0.3, 0.5, 0.9, 1.0] if HAS_CUDA else [0.0, 0.5, 1.0]
TOKENS_ALL = list(range(1, 17)) if HAS_CUDA else [1, 3, 16]
TOKENS_FEW = [1, 4, 9, 16] if HAS_CUDA else [1, 5]
RANKS = [96, 1] if HAS_CUDA else [37]


def shape_id(shape):
    return f"N{shape[0]}-K{shape[1]}"


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """torch.empty returns NaN (floats) or INT_MIN (ints): unwritten results are caught."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(torch.iinfo(t.dtype).min)
        return t

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.fixture(autouse=True)
def compact_rows(monkeypatch):
    """On the CPU every test also runs the compact one-row kernel (COMPACT_ROWS_ENABLED);
    on the GPU the tests run the configs the launcher picks (the committed ones: walk or compact per shape),
    and the compact kernel has its own tests (test_configs_agree, test_compact_chunks,
    test_compact_wide_block)."""
    if not HAS_CUDA:
        monkeypatch.setattr(launchers, "COMPACT_ROWS_ENABLED", True)


@pytest.fixture
def gen(request):
    g = torch.Generator(device=DEVICE)
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


def randn(*shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(dtype)


def make_layer(n, k, dtype, gen, rank=0, bias=True, scale=False):
    w = randn(n, k, gen=gen, dtype=dtype, scale=k**-0.5)
    b = randn(n, gen=gen, dtype=dtype) if bias else None
    s = (torch.rand(k, generator=gen, device=DEVICE) + 0.5) if scale else None
    u = randn(n, rank, gen=gen, dtype=dtype, scale=rank**-0.5) if rank else None
    v = randn(rank, k, gen=gen, dtype=dtype, scale=k**-0.5) if rank else None
    return w, b, s, u, v


def threshold_for(x, sparsity, scale):
    """A threshold that drops about `sparsity` of the channels of these rows."""
    if sparsity <= 0.0:
        return torch.tensor([-1.0], device=x.device)
    if sparsity >= 1.0:
        return torch.tensor([float("inf")], device=x.device)
    score = reference.channel_scores(x, scale).flatten()
    return torch.quantile(score[: 1 << 20], sparsity).reshape(1)


def topk_mask_lowest_index(x, keep, scale):
    """Exact top-k with ties taken lowest index first (independent of the kernel)."""
    score = reference.channel_scores(x, scale)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if keep > 0:
        order = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :keep]
        mask.scatter_(-1, order, True)
    return mask


def kept_by_thresholds(x, thr, jcut, scale):
    """The channels a per-row (threshold, tie cut) pair selects, by the kernels' rule: a score above
    the threshold, or equal to it at a channel up to the tie cut."""
    score = reference.channel_scores(x, scale)
    o_k = torch.arange(x.shape[1], device=x.device)
    return (score > thr[:, None]) | ((score == thr[:, None]) & (o_k[None, :] <= jcut[:, None]))


def check_close(out, ref):
    tol = TOLERANCE[ref.dtype]
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all(), "non-finite output: an element was never written"
    out32, ref32 = out.float(), ref.float()
    scale = ref32.abs().max().clamp_min(1e-6)
    err = (out32 - ref32).abs()
    bound = tol["rtol"] * ref32.abs() + tol["atol"] * scale
    worst = (err - bound).max().item()
    assert worst <= 0, f"max err {err.max().item():.3g} exceeds tolerance ({tol['why']}) by {worst:.3g}"


@pytest.mark.parametrize("variant", ["teal", "rsparse-lowrank"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=[f"s{s}" for s in SPARSITIES])
@pytest.mark.parametrize("tokens", TOKENS_ALL, ids=[f"M{m}" for m in TOKENS_ALL])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_threshold(shape, tokens, sparsity, dtype, variant, gen):
    if variant == "rsparse-lowrank" and tokens not in TOKENS_FEW:
        pytest.skip("low-rank runs on a token subset")
    n, k = shape
    dtype = DTYPES[dtype]
    rank = RANKS[tokens % len(RANKS)] if variant == "rsparse-lowrank" else 0
    scale = variant != "teal"
    w, b, s, u, v = make_layer(n, k, dtype, gen, rank=rank, bias=tokens % 2 == 1, scale=scale)
    x = randn(tokens, k, gen=gen, dtype=dtype)
    thr = threshold_for(x, sparsity, s)
    out = launchers.sparse_linear(
        x, launchers.prepare_weight(w), b, thr, launchers.THRESHOLD_SELECTION, s, u,
        launchers.prepare_weight(v) if v is not None else None,
        use_crossover=False,  # the kernels, not the dispatch table (model shapes -> dense above it)
    )
    ref = reference.sparse_linear(x, w, b, threshold=thr, channel_scale=s, lowrank_up=u, lowrank_down=v)
    check_close(out, ref)


TOPK_TOKENS = [1, 2, 5, 16] if HAS_CUDA else [1, 5]


@pytest.mark.parametrize("lowrank", [False, True], ids=["plain", "lowrank"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=[f"s{s}" for s in SPARSITIES])
@pytest.mark.parametrize("tokens", TOPK_TOKENS, ids=[f"M{m}" for m in TOPK_TOKENS])
@pytest.mark.parametrize("shape", SHAPES[-1:] if not HAS_CUDA else SHAPES, ids=shape_id)
def test_topk(shape, tokens, sparsity, dtype, lowrank, gen):
    n, k = shape
    dtype = DTYPES[dtype]
    w, b, s, u, v = make_layer(n, k, dtype, gen, rank=RANKS[0] if lowrank else 0, scale=lowrank)
    x = randn(tokens, k, gen=gen, dtype=dtype)
    keep = round((1.0 - sparsity) * k)
    out = launchers.sparse_linear(
        x, launchers.prepare_weight(w), b, None, keep, s, u,
        launchers.prepare_weight(v) if v is not None else None,
        use_crossover=False,  # the kernels, not the dispatch table (model shapes -> dense above it)
    )
    mask = topk_mask_lowest_index(x, keep, s)
    check_close(out, reference.masked_linear(x, w, mask, b, u, v))


@pytest.mark.parametrize("distinct", [3, 40, 100000], ids=lambda d: f"values{d}")
@pytest.mark.parametrize("keep_frac", [0.0, 0.01, 0.5, 0.99, 1.0], ids=lambda f: f"keep{f}")
@pytest.mark.parametrize("select", ["radix16"] + [f"histogram{bits}" for bits in launchers.HIST_DIGIT_BITS_CHOICES]
                         + ["histogram4_w32", "histogram5_w16"])
def test_topk_select_exact_count(distinct, keep_frac, select, gen, monkeypatch):
    """The (threshold, tie cut) pair keeps exactly `keep` channels, also when most
    scores tie (few distinct values): the same set as lowest-index-first top-k. Both
    select kernels: passes of 16-way counts, and histogram passes of one block over
    digits of 4, 5, 6 or 8 bits, of 8 warps and (suffix _wN) wider blocks. The rows are
    bf16 without a scale, so the passes cover the 15 bits a score can have set
    (launchers.score_bit_span; 4, 6 and 8 leave a last digit that overlaps fixed bits)."""
    monkeypatch.setattr(launchers, "TOPK_HISTOGRAM_ENABLED", select != "radix16")
    if select != "radix16":
        bits, _, warps = select.removeprefix("histogram").partition("_w")
        monkeypatch.setattr(launchers, "HIST_DIGIT_BITS", int(bits))
        monkeypatch.setattr(launchers, "HIST_WARPS", int(warps or 8))
    m, k = (7, 1000) if not HAS_CUDA else (16, 14336)
    x = (torch.randint(0, distinct, (m, k), generator=gen, device=DEVICE).float() - distinct / 2)
    x = x.to(torch.bfloat16)
    keep = round(keep_frac * k)
    thr, jcut = launchers.topk_thresholds(x, keep, None)
    mask = kept_by_thresholds(x, thr, jcut, None)
    assert (mask.sum(-1) == keep).all()
    assert torch.equal(mask, topk_mask_lowest_index(x, keep, None))


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_score_bit_span_holds_for_every_value(dtype):
    """launchers.score_bit_span's premise, on every 16-bit pattern of the dtype (subnormals, zeros,
    infinities and NaNs included): |x| widened to f32 has no bit set outside [LOW_BIT, TOP_BIT), so the
    select passes it skips would have found zero digits."""
    low, top = launchers.score_bit_span(DTYPES[dtype], has_scale=False)
    assert (low, top) == ({"bf16": 16, "fp16": 13}[dtype], 31)
    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(DTYPES[dtype])
    bits = reference.channel_scores(x[None, :], None).view(torch.int32)
    outside = ~(((1 << top) - 1) ^ ((1 << low) - 1))  # every bit not in [low, top)
    assert not (bits & outside).any()
    # a channel scale's product can set any bit, and the switch restores the full span
    assert launchers.score_bit_span(DTYPES[dtype], has_scale=True) == (0, 32)


# the scaled rows hold bf16 values near its maximum on purpose: |x| * scale overflows to an infinite
# score, which the select must order like any other (numpy, under the interpreter, warns of it)
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("scale", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("select", ["radix16", "histogram4", "histogram5", "histogram8"])
def test_topk_select_score_span(select, dtype, scale, gen, monkeypatch):
    """The select passes over only the bits a score can have set (launchers.score_bit_span: 15 bits
    for bf16, 18 for fp16, all 32 with a channel scale) give the (threshold, tie cut) of the passes
    over all 32 bits, bit for bit, on rows of arbitrary 16-bit values (subnormals, zeros and
    infinities included) and rows that are mostly ties."""
    monkeypatch.setattr(launchers, "TOPK_HISTOGRAM_ENABLED", select != "radix16")
    if select != "radix16":
        monkeypatch.setattr(launchers, "HIST_DIGIT_BITS", int(select.removeprefix("histogram")))
    m, k = (6, 1000) if not HAS_CUDA else (16, 14336)
    dtype = DTYPES[dtype]
    patterns = torch.randint(-(1 << 15), 1 << 15, (m, k), generator=gen, device=DEVICE, dtype=torch.int32)
    x = patterns.to(torch.int16).view(dtype)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)  # NaN has no place in a top-k order
    if not HAS_CUDA:
        # the interpreter widens a bf16 subnormal (an f32 subnormal) to 0; the GPU shifts its bits
        x = torch.where(x.float().abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(x), x)
    # rows of small integers: mostly ties (zeros_like, not x * 0: an infinity of the random patterns
    # times 0 is NaN -- on the GPU's 16 x 14336 rows a few, and the failures of session 31's run)
    x[m // 2:] = torch.randint(0, 3, (m - m // 2, k), generator=gen, device=DEVICE).to(dtype)
    assert not torch.isnan(x).any()
    channel_scale = torch.rand(k, generator=gen, device=DEVICE) + 0.5 if scale else None
    for keep in (0, 1, k // 3, k // 2, k - 1, k):
        spans = []
        for enabled in (True, False):
            monkeypatch.setattr(launchers, "TOPK_SCORE_SPAN_ENABLED", enabled)
            spans.append(launchers.topk_thresholds(x, keep, channel_scale))
        (thr, jcut), (thr_full, jcut_full) = spans
        assert torch.equal(thr.view(torch.int32), thr_full.view(torch.int32)) and torch.equal(jcut, jcut_full)
        assert torch.equal(kept_by_thresholds(x, thr, jcut, channel_scale),
                           topk_mask_lowest_index(x, keep, channel_scale)), keep


@pytest.mark.parametrize("finish", ["fixed", "counter"])
@pytest.mark.parametrize("ahead", [True, False], ids=["ahead", "one_ahead"])
@pytest.mark.parametrize("rows", ["compact", "walk", "union"])
@pytest.mark.parametrize("split_k", [1, 3, 1000], ids=lambda s: f"split{s}")
def test_configs_agree(rows, split_k, ahead, finish, gen, monkeypatch):
    """Compact, walk and union programs, any split-K (compact: any K chunk, the last one
    partial), with and without the loads two steps ahead, either split-K finish (splits
    deeper than FX_MAX_SPLIT always take the counter), give each row only its own channels
    and leave the workspace zeroed."""
    if rows == "compact" and split_k == 1000 and not HAS_CUDA:
        pytest.skip("16-channel chunks: test_compact_chunks covers them at interpreter cost")
    if rows == "union" and not ahead:
        pytest.skip("the union (tl.dot) loop has no hand pipeline")
    if split_k == 1 and finish == "counter":
        pytest.skip("one program along K has no split-K finish")
    monkeypatch.setattr(launchers, "COMPACT_ROWS_ENABLED", rows == "compact")
    monkeypatch.setattr(launchers, "LOAD_AHEAD_ENABLED", ahead)
    monkeypatch.setattr(launchers, "FIXED_POINT_SPLIT_ENABLED", finish == "fixed")
    rows = launchers.MAX_ROWS if rows == "union" else 1
    n, k, m = (200, 300, 6) if not HAS_CUDA else (4096, 11008, 6)
    dtype = torch.bfloat16
    w, b, s, u, v = make_layer(n, k, dtype, gen, rank=20, scale=True)
    x = randn(m, k, gen=gen, dtype=dtype)
    thr = threshold_for(x, 0.5, s)
    cfg = launchers.GemvConfig(rows=rows, block_n=64, block_k=32, split_k=split_k, num_warps=4, num_stages=2)
    w_t = launchers.prepare_weight(w).t()
    v_t = launchers.prepare_weight(v).t()
    out = launchers.sparse_gemv(x, w_t, thr.float(), None, b, s, u, v_t, config=cfg)
    ref = reference.sparse_linear(x, w, b, threshold=thr, channel_scale=s, lowrank_up=u, lowrank_down=v)
    check_close(out, ref)
    assert launchers._workspace_for(x.device).is_clean(), "split-K workspace left dirty"


@pytest.mark.parametrize("kernel", ["compact", "walk"])
def test_fixed_point_finish_range(kernel, gen, monkeypatch):
    """The fixed-point split-K finish: bit-identical results on a repeat, and a partial sum
    beyond its range (FX_LIMIT) turns that output element into NaN instead of a wrapped
    value, leaving the other rows exact and the workspace clean; the counter finish
    computes it."""
    from vllm_rsparse.kernels import sparse_gemv as kernels_module

    assert launchers.FX_MAX_SPLIT == kernels_module.FX_MAX_SPLIT.value
    monkeypatch.setattr(launchers, "COMPACT_ROWS_ENABLED", kernel == "compact")
    n, k, m = (96, 300, 2) if not HAS_CUDA else (4096, 4096, 2)
    w, b, _, _, _ = make_layer(n, k, torch.bfloat16, gen)
    x = randn(m, k, gen=gen, dtype=torch.bfloat16)
    thr = threshold_for(x, 0.5, None)
    # row 0, channel 7: 4e6 x 1.0 in every column, four times FX_LIMIT
    x[0, 7] = 4.0e6
    w[:, 7] = 1.0
    w_t = launchers.prepare_weight(w).t()
    cfg = launchers.GemvConfig(rows=1, block_n=32, block_k=16, split_k=3, num_warps=4, num_stages=1, kernel=kernel)
    ref = reference.sparse_linear(x, w, b, threshold=thr)
    out = launchers.sparse_gemv(x, w_t, thr.float(), None, b, None, None, None, config=cfg)
    assert torch.isnan(out[0]).all(), "an out-of-range partial sum must give NaN, not a wrapped value"
    check_close(out[1:], ref[1:])
    assert torch.equal(out[1:], launchers.sparse_gemv(x, w_t, thr.float(), None, b, None, None, None, config=cfg)[1:])
    assert launchers._workspace_for(x.device).is_clean()
    monkeypatch.setattr(launchers, "FIXED_POINT_SPLIT_ENABLED", False)
    check_close(launchers.sparse_gemv(x, w_t, thr.float(), None, b, None, None, None, config=cfg), ref)


@pytest.mark.parametrize("ahead", [True, False], ids=["ahead", "one_ahead"])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 1.0], ids=lambda d: f"density{d}")
def test_compact_chunks(density, ahead, gen, monkeypatch):
    """Compact lists at chunk sizes below, at and above a list step, and a selection
    count that is no multiple of the step: the loop's first, last and empty trips."""
    monkeypatch.setattr(launchers, "LOAD_AHEAD_ENABLED", ahead)
    n, k, m = (32, 300, 2) if not HAS_CUDA else (4096, 14336, 3)
    w, b, _, _, _ = make_layer(n, k, torch.bfloat16, gen)
    x = randn(m, k, gen=gen, dtype=torch.bfloat16)
    thr = threshold_for(x, 1.0 - density, None)
    w_t = launchers.prepare_weight(w).t()
    ref = reference.sparse_linear(x, w, b, threshold=thr)
    for split_k in (1, 5, k // launchers.MIN_CHUNK):
        cfg = launchers.GemvConfig(rows=1, block_n=32, block_k=16, split_k=split_k, num_warps=4, num_stages=1,
                                   kernel="compact")
        check_close(launchers.sparse_gemv(x, w_t, thr.float(), None, b, None, None, None, config=cfg), ref)


def split_k_case(density, gen):
    """A layer with channel scales and a rank-20 term, 2-3 rows of x and a threshold keeping about
    `density` of the channels; K long enough for splits below, at and above a compact list step.
    -> w, b, scale, u, v, x, thr, w_t, v_t (the prepared [K, N] / [K, r] layouts)."""
    n, k, m = (48, 300, 2) if not HAS_CUDA else (4096, 14336, 3)
    w, b, s, u, v = make_layer(n, k, torch.bfloat16, gen, rank=20, scale=True)
    x = randn(m, k, gen=gen, dtype=torch.bfloat16)
    thr = threshold_for(x, 1.0 - density, s)
    return w, b, s, u, v, x, thr, launchers.prepare_weight(w).t(), launchers.prepare_weight(v).t()


# the compact loop left to Triton's pipeliner (launchers.compact_stages): the tiles it was timed with on the GPU
PIPELINED_TILES = [(32, 16), (2048, 4)] if HAS_CUDA else [(32, 16), (64, 4)]


@pytest.mark.parametrize("tile", PIPELINED_TILES, ids=lambda t: "bn{}-bk{}".format(*t))
@pytest.mark.parametrize("stages", [2, 3, 4] if HAS_CUDA else [2, 4], ids=lambda s: f"stages{s}")
@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 1.0], ids=lambda d: f"density{d}")
def test_compact_pipelined_loop(density, stages, tile, gen):
    """A compact config with num_stages >= 2 (session 27): the list steps go through Triton's
    cp.async pipeline instead of the hand pipeline. Empty, short and full lists, splits below,
    at and above a list step, with R-Sparse's v_t programs beside it (they keep the hand loop):
    the reference's result, and the hand loop's bits where the split-K sum is order-independent
    (the same products added in the same order)."""
    w, b, s, u, v, x, thr, w_t, v_t = split_k_case(density, gen)
    k = x.shape[1]
    block_n, block_k = tile
    for up, v_arg in ((None, None), (u, v_t)):
        ref = reference.sparse_linear(x, w, b, threshold=thr, channel_scale=s, lowrank_up=up,
                                      lowrank_down=None if up is None else v)
        for split_k in (1, 5, k // launchers.MIN_CHUNK):
            hand = launchers.GemvConfig(rows=1, block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4,
                                        num_stages=1, kernel="compact")
            piped = dataclasses.replace(hand, num_stages=stages)
            assert launchers.compact_stages(piped) == stages and launchers.compact_stages(hand) == 1
            out = launchers.sparse_gemv(x, w_t, thr.float(), None, b, s, up, v_arg, config=piped)
            check_close(out, ref)
            if split_k <= launchers.FX_MAX_SPLIT:
                assert torch.equal(out, launchers.sparse_gemv(x, w_t, thr.float(), None, b, s, up, v_arg,
                                                              config=hand)), f"split {split_k}: not the hand loop's bits"
            assert launchers._workspace_for(x.device).is_clean()


def test_compact_stages_only_for_compact_configs():
    """A walk config's num_stages is its own loop's pipeliner depth: run on the compact kernel
    (COMPACT_ROWS_ENABLED) it keeps the hand pipeline."""
    walk = launchers.GemvConfig(rows=1, block_n=64, block_k=32, split_k=4, num_warps=4, num_stages=2)
    assert launchers.compact_stages(walk) == 1
    assert launchers.compact_stages(dataclasses.replace(walk, kernel="compact")) == 2


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_topk_in_kernel(dtype, scaled, gen, monkeypatch):
    """Exact top-k selected in the compact GEMV's own programs (launchers.TOPK_IN_KERNEL, session 28):
    no select launch, the select launch's result bit for bit (the same channels; the fixed-point
    split-K sum is order-independent) and the reference's, with and without R-Sparse's v_t programs
    (they take the dropped channels of the same selection), keeping none to all channels, one
    program along K or several."""
    n, k, m = (48, 300, 3) if not HAS_CUDA else (4096, 4096, 3)
    block_n, block_k = (32, 16) if not HAS_CUDA else (512, 16)
    dtype = DTYPES[dtype]
    w, b, s, u, v = make_layer(n, k, dtype, gen, rank=20, scale=scaled)
    x = randn(m, k, gen=gen, dtype=dtype)
    w_t, v_t = launchers.prepare_weight(w).t(), launchers.prepare_weight(v).t()
    select_launch = launchers.topk_thresholds

    def no_select_launch(*args):
        raise AssertionError("the select kernel was launched")

    for split_k in (1, 5):
        cfg = launchers.GemvConfig(rows=1, block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4,
                                   num_stages=1, kernel="compact")
        for up, v_arg in ((None, None), (u, v_t)):
            for keep in (0, k // 2, k):
                monkeypatch.setattr(launchers, "TOPK_IN_KERNEL", False)
                monkeypatch.setattr(launchers, "topk_thresholds", select_launch)
                launched = launchers.sparse_gemv(x, w_t, None, None, b, s, up, v_arg, config=cfg, keep=keep)
                monkeypatch.setattr(launchers, "TOPK_IN_KERNEL", True)
                monkeypatch.setattr(launchers, "topk_thresholds", no_select_launch)
                assert launchers.topk_in_kernel(cfg, k)
                out = launchers.sparse_gemv(x, w_t, None, None, b, s, up, v_arg, config=cfg, keep=keep)
                where = f"split {split_k}, keep {keep}, low-rank {up is not None}"
                assert torch.equal(out, launched), where
                ref = reference.masked_linear(x, w, topk_mask_lowest_index(x, keep, s), b, up,
                                              None if up is None else v)
                check_close(out, ref)
                assert launchers._workspace_for(x.device).is_clean(), where


def test_topk_in_kernel_only_where_it_fits(monkeypatch):
    """The in-kernel select (launchers.topk_in_kernel) runs in the one-row compact kernel on rows of at
    most TOPK_IN_KERNEL_MAX_K channels, when switched on (TOPK_IN_KERNEL, else RSPARSE_TOPK_IN_KERNEL);
    other configs and wider rows keep the select launch."""
    compact = launchers.GemvConfig(rows=1, block_n=512, block_k=16, split_k=8, num_warps=4, num_stages=1,
                                   kernel="compact")
    union = dataclasses.replace(compact, rows=16, block_n=128, block_k=32)
    k_max = launchers.TOPK_IN_KERNEL_MAX_K
    monkeypatch.setattr(launchers, "TOPK_IN_KERNEL", True)
    assert launchers.topk_in_kernel(compact, k_max)
    assert not launchers.topk_in_kernel(compact, k_max + 1)
    assert not launchers.topk_in_kernel(union, 1024)
    monkeypatch.setattr(launchers, "TOPK_IN_KERNEL", None)
    monkeypatch.delenv(launchers.TOPK_IN_KERNEL_ENV, raising=False)
    assert not launchers.topk_in_kernel(compact, 1024)
    monkeypatch.setenv(launchers.TOPK_IN_KERNEL_ENV, "1")
    assert launchers.topk_in_kernel(compact, 1024)


@pytest.mark.parametrize("kernel", ["compact", "walk"])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0], ids=lambda d: f"density{d}")
def test_evict_first_hint(kernel, density, gen):
    """The evict-first hint on the weight rows (GemvConfig.evict) changes no result bit where
    the split-K sum is order-independent (one program along K, or the fixed-point finish);
    with the counter finish (deeper splits: f32 atomics in arrival order) both match the
    reference. Covers the dropped-channel (low-rank) tiles too."""
    w, b, s, u, v, x, thr, w_t, v_t = split_k_case(density, gen)
    k = x.shape[1]
    ref = reference.sparse_linear(x, w, b, threshold=thr, channel_scale=s, lowrank_up=u, lowrank_down=v)
    splits = (1, 5, k // launchers.MIN_CHUNK) if kernel == "compact" else (1, 5)
    for split_k in splits:
        cfg = launchers.GemvConfig(rows=1, block_n=32, block_k=16, split_k=split_k, num_warps=4,
                                   num_stages=1 if kernel == "compact" else 2, kernel=kernel)
        plain = launchers.sparse_gemv(x, w_t, thr.float(), None, b, s, u, v_t, config=cfg)
        hinted = launchers.sparse_gemv(x, w_t, thr.float(), None, b, s, u, v_t,
                                       config=dataclasses.replace(cfg, evict=True))
        check_close(hinted, ref)
        if split_k <= launchers.FX_MAX_SPLIT:
            assert torch.equal(plain, hinted), f"split {split_k}: the hint changed the result"
        else:
            check_close(plain, ref)
        assert launchers._workspace_for(x.device).is_clean()


@pytest.mark.parametrize("kernel", ["compact", "walk"])
@pytest.mark.parametrize("block_n,block_k,per", [(512, 16, 512), (1024, 8, 512), (1024, 8, 32), (2048, 4, 32)],
                         ids=["bn512_bk16", "bn1024_bk8", "bn1024_bk8_short", "bn2048_bk4_short"])
def test_wide_output_tiles(kernel, block_n, block_k, per, gen):
    """Output tiles of 512-2048 columns with 4-16 rows a step (the H200 configs adopted by
    benchmarks/gpu/wide_tiles.py for the wide-N shapes and the high-sparsity band): N not a
    multiple of the tile, the low-rank tiles narrower than one tile, per = K chunk (compact)
    or K steps per program (walk)."""
    n, k, m = (1000, 576, 2) if not HAS_CUDA else (22016, 4096, 1)
    w, b, s, u, v = make_layer(n, k, torch.bfloat16, gen, rank=20, scale=True)
    x = randn(m, k, gen=gen, dtype=torch.bfloat16)
    thr = threshold_for(x, 0.5, s)
    split = launchers.triton_cdiv(k, per) if kernel == "compact" else launchers.triton_cdiv(k, block_k * per)
    cfg = launchers.GemvConfig(rows=1, block_n=block_n, block_k=block_k, split_k=split, num_warps=4,
                               num_stages=1 if kernel == "compact" else 2, kernel=kernel)
    out = launchers.sparse_gemv(x, launchers.prepare_weight(w).t(), thr.float(), None, b, s, u,
                                launchers.prepare_weight(v).t(), config=cfg)
    check_close(out, reference.sparse_linear(x, w, b, threshold=thr, channel_scale=s, lowrank_up=u, lowrank_down=v))


# R-Sparse's u^T term: the epilogue launch after one grid of v_t and w_t programs (on the GPU also
# launched with PDL)
LOWRANK_EPILOGUE_CASES = ["launch", "launch-pdl"] if HAS_CUDA else ["launch"]


@pytest.mark.parametrize("epilogue", LOWRANK_EPILOGUE_CASES)
@pytest.mark.parametrize("layout", ["wide_chunks", "own_tiles", "w_tiles"])
@pytest.mark.parametrize("rank", [16, 112, 176, 300])
def test_lowrank_tiles(rank, layout, epilogue, gen, monkeypatch):
    """The compact kernel's v_t programs in their own shape (launchers.lowrank_tile: all of R in
    one tile up to 256 columns, more rows per list step than a w_t step, K chunks that many
    times longer -- so fewer programs along K add into z than into the output), in their own
    tile on the w_t chunk, and in the w_t shape: ranks of one and two v_t tiles, K chunks
    shorter than a v_t list step and longer, one and several v_t programs along K, both
    split-K finishes; u for the epilogue launch as given ([N, r] rows) and in [r, N] storage
    (it takes any strides); each matches the reference and leaves the workspace clean."""
    monkeypatch.setattr(launchers, "LOWRANK_LAYOUT", layout)
    monkeypatch.setattr(launchers, "LOWRANK_UP_PDL", epilogue == "launch-pdl")
    n, k, m = (48, 300, 2) if not HAS_CUDA else (4096, 11008, 2)
    w, b, s, u, v = make_layer(n, k, torch.bfloat16, gen, rank=rank, scale=True)
    x = randn(m, k, gen=gen, dtype=torch.bfloat16)
    thr = threshold_for(x, 0.55, s)
    w_t = launchers.prepare_weight(w).t()
    v_t = launchers.prepare_weight(v).t()
    ref = reference.sparse_linear(x, w, b, threshold=thr, channel_scale=s, lowrank_up=u, lowrank_down=v)
    for finish in ("fixed", "counter"):
        monkeypatch.setattr(launchers, "FIXED_POINT_SPLIT_ENABLED", finish == "fixed")
        for split_k in (1, 3, k // launchers.MIN_CHUNK):
            cfg = launchers.GemvConfig(rows=1, block_n=128, block_k=8, split_k=split_k, num_warps=4, num_stages=1,
                                       kernel="compact")
            chunk = launchers.k_split(k, cfg)[0]
            tile = launchers.lowrank_tile(cfg, rank, chunk)
            if layout == "w_tiles":
                assert (tile.block_r, tile.block_kv, tile.chunk) == (128, 8, chunk)
            else:
                # the w_t step's register tile (128 x 8) bounds the rows, never fewer than a w_t step
                assert tile.block_r == min(256, launchers.triton_next_power_of_2(rank))
                rows = max(8, min(64, 128 * 8 // tile.block_r))
                if layout == "wide_chunks":
                    assert tile.block_kv == rows and tile.chunk == min(4096, chunk * rows // 8)
                else:
                    assert tile.block_kv == max(8, min(rows, chunk)) and tile.chunk == chunk
            # u as given ([N, r] rows) on one split, in [r, N] storage on the others
            u_arg = u if split_k == 3 else launchers.prepare_weight(u)
            check_close(launchers.sparse_gemv(x, w_t, thr.float(), None, b, s, u_arg, v_t, config=cfg), ref)
            assert launchers._workspace_for(x.device).is_clean()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7, 0.9, 0.97])
def test_lowrank_chunks_follow_the_dropped_share(sparsity, gen):
    """Above s = 0.5 the wide_chunks v_t programs take K chunks shorter by the dropped lists' extra
    length (launchers.dropped_per_kept), so a v_t program's list steps stay about a w_t program's
    instead of growing to 9x at 0.9; at and below 0.5 (and without a sparsity) the measured layout
    is unchanged. The kernel at the module's sparsity matches the reference and leaves the
    workspace clean."""
    cfg = launchers.GemvConfig(rows=1, block_n=128, block_k=8, split_k=0, num_warps=4, num_stages=1, kernel="compact")
    n, k, m, rank = (48, 300, 1, 64) if not HAS_CUDA else (6144, 4096, 1, 64)
    cfg = dataclasses.replace(cfg, split_k=launchers.triton_cdiv(k, 16))
    chunk = launchers.k_split(k, cfg)[0]
    design = launchers.lowrank_tile(cfg, rank, chunk)
    tile = launchers.lowrank_tile(cfg, rank, chunk, sparsity)
    assert (tile.block_r, tile.block_kv) == (design.block_r, design.block_kv)
    w_steps = chunk * (1 - sparsity) / cfg.block_k
    v_steps = tile.chunk * sparsity / tile.block_kv
    if sparsity <= 0.5:
        assert tile == design
    else:
        assert tile.chunk < design.chunk and tile.chunk >= chunk
        # a power of two of the ratio: within a factor of sqrt(2) of balanced, unless the w_t chunk bounds it
        assert v_steps <= 1.5 * w_steps or tile.chunk == chunk
    w, b, s, u, v = make_layer(n, k, torch.bfloat16, gen, rank=rank, scale=True)
    x = randn(m, k, gen=gen, dtype=torch.bfloat16)
    thr = threshold_for(x, sparsity, s)
    ref = reference.sparse_linear(x, w, b, threshold=thr, channel_scale=s, lowrank_up=u, lowrank_down=v)
    w_p, (u_p, v_p) = launchers.prepare_weight(w), launchers.prepare_lowrank(u, v)
    out = launchers.sparse_linear(x, w_p, b, thr, -1, s, u_p, v_p, config=cfg, use_crossover=False, sparsity=sparsity)
    check_close(out, ref)
    assert launchers._workspace_for(x.device).is_clean()


# The Tritons the sm_90 builds are made with: the venv's own (CI's, 3.9) and the GPU machine's (3.6,
# `make install` puts it in <venv>/triton-gpu, outside the venv's import path), so a change that
# only the GPU's compiler rejects, or builds into calls or a stack, fails here too.
GPU_TRITON = Path(sys.prefix) / "triton-gpu"
TRITONS = ["venv", "gpu"]


def _offline_builds(toolchain: str, *flags: str) -> list[dict]:
    """benchmarks/gpu/offline_build.py --json [flags] outside the interpreter: its sm_90 builds, with
    the venv's Triton or ("gpu") the GPU machine's."""
    import subprocess

    script = BENCHMARKS / "gpu" / "offline_build.py"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    installed = GPU_TRITON / ".installed"  # holds the version Makefile's GPU_TRITON_VERSION installed
    if toolchain == "gpu":
        if not installed.exists():
            pytest.skip(f"the GPU machine's Triton is not installed in {GPU_TRITON} (make install puts it there)")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(GPU_TRITON), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(script), *flags, "--json"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    builds = json.loads(done.stdout.strip().splitlines()[-1])
    if toolchain == "gpu":
        assert {b["triton"] for b in builds} == {installed.read_text().strip()}, "not built with the GPU's Triton"
    return builds


@pytest.mark.parametrize("toolchain", TRITONS)
def test_union_compact_kernel_builds_for_sm90_offline(toolchain):
    """The union compact kernel (tl.dot on gathered rows, Triton's pipeliner) compiles for sm_90 on
    this CPU machine at its committed tiles, with the list entries in the step and one step ahead,
    into code without function calls (the interpreter never compiles it); its FMA loop of 2 / 4
    rows, gathers one or two list steps ahead, and its 16 KB tiles with per-step sums, also without a
    stack (a spilling tile would not stream its rows)."""
    builds = _offline_builds(toolchain, "--union")
    assert len(builds) == 14 and {b["LIST_AHEAD"] for b in builds[:8]} == {False, True}
    assert [(b["ROWS"], b["AHEAD_STEPS"]) for b in builds[8:12]] == [(rows, ahead) for rows in (2, 4) for ahead in (1, 2)]
    assert [(b["BLOCK_N"], b["STEP_SUM"]) for b in builds[12:]] == [(1024, True), (2048, True)]
    for build in builds:
        assert build["kernel"] == "sparse_gemv_union_compact_kernel" and build["calls"] == 0, build
    for build in builds[8:]:
        assert build["stack_bytes"] == 0 and build["local_bytes"] == 0, build


@pytest.mark.parametrize("toolchain", TRITONS)
def test_compact_kernel_builds_for_sm90_offline(toolchain):
    """The one-token compact kernel at its committed tiles (and with R-Sparse's v_t programs)
    compiles for sm_90 on this CPU machine, which the interpreter never does, with CI's Triton and
    the GPU machine's: no function calls in the PTX, no stack at 4 and 8 warps. The 2-warp 512 x 16
    tile of Llama-3 down keeps a stack with both (it spills on the GPU too, at no measurable cost:
    docs/kernels.md, session 15), so only compiling and calls are checked there."""
    builds = _offline_builds(toolchain)
    assert len(builds) == 7 and builds[-1].get("HAS_LOWRANK")
    for build in builds:
        assert build["kernel"] == "sparse_gemv_compact_kernel" and build["calls"] == 0, build
        if build["num_warps"] >= 4:
            assert build["stack_bytes"] == 0 and build["local_bytes"] == 0, build


@pytest.mark.parametrize("toolchain", TRITONS)
def test_other_kernels_build_for_sm90_offline(toolchain):
    """Every other kernel compiles for sm_90 as its launcher passes it, with CI's Triton and the GPU
    machine's: the walk kernel (one row; 16 rows with tl.dot, per-row thresholds and the v_t column),
    the compact kernel with programmatic dependent launch (griddepcontrol), with its loop through
    Triton's cp.async pipeline and with the exact top-k select in its programs, R-Sparse's epilogue (one
    row with PDL; 16 rows with tl.dot) and the exact top-k selects (the histogram one also for a bf16
    row over all 32 score bits and over the 15 it can set, and the down rows' 5-bit select at 16 warps)
    -- no function calls, and no stack in the GEMV and epilogue kernels. (The radix select keeps an
    8-byte stack on Triton 3.9: it runs once per row, not in a weight stream.)"""
    builds = _offline_builds(toolchain, "--others")
    assert [b["kernel"] for b in builds] == ["sparse_gemv_kernel"] * 2 + ["sparse_gemv_compact_kernel"] * 4 + \
        ["lowrank_up_kernel"] * 2 + ["topk_threshold_kernel"] + ["topk_threshold_hist_kernel"] * 4
    for build in builds:
        assert build["calls"] == 0, build
        if build["kernel"].startswith(("sparse_gemv", "lowrank")):
            assert build["stack_bytes"] == 0 and build["local_bytes"] == 0, build
    # the compact loop with num_stages 3 (launchers.compact_stages) streams its weight rows through
    # 16-byte cp.async copies, 8 a thread per step of the 2048 x 4 tile at 4 warps, for each of the
    # steps in flight; the hand-pipelined loop (PDL build) through registers
    assert builds[3]["STAGES"] == 3 and builds[3]["cp_async_16b"] >= 2 * 8, builds[3]
    assert builds[2]["cp_async_16b"] == 0, builds[2]
    # the compact kernel with the exact top-k select in its programs (launchers.TOPK_IN_KERNEL) keeps the
    # loop's registers (the row's scores are dead before it) and has no stack (checked above)
    assert [b.get("TOPK_BLOCK") for b in builds[4:6]] == [4096, 4096]
    assert all(b["registers"] <= 168 for b in builds[4:6]), builds[4:6]
    # a bf16 row without a channel scale: 4-bit digits over the 15 score bits that can be set (4 passes)
    # instead of all 32 (8 passes; launchers.score_bit_span): 7704 SASS instructions instead of 12792 with
    # the GPU machine's Triton 3.6, 3584 instead of 5320 with the venv's
    full, span, wide = builds[-3:]
    assert (full["LOW_BIT"], full["TOP_BIT"], span["LOW_BIT"], span["TOP_BIT"]) == (0, 32, 16, 31)
    assert span["sass_instructions"] < 0.7 * full["sass_instructions"], (full, span)
    # the launcher's select for rows above 4096 channels since session 31 (launchers.hist_warps /
    # hist_digit_bits: 5-bit digits at 16 warps): no stack, and under half the 8-warp 4-bit build's
    # instructions (Triton 3.6: 128 registers, 3352 SASS instructions, against 255 registers, a 224-byte
    # stack and 7704; measured 0.96x / 0.89x of dense on the H100's down projections against 1.09x / 1.42x)
    assert (wide["num_warps"], wide["DIGIT_BITS"]) == (16, 5)
    assert wide["stack_bytes"] == 0 and wide["local_bytes"] == 0, wide
    assert wide["sass_instructions"] < 0.5 * span["sass_instructions"], (span, wide)


def test_lowrank_layout_per_config(monkeypatch):
    """The v_t layout comes from the shape's committed config (GemvConfig.lowrank, default
    wide_chunks) unless LOWRANK_LAYOUT forces one; a layout name that does not exist is an error
    that names it."""
    cfg = launchers.GemvConfig(rows=1, block_n=2048, block_k=4, split_k=64, num_warps=4, num_stages=1,
                               kernel="compact")
    assert launchers.lowrank_layout(cfg) == "wide_chunks"
    assert launchers.lowrank_tile(cfg, 176, 64) == launchers.LowrankTile(256, 32, 512)
    pinned = dataclasses.replace(cfg, lowrank="w_tiles")
    assert launchers.lowrank_tile(pinned, 176, 64) == launchers.LowrankTile(2048, 4, 64)
    assert launchers.GemvConfig.from_dict({**dataclasses.asdict(cfg), "lowrank": "own_tiles"}).lowrank == "own_tiles"
    monkeypatch.setattr(launchers, "LOWRANK_LAYOUT", "own_tiles")
    assert launchers.lowrank_tile(pinned, 176, 64) == launchers.LowrankTile(256, 32, 64)
    with pytest.raises(ValueError, match="'diagonal'"):
        dataclasses.replace(cfg, lowrank="diagonal")
    monkeypatch.setattr(launchers, "LOWRANK_LAYOUT", "diagonal")
    with pytest.raises(ValueError, match="LOWRANK_LAYOUT.*'diagonal'"):
        launchers.lowrank_tile(cfg, 176, 64)


@pytest.mark.parametrize("block_n,warps", [(128, 8), (64, 4)])
def test_compact_wide_block(block_n, warps, gen):
    """The compact kernel with 128-row list steps (the widest the sweep could pick)."""
    n, k, m = (64, 300, 2) if not HAS_CUDA else (4096, 11008, 1)
    w, b, _, _, _ = make_layer(n, k, torch.bfloat16, gen)
    x = randn(m, k, gen=gen, dtype=torch.bfloat16)
    thr = threshold_for(x, 0.5, None)
    cfg = launchers.GemvConfig(rows=1, block_n=block_n, block_k=128, split_k=22, num_warps=warps, num_stages=2,
                               kernel="compact")
    out = launchers.sparse_gemv(x, launchers.prepare_weight(w).t(), thr.float(), None, b, None, None, None, cfg)
    check_close(out, reference.sparse_linear(x, w, b, threshold=thr))


# union programs: the tiles benchmarks/gpu/union_rows.py sweeps, at their extremes -- (kernel, rows,
# block_n, block_k, num_warps, num_stages, per): rows 16 = tl.dot, 2 / 4 = the FMA loop
# (compact only); per = K steps per program (walk; 1000 = no split) or the K chunk (compact: the
# union list's chunk)
UNION_TILES = [("walk", 16, 64, 32, 4, 2, 1), ("walk", 16, 128, 64, 4, 3, 4), ("walk", 16, 256, 64, 8, 2, 2),
               ("walk", 16, 64, 128, 4, 4, 8), ("walk", 16, 128, 128, 8, 2, 1000),
               ("compact", 16, 64, 16, 4, 2, 64), ("compact", 16, 128, 32, 4, 3, 256),
               ("compact", 16, 256, 64, 8, 2, 512), ("compact", 16, 128, 16, 4, 1, 128),
               ("compact", 2, 512, 8, 4, 1, 256), ("compact", 2, 64, 16, 4, 1, 2048),
               ("compact", 4, 256, 8, 4, 1, 512), ("compact", 4, 128, 4, 2, 1, 64),
               # FMA loops two list steps ahead (num_stages = the hand pipeline's depth)
               ("compact", 2, 256, 8, 4, 2, 512), ("compact", 4, 128, 8, 4, 2, 128),
               # FMA loops summing each step over K in registers (launchers.fma_step_sum)
               ("compact", 2, 1024, 8, 4, 1, 512), ("compact", 4, 512, 4, 2, 1, 64)]
UNION_SHAPES = [(4096, 11008), (14336, 4096), (1000, 4096)] if HAS_CUDA else [(200, 300)]
UNION_TOKENS = [2, 7, 16] if HAS_CUDA else [3]


def union_config(tile, k: int) -> launchers.GemvConfig:
    kernel, rows, block_n, block_k, warps, stages, per = tile
    split_k = launchers.triton_cdiv(k, per if kernel == "compact" else block_k * per)
    return launchers.GemvConfig(rows=rows, block_n=block_n, block_k=block_k, split_k=split_k,
                                num_warps=warps, num_stages=stages, kernel=kernel)


@pytest.mark.parametrize("list_ahead", [False, True], ids=["list_in_step", "list_ahead"])
@pytest.mark.parametrize("finish", ["fixed", "counter"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9], ids=lambda s: f"s{s}")
@pytest.mark.parametrize("tokens", UNION_TOKENS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("tile", UNION_TILES, ids=lambda t: "{}-r{}-bn{}-bk{}-w{}-st{}-per{}".format(*t))
@pytest.mark.parametrize("shape", UNION_SHAPES, ids=shape_id)
def test_union_configs(shape, tile, tokens, sparsity, finish, list_ahead, gen, monkeypatch):
    """The union programs (every row in one program, a weight row read once if any row selected
    it; walk and compact, the compact loop with its list entries in the step or one step ahead)
    over the tiles the union sweep can commit: each row gets only its own channels, twice in a row
    on the same inputs (bit-identically where the split-K sum is order independent), the workspace
    left zeroed. The walk's first H100 failures (e2a1af1) were intermittent, so the GPU runs repeat it
    (steps files)."""
    if list_ahead and (tile[0] != "compact" or tile[1] < launchers.MAX_ROWS):
        pytest.skip("the list-ahead switch is the union compact kernel's tl.dot loop's (the FMA loop always loads ahead)")
    monkeypatch.setattr(launchers, "FIXED_POINT_SPLIT_ENABLED", finish == "fixed")
    monkeypatch.setattr(launchers, "UNION_LIST_AHEAD", list_ahead)
    n, k = shape
    cfg = union_config(tile, k)
    along_k = launchers.k_split(k, cfg)[1]
    if along_k == 1 and finish == "counter":
        pytest.skip("one program along K has no split-K finish")
    dtype = torch.bfloat16 if tokens % 2 == 0 else torch.float16
    scale = tile[0] == "compact" and tokens % 3 == 0  # R-Sparse scores on some cases
    w, b, s, _, _ = make_layer(n, k, dtype, gen, bias=tokens % 3 == 1, scale=scale)
    x = randn(tokens, k, gen=gen, dtype=dtype)
    thr = threshold_for(x, sparsity, s)
    w_t = launchers.prepare_weight(w).t()
    first = launchers.sparse_gemv(x, w_t, thr.float(), None, b, s, None, None, cfg)
    again = launchers.sparse_gemv(x, w_t, thr.float(), None, b, s, None, None, cfg)
    ref = reference.sparse_linear(x, w, b, threshold=thr, channel_scale=s)
    check_close(first, ref)
    check_close(again, ref)
    if along_k == 1 or launchers.fixed_point_finish(along_k):
        assert torch.equal(first, again), "order-independent split-K sums differ between two runs"
    assert launchers._workspace_for(x.device).is_clean(), "split-K workspace left dirty"


@pytest.mark.parametrize("rows", [16, 4], ids=lambda r: f"rows{r}")
def test_union_compact_topk_and_lowrank_fallback(rows, gen):
    """The union compact kernel (tl.dot and FMA loops) with per-row exact top-k (thresholds and
    tie cuts per row), and a union compact config on a layer with R-Sparse's low-rank term (that
    kernel has no v_t programs: the launcher runs the shape's one-token config, one program per row,
    still exact), and the 16-row union walk that case ran before (union_walk_lowrank_config) too."""
    n, k, m = (96, 200, 5) if not HAS_CUDA else (4096, 11008, 5)
    cfg = union_config(("compact", rows, 64, 16 if rows == 16 else 8, 4, 2, 64), k)
    w, b, s, u, v = make_layer(n, k, torch.bfloat16, gen, rank=20, scale=True)
    x = randn(m, k, gen=gen, dtype=torch.bfloat16)
    keep = k // 3
    thr, jcut = launchers.topk_thresholds(x, keep, s)
    w_t = launchers.prepare_weight(w).t()
    out = launchers.sparse_gemv(x, w_t, thr, jcut, b, s, None, None, cfg)
    check_close(out, reference.masked_linear(x, w, topk_mask_lowest_index(x, keep, s), b))
    thr = threshold_for(x, 0.5, s)
    v_t = launchers.prepare_weight(v).t()
    ref = reference.sparse_linear(x, w, b, threshold=thr, channel_scale=s, lowrank_up=u, lowrank_down=v)
    check_close(launchers.sparse_gemv(x, w_t, thr.float(), None, b, s, u, v_t, cfg), ref)
    walk = launchers.union_walk_lowrank_config(cfg)
    assert walk.rows == launchers.MAX_ROWS and walk.kernel == "walk"
    check_close(launchers.sparse_gemv(x, w_t, thr.float(), None, b, s, u, v_t, walk), ref)
    assert launchers.union_lowrank_config(n, k, 20, x.device, 0.5).rows == 1
    assert launchers._workspace_for(x.device).is_clean(), "split-K workspace left dirty"


@pytest.mark.parametrize("selection", ["threshold", "topk"])
@pytest.mark.parametrize("tile", [t for t in UNION_TILES if t[1] in launchers.UNION_FMA_ROWS and t[5] == 1],
                         ids=lambda t: "{}-r{}-bn{}-bk{}-w{}-st{}-per{}".format(*t))
def test_union_fma_ahead_steps_match_one_step(tile, selection, gen):
    """The FMA union loop with its gathers two list steps ahead of the FMAs (num_stages = 2) gives bit
    for bit what the loop one step ahead gives (the same f32 values meet the same weights in the same
    order), and both match the reference."""
    n, k = UNION_SHAPES[0]
    m = 5
    w, b, s, _, _ = make_layer(n, k, torch.bfloat16, gen, bias=True, scale=True)
    w_t = launchers.prepare_weight(w).t()
    x = randn(m, k, gen=gen, dtype=torch.bfloat16)
    if selection == "threshold":
        thr, jcut = threshold_for(x, 0.6, s).float(), None
        ref = reference.sparse_linear(x, w, b, threshold=thr, channel_scale=s)
    else:
        thr, jcut = launchers.topk_thresholds(x, k // 3, s)
        ref = reference.masked_linear(x, w, topk_mask_lowest_index(x, k // 3, s), b)
    outs = {}
    for ahead in launchers.FMA_AHEAD_STEPS:
        cfg = dataclasses.replace(union_config(tile, k), num_stages=ahead)
        outs[ahead] = launchers.sparse_gemv(x, w_t, thr, jcut, b, s, None, None, cfg)
        check_close(outs[ahead], ref)
    along_k = launchers.k_split(k, union_config(tile, k))[1]
    if along_k == 1 or launchers.fixed_point_finish(along_k):
        for key, out in outs.items():
            assert torch.equal(out, outs[1]), key
    assert launchers._workspace_for(x.device).is_clean(), "split-K workspace left dirty"


def _committed_union_configs() -> list[tuple[str, str, str]]:
    table = launchers.config_table()  # as this GPU reads it (its "by_gpu" entries over the main table)
    return [(band, key, tokens) for band in ("configs", "configs_high") for key, per in table.get(band, {}).items()
            for tokens, cfg in per.items() if cfg["rows"] > 1]


@pytest.mark.skipif(not HAS_CUDA, reason="model-shape configs: GPU only")
@pytest.mark.parametrize("band,key,tokens", _committed_union_configs() or [pytest.param("", "", "", marks=pytest.mark.skip(
    reason="no union config committed"))])
def test_committed_union_configs(band, key, tokens, gen):
    """Every union config of the committed table, on its own shape and token count, at the sparsity
    its band was ranked at (launchers.pick_config runs exactly these)."""
    n, k = (int(part[1:]) for part in key.split("_"))
    m = int(tokens)
    cfg = launchers.GemvConfig.from_dict(launchers.config_table()[band][key][tokens])
    w, b, _, _, _ = make_layer(n, k, torch.bfloat16, gen, bias=False)
    x = randn(m, k, gen=gen, dtype=torch.bfloat16)
    thr = threshold_for(x, 0.9 if band == "configs_high" else 0.5, None)
    out = launchers.sparse_gemv(x, launchers.prepare_weight(w).t(), thr.float(), None, None, None, None, None, cfg)
    check_close(out, reference.sparse_linear(x, w, None, threshold=thr))
    assert launchers._workspace_for(x.device).is_clean(), "split-K workspace left dirty"


def test_unprepared_weight_warns_and_is_correct(gen):
    n, k = 64, 96
    w, b, _, _, _ = make_layer(n, k, torch.float16, gen)
    x = randn(2, k, gen=gen, dtype=torch.float16)
    thr = torch.tensor([0.5], device=DEVICE)
    launchers._warned_layout = False
    with pytest.warns(UserWarning, match="prepare_weight"):
        out = launchers.sparse_linear(x, w, b, thr, -1, None, None, None)
    check_close(out, reference.sparse_linear(x, w, b, threshold=thr))


def test_prepare_weight_layout(gen):
    w = randn(48, 80, gen=gen, dtype=torch.bfloat16)
    p = launchers.prepare_weight(w)
    assert p.shape == w.shape and p.stride() == (1, 48) and torch.equal(p, w)
    assert launchers.prepare_weight(p) is p  # idempotent: no second copy


@pytest.mark.parametrize(
    "case, match",
    [
        ("dtype", "dtype"),
        ("k", "K=65"),
        ("tokens", "tokens"),
        ("keep", "keep must be"),
        ("threshold", "1-element threshold"),
        ("lowrank", "together"),
        ("scale", "channel_scale"),
    ],
)
def test_validation_errors(case, match, gen):
    n, k = 32, 64
    w = launchers.prepare_weight(randn(n, k, gen=gen, dtype=torch.bfloat16))
    x = randn(2, k, gen=gen, dtype=torch.bfloat16)
    thr = torch.tensor([0.1], device=DEVICE)
    args = dict(x=x, weight=w, bias=None, threshold=thr, keep=-1, channel_scale=None,
                lowrank_up=None, lowrank_down=None)
    if case == "dtype":
        args["x"] = x.float()
    elif case == "k":
        args["x"] = randn(2, k + 1, gen=gen, dtype=torch.bfloat16)
    elif case == "tokens":
        args["x"] = randn(launchers.MAX_ROWS + 1, k, gen=gen, dtype=torch.bfloat16)
    elif case == "keep":
        args["keep"] = k + 1
    elif case == "threshold":
        args["threshold"] = torch.zeros(3, device=DEVICE)
    elif case == "lowrank":
        args["lowrank_up"] = randn(n, 4, gen=gen, dtype=torch.bfloat16)
    elif case == "scale":
        args["channel_scale"] = torch.ones(k + 2, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        launchers.sparse_linear(**args)


def test_fma_step_sum_where_every_warp_lies_along_n():
    """The FMA union sums each step over K in registers only where Triton puts every warp of the
    weight tile along N (256 bf16 columns per warp); UNION_TILES holds tiles of both kinds, so the
    union tests run both loops."""
    def step_sum(rows, block_n, warps):
        return launchers.fma_step_sum(launchers.GemvConfig(rows, block_n, 8, 4, warps, 1, kernel="compact"))

    assert step_sum(2, 1024, 4) and step_sum(4, 512, 2) and step_sum(2, 2048, 8)
    assert not step_sum(2, 512, 4) and not step_sum(2, 1024, 8) and not step_sum(16, 1024, 4)
    fma_tiles = [union_config(t, 4096) for t in UNION_TILES if t[1] in launchers.UNION_FMA_ROWS]
    assert {launchers.fma_step_sum(cfg) for cfg in fma_tiles} == {False, True}


@pytest.mark.parametrize("fields,match", [
    (dict(rows=3, kernel="compact"), "rows must be 1, 16 or one of"),
    (dict(rows=8, kernel="compact"), "rows must be 1, 16 or one of"),
    (dict(rows=4, kernel="walk"), "needs kernel='compact'"),
    (dict(rows=2, kernel="compact", num_stages=3), "hand pipeline's depth"),
    (dict(rows=1, kernel="gather"), "kernel must be one of"),
])
def test_gemv_config_errors_name_the_field(fields, match):
    """A config the kernels cannot run (a committed table edited by hand, a benchmark's candidate)
    fails when built, naming the field: 16 rows for tl.dot, 2 / 4 only on the FMA loop."""
    with pytest.raises(ValueError, match=match):
        launchers.GemvConfig(**{"block_n": 64, "block_k": 16, "split_k": 2, "num_warps": 4, "num_stages": 1,
                                **fields})


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("pdl", [False, True], ids=["launch", "pdl"])
@pytest.mark.parametrize("selection", ["threshold", "topk"])
@pytest.mark.parametrize("tokens", [1, 4, 16], ids=lambda m: f"M{m}")
def test_cuda_graph_replay(selection, tokens, pdl, gen, monkeypatch):
    """Captured once, replayed on new inputs: right every time, counters left at zero
    (also with programmatic dependent launch, where the GPU supports it)."""
    monkeypatch.setattr(launchers, "PDL_ENABLED", pdl)
    n, k = 4096, 4096
    dtype = torch.bfloat16
    w, b, s, u, v = make_layer(n, k, dtype, gen, rank=64, scale=True)
    w_p, v_p = launchers.prepare_weight(w), launchers.prepare_weight(v)
    keep = -1 if selection == "threshold" else k // 2
    x_static = randn(tokens, k, gen=gen, dtype=dtype)
    thr = threshold_for(x_static, 0.5, s)
    graph, out_static = _captured(
        lambda: launchers.sparse_linear(x_static, w_p, b, thr, keep, s, u, v_p, use_crossover=False))
    for _ in range(3):
        x_static.copy_(randn(tokens, k, gen=gen, dtype=dtype))
        graph.replay()
        torch.cuda.synchronize()
        if selection == "threshold":
            ref = reference.sparse_linear(x_static, w, b, threshold=thr, channel_scale=s, lowrank_up=u, lowrank_down=v)
        else:
            ref = reference.masked_linear(x_static, w, topk_mask_lowest_index(x_static, keep, s), b, u, v)
        check_close(out_static, ref)
    assert launchers._workspace_for(x_static.device).is_clean()


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("loop", ["dot_list_in_step", "dot_list_ahead", "fma_rows2", "fma_rows4", "fma_ahead2_rows2",
                                  "fma_ahead2_rows4", "fma_step_sum_rows2"])
@pytest.mark.parametrize("selection", ["threshold", "topk"])
@pytest.mark.parametrize("tokens", [3, 16], ids=lambda m: f"M{m}")
def test_union_compact_cuda_graph_replay(selection, tokens, loop, gen, monkeypatch):
    """The union compact kernel (its list and K loop depend on the data; the tl.dot loop with the
    list in the step or ahead, the FMA loop of 2 / 4 rows) captured once and replayed on new
    inputs: right every time, the workspace left zeroed."""
    monkeypatch.setattr(launchers, "UNION_LIST_AHEAD", loop == "dot_list_ahead")
    n, k = 4096, 4096
    if loop.startswith("fma"):
        cfg = union_config(("compact", int(loop[-1]), 1024 if "step_sum" in loop else 256, 8, 4,
                            2 if "ahead2" in loop else 1, 512), k)
        assert launchers.fma_step_sum(cfg) == ("step_sum" in loop)
    else:
        cfg = union_config(("compact", 16, 128, 32, 4, 2, 512), k)
    w, b, s, _, _ = make_layer(n, k, torch.bfloat16, gen, scale=selection == "topk")
    w_t = launchers.prepare_weight(w).t()
    x_static = randn(tokens, k, gen=gen, dtype=torch.bfloat16)
    keep = k // 2
    if selection == "threshold":
        thr = threshold_for(x_static, 0.7, None).float()
        graph, out_static = _captured(lambda: launchers.sparse_gemv(x_static, w_t, thr, None, b, None, None, None, cfg))
    else:
        def run():
            thr_k, jcut = launchers.topk_thresholds(x_static, keep, s)
            return launchers.sparse_gemv(x_static, w_t, thr_k, jcut, b, s, None, None, cfg)
        graph, out_static = _captured(run)
    for _ in range(3):
        x_static.copy_(randn(tokens, k, gen=gen, dtype=torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        if selection == "threshold":
            ref = reference.sparse_linear(x_static, w, b, threshold=thr)
        else:
            ref = reference.masked_linear(x_static, w, topk_mask_lowest_index(x_static, keep, s), b)
        check_close(out_static, ref)
    assert launchers._workspace_for(x_static.device).is_clean()


def _captured(fn):
    """(graph, fn's outputs) of fn captured in a CUDA graph, after one call outside the capture
    (Triton compiles there, not during capture)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = fn()
    return graph, outs


def _check_chain_replays(chain, x_static, layers, thresholds, gen, between=1.0):
    """Capture `chain` (the outputs of a chain of layers fed from x_static) in a CUDA graph,
    replay it on three new inputs, and check each layer against the reference on the input the
    kernel chain gave it (the previous output times `between`); the workspace ends clean."""
    graph, outs_static = _captured(chain)
    for _ in range(3):
        x_static.copy_(randn(*x_static.shape, gen=gen, dtype=x_static.dtype))
        graph.replay()
        torch.cuda.synchronize()
        h = x_static
        for (w, b, s, u, v), thr, out in zip(layers, thresholds, outs_static):
            check_close(out, reference.sparse_linear(h, w, b, threshold=thr, channel_scale=s, lowrank_up=u,
                                                     lowrank_down=v))
            h = out * between if between != 1.0 else out
    assert launchers._workspace_for(x_static.device).is_clean()


@pytest.mark.skipif(not HAS_CUDA, reason="programmatic dependent launch needs a GPU")
@pytest.mark.parametrize("mode", ["pdl", "up_pdl_only"])
@pytest.mark.parametrize("between", ["none", "torch_op"])
def test_pdl_chain_reads_the_previous_result(between, mode, gen, monkeypatch):
    """With programmatic dependent launch a kernel may start before the one it reads from has
    finished: a chain of sparse GEMVs (each one's output the next one's input, optionally a
    torch kernel between them) replayed in a CUDA graph must give the chained reference,
    and leave the workspace clean. Every kernel launched with PDL, or only the R-Sparse
    layers' epilogue launch (up_pdl_only: launchers.LOWRANK_UP_PDL)."""
    monkeypatch.setattr(launchers, "PDL_ENABLED", mode == "pdl")
    monkeypatch.setattr(launchers, "LOWRANK_UP_PDL", mode == "up_pdl_only")
    if not launchers.pdl_capable(torch.device(DEVICE)):
        pytest.skip("this GPU has no programmatic dependent launch (compute capability < 9)")
    n = k = 4096
    layers = [make_layer(n, k, torch.bfloat16, gen, rank=0 if i % 2 else 32, scale=i % 2 == 0) for i in range(4)]
    prepared = [(launchers.prepare_weight(w), b, s, u, launchers.prepare_weight(v) if v is not None else None)
                for w, b, s, u, v in layers]
    x_static = randn(1, k, gen=gen, dtype=torch.bfloat16)
    thresholds = [torch.tensor([0.6], device=DEVICE) for _ in layers]

    def chain():
        h, outs = x_static, []
        for (w_p, b, s, u, v_p), thr in zip(prepared, thresholds):
            h = launchers.sparse_linear(h, w_p, b, thr, launchers.THRESHOLD_SELECTION, s, u, v_p, use_crossover=False)
            outs.append(h)
            if between == "torch_op":
                h = h * 0.5
        return outs

    _check_chain_replays(chain, x_static, layers, thresholds, gen, 0.5 if between == "torch_op" else 1.0)


@pytest.mark.parametrize("switch", ["pdl", "lowrank_up_pdl"])
@pytest.mark.parametrize("raw,expected", [("", False), ("0", False), ("1", True), ("on", True), ("maybe", None)])
def test_pdl_switch(raw, expected, switch, monkeypatch):
    """RSPARSE_PDL (every kernel) and RSPARSE_LOWRANK_UP_PDL (R-Sparse's epilogue launch): 1 / 0
    (unset: off), anything else a clear error; never on the interpreter."""
    knob, env, requested, used = {
        "pdl": ("PDL_ENABLED", launchers.PDL_ENV, launchers.pdl_requested, launchers.use_pdl),
        "lowrank_up_pdl": ("LOWRANK_UP_PDL", launchers.LOWRANK_UP_PDL_ENV, launchers.lowrank_up_pdl_requested,
                           launchers.lowrank_up_pdl)}[switch]
    monkeypatch.setattr(launchers, knob, None)
    monkeypatch.setenv(env, raw)
    if expected is None:
        with pytest.raises(ValueError, match=f"{env}='maybe': expected 1"):
            requested()
        return
    assert requested() is expected
    if not HAS_CUDA:
        assert not used(torch.device("cpu"))


def test_union_rows_switch(monkeypatch):
    """RSPARSE_UNION_ROWS (how M > 1 rows run) picks its mode when launchers.UNION_ROWS is None
    (unset: the default); a name that is not a mode is an error naming the variable, the value
    and the modes; the module setting wins."""
    knob, env, mode, default, modes = ("UNION_ROWS", launchers.UNION_ROWS_ENV, launchers.union_rows_mode,
                                       launchers.UNION_ROWS_DEFAULT, launchers.UNION_ROWS_MODES)
    assert default == "table"
    monkeypatch.setattr(launchers, knob, None)
    monkeypatch.delenv(env, raising=False)
    assert mode() == default
    other = modes[-1]
    for raw, expected in ((other, other), (f" {modes[1].upper()} ", modes[1]), ("", default)):
        monkeypatch.setenv(env, raw)
        assert mode() == expected
    monkeypatch.setenv(env, "sideways")
    with pytest.raises(ValueError, match=f"{env}='sideways': expected one of {', '.join(modes)}"):
        mode()
    monkeypatch.setattr(launchers, knob, other)
    assert mode() == other
    monkeypatch.setattr(launchers, knob, "sideways")
    with pytest.raises(ValueError, match=f"{knob} must be one of"):
        mode()


def _fake_table(monkeypatch, per_shape: dict):
    """sparse_gemv.json replaced by one shape's {tokens: config}, as if on a GPU."""
    real = launchers._load_json

    def fake(name):
        return {"configs": {"N64_K96": per_shape}} if name == launchers._CONFIG_FILE else real(name)

    monkeypatch.setattr(launchers, "_load_json", fake)
    monkeypatch.setattr(launchers, "_sm_count", lambda index: 132)


@pytest.mark.parametrize("mode", ["table", "on", "off"])
def test_union_rows_config_choice(mode, monkeypatch):
    """The committed table says per (shape, token count) whether rows run per-row or as one union
    program; "on" / "off" override it for M > 1 only (one token is always one row)."""
    one = dict(rows=1, block_n=64, block_k=32, split_k=3, num_warps=4, num_stages=1, kernel="compact")
    union = dict(rows=16, block_n=128, block_k=64, split_k=2, num_warps=4, num_stages=3)
    _fake_table(monkeypatch, {"1": one, "2": union, "4": one, "16": one})
    monkeypatch.setattr(launchers, "UNION_ROWS", mode)
    cuda = torch.device("cuda", 0)
    rows = {t: launchers.pick_config(64, 96, t, 0, cuda).rows for t in (1, 2, 3, 16)}
    assert rows[1] == 1
    expected = {"table": {2: 16, 3: 1, 16: 1}, "on": {2: 16, 3: 16, 16: 16}, "off": {2: 1, 3: 1, 16: 1}}[mode]
    assert {t: rows[t] for t in (2, 3, 16)} == expected
    if mode == "on":
        # the committed union config (the nearest measured token count), not the heuristic's
        assert launchers.pick_config(64, 96, 16, 0, cuda) == launchers.GemvConfig.from_dict(union)
    if mode == "off":
        assert launchers.pick_config(64, 96, 2, 0, cuda) == launchers.GemvConfig.from_dict(one)
    # no committed union config: "on" falls back to the heuristic union config
    _fake_table(monkeypatch, {"1": one, "16": one})
    assert launchers.pick_config(64, 96, 16, 0, cuda).rows == (16 if mode == "on" else 1)


def test_crossover_interpolates_between_measured_sparsities():
    """A module between two measured sparsity levels gets the crossover of the interpolated
    sparse/dense ratio; sparse must win by launchers.DISPATCH_MAX_RATIO."""
    ratios = {"0": {"1": 1.05, "2": 1.6}, "0.5": {"1": 0.70, "2": 0.99}, "0.9": {"1": 0.45, "2": 0.5}}
    assert launchers._interpolated_crossover(ratios, 0.0) == 0
    assert launchers._interpolated_crossover(ratios, 0.4) == 1  # 1.05 + 0.8 * (0.70 - 1.05) = 0.77
    assert launchers._interpolated_crossover(ratios, 0.5) == 1  # 0.99 at 2 tokens: inside the margin
    assert launchers._interpolated_crossover(ratios, 0.9) == 2
    assert launchers._interpolated_crossover(ratios, 0.95) == 2  # above the last level: its ratios
    # the committed H100 table: Llama-2 qkv at 0.4 runs the kernel at 1 token (an s = 0 column
    # alone would send it to dense), and no shape runs sparse at s = 0
    assert launchers.crossover_tokens(12288, 4096, "threshold", 0.4) == 1
    assert launchers.crossover_tokens(12288, 4096, "threshold", 0.0) == 0
    assert launchers.crossover_tokens(123, 456, "threshold", 0.5) is None


def test_op_dispatch_at_the_modules_sparsity(monkeypatch):
    """The op's own token limit is the crossover at the sparsity the LinearMethod passes (the limit
    it caps max_sparse_tokens with), not the table's design sparsity: a module at 0.9 whose kernels
    win at 2 tokens runs them at 2 tokens even where a module at 0.5 would not; no sparsity given:
    the design sparsity; with a low-rank term the R-Sparse table where the shape has one."""
    table = {"design_sparsity": 0.5, "ratios": {
        "threshold": {"N64_K96": {"0": {"1": 1.0, "2": 1.6}, "0.5": {"1": 0.7, "2": 1.1}, "0.9": {"1": 0.3, "2": 0.5}}},
        "threshold_lowrank": {"N64_K96": {"0.5": {"1": 1.2}}}}}
    real = launchers._load_json
    monkeypatch.setattr(launchers, "_load_json", lambda name: table if name == launchers._DISPATCH_FILE else real(name))
    assert launchers._dispatch_tokens(64, 96, "threshold") == 1
    assert launchers._dispatch_tokens(64, 96, "threshold", 0.5) == 1
    assert launchers._dispatch_tokens(64, 96, "threshold", 0.9) == 2
    assert launchers._dispatch_tokens(64, 96, "threshold", 0.5, lowrank=True) == 0


def test_dispatch_table_per_gpu(monkeypatch):
    """Entries re-measured on another GPU (dispatch.json "by_gpu") replace the table's own entries of
    their selection on that GPU only; other selections and other GPUs read the main table."""
    table = {"gpu": "GPU A", "crossover": {}, "ratios": {
        "threshold": {"N64_K96": {"0.5": {"1": 0.7, "2": 0.9}}},
        "topk": {"N64_K96": {"0.5": {"1": 1.3}}}},
        "by_gpu": {"GPU B": {"ratios": {"topk": {"N64_K96": {"0.5": {"1": 0.8, "2": 1.2}}}}}}}
    real = launchers._load_json
    monkeypatch.setattr(launchers, "_load_json", lambda name: table if name == launchers._DISPATCH_FILE else real(name))
    for gpu, topk in (("GPU A", 0), ("GPU B", 1), (None, 0), ("GPU C", 0)):
        monkeypatch.setattr(launchers, "_gpu_name", lambda gpu=gpu: gpu)
        assert launchers.crossover_tokens(64, 96, "topk", 0.5) == topk, gpu
        assert launchers._dispatch_tokens(64, 96, "topk") == topk, gpu
        assert launchers.crossover_tokens(64, 96, "threshold", 0.5) == 2, gpu
    assert launchers.dispatch_table("GPU A") is table  # nothing to merge: the table itself


def test_config_table_per_gpu(monkeypatch):
    """Configs re-measured on another GPU (sparse_gemv.json "by_gpu") replace the main table's entry
    of their (shape, token count, band) on that GPU only; the other token counts, shapes and GPUs
    read the main table, and an overlaid band boundary ("high_from") moves that GPU's band."""
    def cfg(block_n):
        return {"rows": 1, "block_n": block_n, "block_k": 16, "split_k": 4, "num_warps": 4, "num_stages": 1,
                "kernel": "compact"}
    table = {"gpu": "GPU A",
             "configs": {"N64_K96": {"1": cfg(64), "2": cfg(32)}, "N32_K96": {"1": cfg(16)}},
             "configs_high": {"N64_K96": {"1": cfg(128)}},
             "high_from": {"N64_K96": 0.7},
             "by_gpu": {"GPU B": {"configs": {"N64_K96": {"1": cfg(256)}}, "high_from": {"N64_K96": 0.8}}}}
    real = launchers._load_json
    monkeypatch.setattr(launchers, "_load_json", lambda name: table if name == launchers._CONFIG_FILE else real(name))
    cuda = torch.device("cuda")
    for gpu, one_token in (("GPU A", 64), ("GPU B", 256), (None, 64), ("GPU C", 64)):
        monkeypatch.setattr(launchers, "_gpu_name", lambda gpu=gpu: gpu)
        assert launchers.pick_config(64, 96, 1, 0, cuda, 0.5).block_n == one_token, gpu
        assert launchers.pick_config(64, 96, 2, 0, cuda, 0.5).block_n == 32, gpu
        assert launchers.pick_config(32, 96, 1, 0, cuda, 0.5).block_n == 16, gpu
        # at 0.75 GPU B is still in the design band (its boundary is 0.8), the others in the high band
        assert launchers.pick_config(64, 96, 1, 0, cuda, 0.75).block_n == (256 if gpu == "GPU B" else 128), gpu
    assert launchers.config_table("GPU A") is table  # nothing to merge: the table itself
    assert table["configs"]["N64_K96"]["1"] == cfg(64)  # the merge copies, never writes the cached table


def test_table_views_are_memoized_per_table_object(monkeypatch):
    """Outside CUDA graphs the op looks up its config and its dense/sparse limit on every call: the
    merged per-GPU views and the answers derived from them are computed once per table object, and a
    table swapped in (another RSPARSE_CONFIG_DIR, a test's new dict) is read afresh, never a stale answer."""
    def cfg(block_n):
        return {"rows": 1, "block_n": block_n, "block_k": 16, "split_k": 4, "num_warps": 4, "num_stages": 1,
                "kernel": "compact"}

    def configs(block_n):
        return {"gpu": "GPU A", "configs": {"N64_K96": {"1": cfg(64)}},
                "by_gpu": {"GPU B": {"configs": {"N64_K96": {"1": cfg(block_n)}}}}}

    def dispatch(ratio):
        return {"gpu": "GPU A", "ratios": {"threshold": {"N64_K96": {"0.5": {"1": 1.2}}}},
                "by_gpu": {"GPU B": {"ratios": {"threshold": {"N64_K96": {"0.5": {"1": ratio}}}}}}}

    tables = {launchers._CONFIG_FILE: configs(256), launchers._DISPATCH_FILE: dispatch(0.7)}
    monkeypatch.setattr(launchers, "_load_json", lambda name: tables[name])
    monkeypatch.setattr(launchers, "_gpu_name", lambda: "GPU B")
    cuda = torch.device("cuda")
    config_view, dispatch_view = launchers.config_table(), launchers.dispatch_table()
    assert launchers.config_table() is config_view and launchers.dispatch_table() is dispatch_view
    assert launchers.pick_config(64, 96, 1, 0, cuda, 0.5).block_n == 256
    assert launchers.crossover_tokens(64, 96, "threshold", 0.5) == 1
    assert launchers.pick_config(64, 96, 1, 0, cuda, 0.5) is launchers.pick_config(64, 96, 1, 0, cuda, 0.5)
    tables.update({launchers._CONFIG_FILE: configs(128), launchers._DISPATCH_FILE: dispatch(1.1)})
    assert launchers.config_table() is not config_view
    assert launchers.pick_config(64, 96, 1, 0, cuda, 0.5).block_n == 128
    assert launchers.crossover_tokens(64, 96, "threshold", 0.5) == 0
    monkeypatch.setattr(launchers, "_gpu_name", lambda: "GPU A")  # the same table read by another GPU
    assert launchers.pick_config(64, 96, 1, 0, cuda, 0.5).block_n == 64
    assert launchers.crossover_tokens(64, 96, "threshold", 0.5) == 0
    # the low-rank term's choice of config at more than one token, from the same table
    monkeypatch.setattr(launchers, "_gpu_name", lambda: "GPU B")
    lowrank = {"threshold_lowrank": {"N64_K96": {"0.5": {"2": 0.9}}},
               "threshold_lowrank_one_token": {"N64_K96": {"0.5": {"2": 0.8}}}}
    tables[launchers._DISPATCH_FILE] = {**dispatch(0.7), "ratios": lowrank}
    assert launchers.lowrank_rows_one_token(64, 96, 2, 0.5)
    assert launchers.crossover_tokens(64, 96, "threshold", 0.5, lowrank=True) == 2
    tables[launchers._DISPATCH_FILE] = {**dispatch(0.7), "ratios": {
        **lowrank, "threshold_lowrank_one_token": {"N64_K96": {"0.5": {"2": 0.99}}}}}
    assert not launchers.lowrank_rows_one_token(64, 96, 2, 0.5)
    assert launchers.crossover_tokens(64, 96, "threshold", 0.5, lowrank=True) == 2


def test_committed_topk_dispatch_h100():
    """LaRoSA's exact top-k with the histogram select the launcher runs (5-bit digits, 16 warps above
    4096 channels), measured on the H100 through the launcher (session 32, kernels_committed_s32_h100.json,
    merged with committed_kernels.py --merge-topk): at 0.5 and one token every shape is within the 5%
    margin of dense or better -- qkv 0.75x / 0.91x, gate_up 0.57x / 0.60x, Llama-3 down 0.89x, and at the
    margin o_proj 0.95x and Llama-2 down 0.94x (0.96x / 0.96x in session 31); at two tokens Llama-2 gate_up
    only (0.89x). The H200's entries (the earlier select: dense everywhere) stay the table's own."""
    h100 = "NVIDIA H100 80GB HBM3"
    table = launchers.dispatch_table(h100)
    ratios = table["ratios"]["topk"]
    run = json.loads((RESULTS / "kernels_committed_s32_h100.json").read_text())
    assert ratios == load_benchmark("bench_kernels.py").ratio_table(
        [r for r in run["results"] if r["method"] == "larosa"])["topk"]
    limit = lambda n, k, s=0.5: launchers._interpolated_crossover(ratios[launchers._shape_key(n, k)], s)  # noqa: E731
    for n, k in [(12288, 4096), (4096, 4096), (4096, 11008), (6144, 4096), (28672, 4096), (4096, 14336)]:
        assert limit(n, k) == 1, (n, k)
    assert limit(22016, 4096) == 2
    assert limit(4096, 4096, 0.3) == 0  # 1.07x at 0.3
    assert launchers.hist_warps(launchers.triton_next_power_of_2(11008)) == 16
    assert launchers.hist_warps(4096) == 8 and launchers.hist_digit_bits(16384) == 5
    main = launchers.dispatch_table("NVIDIA H200")
    assert main["gpu"] == "NVIDIA H200"
    assert all(v == {"0.5": 0} for v in main["crossover"]["topk"].values())


def test_committed_threshold_tables_h100(monkeypatch):
    """The H100's TEAL tables (session 32): union_rows.py --kernels fma --fma-stages 1 2 on the H100
    (union_rows_fma_depth_h100.json) adopted under the tables' by_gpu entries -- its 2-16 token choices
    and their ratios -- with the one-token ratios of committed_kernels.py's teal rows on the same card
    (kernels_committed_s32_h100.json). The H100 streams fewer bytes per microsecond than the H200 the
    main tables were measured on, so the kernels' fixed cost weighs less: at 0.5 two tokens beat dense
    on Llama-2 qkv (0.89x), gate_up (0.79x), down (0.87x) and Llama-3 gate_up (0.91x), down (0.89x),
    where the H200 goes dense from two tokens on. The report is the run's."""
    union_rows = load_benchmark("gpu/union_rows.py")
    run = json.loads((RESULTS / "union_rows_fma_depth_h100.json").read_text())
    assert union_rows.report_choices(run) == (RESULTS / "union_rows_fma_depth_h100.md").read_text()
    h100 = run["gpu"]
    one_token = union_rows.one_token_ratios(json.loads((RESULTS / "kernels_committed_s32_h100.json").read_text()), h100)
    configs, ratios = launchers.config_table(h100), launchers.dispatch_table(h100)["ratios"]["threshold"]
    chosen = union_rows.choices_at_ranking(run["rows"])
    for row in run["rows"]:
        key = launchers._shape_key(row["n"], row["k"])
        choice = chosen[key, row["band"], row["tokens"]]
        if row["sparsity"] == union_rows.BAND_SPARSITY[row["band"]]:
            assert (launchers.GemvConfig.from_dict(configs[row["band"]][key][str(row["tokens"])])
                    == launchers.GemvConfig.from_dict(union_rows.choice_config(row, choice)))
        if row["sparsity"] in union_rows.RATIO_LEVELS:
            expected = union_rows.choice_us(row, choice) / row["dense_us"]
            assert ratios[key][f"{row['sparsity']:g}"][str(row["tokens"])] == round(expected, 4)
    for key, by_level in one_token.items():
        for level, ratio in by_level.items():
            assert ratios[key][level]["1"] == ratio
    shapes = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (6144, 4096), (28672, 4096), (4096, 14336)]
    for gpu, expected in [(h100, [2, 1, 2, 2, 1, 2, 2]), ("NVIDIA H200", [1] * 7)]:
        monkeypatch.setattr(launchers, "_gpu_name", lambda: gpu)  # the GPU the LinearMethod runs on
        assert [launchers.crossover_tokens(n, k, "threshold", 0.5) for n, k in shapes] == expected, gpu
    assert launchers.config_table("NVIDIA H200") == launchers._load_json(launchers._CONFIG_FILE)


def test_config_band_boundary_per_shape():
    """A module at or above its shape's measured boundary ("high_from" of sparse_gemv.json, H200,
    fixed_cost_h200.json, fixed-point finish) runs the configs ranked at 0.9, below it the 0.5-ranked ones; shapes
    without a measured boundary switch at launchers.HIGH_SPARSITY_FROM."""
    table = launchers.config_table()  # on a GPU with "by_gpu" entries, as that GPU reads the table
    cuda = torch.device("cuda")  # the committed tables are read for a CUDA device only

    def band(n, k, sparsity):
        cfg = launchers.pick_config(n, k, 1, 0, cuda, sparsity)
        key = launchers._shape_key(n, k)
        return [b for b in ("configs", "configs_high") if launchers.GemvConfig.from_dict(table[b][key]["1"]) == cfg]

    # Llama-2 qkv: the 0.5-ranked config is 7-12% faster up to 0.8 (narrower tiles, more programs);
    # the 0.9-ranked one wins from the crossing at 0.82 on
    assert launchers.high_sparsity_from(12288, 4096) == table["high_from"]["N12288_K4096"] > 0.8
    assert band(12288, 4096, 0.8) == ["configs"]
    assert band(12288, 4096, 0.9) == ["configs_high"]
    assert band(12288, 4096, None) == ["configs"]
    # Llama-2 gate_up has no boundary of its own (the 0.9-ranked config within 2% up to 0.7,
    # faster from 0.8): the default
    assert launchers.high_sparsity_from(22016, 4096) == launchers.HIGH_SPARSITY_FROM
    assert band(22016, 4096, launchers.HIGH_SPARSITY_FROM) == ["configs_high"]
    assert band(22016, 4096, 0.5) == ["configs"]


def test_crossover_lowrank_table():
    """Modules with R-Sparse's low-rank term are dispatched by their own table, measured on the
    H200 at R-Sparse 0.4 / 0.5 / 0.7 / 0.9 (input sparsity 0.46 / 0.55 / 0.73 / 0.91, the exported
    16-aligned ranks, each shape's v_t layout at its band and chunks; lowrank_h200_s*.json,
    session 17 at 3129cd1): o_proj loses to dense with the term up to 0.55 (0.96x, inside the
    0.95 margin) and wins from 0.73 (0.83x), Llama-3 qkv wins from 0.55 only, every other shape
    at every level; between the levels the ratio is interpolated; shapes without a low-rank
    entry use the threshold table."""
    for s in (0.46, 0.55):
        assert launchers.crossover_tokens(4096, 4096, "threshold", s, lowrank=True) == 0
        assert launchers.crossover_tokens(4096, 4096, "threshold", s) >= 1
    for s in (0.73, 0.91):
        assert launchers.crossover_tokens(4096, 4096, "threshold", s, lowrank=True) == 1
    # Llama-3 qkv: 1.12 of dense at 0.459 (dense), 0.83 at 0.546 (kernels)
    assert launchers.crossover_tokens(6144, 4096, "threshold", 0.46, lowrank=True) == 0
    assert launchers.crossover_tokens(6144, 4096, "threshold", 0.55, lowrank=True) == 1
    for n, k in [(12288, 4096), (22016, 4096), (28672, 4096), (4096, 11008), (4096, 14336)]:
        for s in (0.46, 0.55, 0.73, 0.91):
            assert launchers.crossover_tokens(n, k, "threshold", s, lowrank=True) == 1
    assert launchers.crossover_tokens(123, 456, "threshold", 0.5, lowrank=True) is None


def test_lowrank_ratios_transferred_to_another_gpu():
    """benchmarks/gpu/lowrank_time.transferred_ratios: the low-rank term's extra time measured
    on one GPU is added, in microseconds, to another GPU's measured threshold ratios."""
    lowrank_time = _lowrank_time_module()
    measured = [{"n": 64, "k": 32, "input_sparsity": 0.55, "dense_us": 20.0, "teal_us": 12.0, "lowrank16_us": 16.0}]
    sweep = [{"method": "teal", "tokens": 1, "n": 64, "k": 32, "sparsity": s, "dense_ms": 0.010, "sparse_ms": ms}
             for s, ms in [(0.0, 0.011), (0.5, 0.008), (0.9, 0.004)]]
    sweep += [{"method": "teal", "tokens": 2, "n": 64, "k": 32, "sparsity": 0.5, "dense_ms": 0.010, "sparse_ms": 0.02},
              {"method": "larosa", "tokens": 1, "n": 64, "k": 32, "sparsity": 0.5, "dense_ms": 0.010, "sparse_ms": 0.03}]
    table = lowrank_time.transferred_ratios(measured, sweep)
    # 4 us extra on a 10 us dense GEMV: +0.4 at every level; 0.55 interpolated between 0.5 and 0.9
    assert table == {"N64_K32": {"0": {"1": 1.5}, "0.5": {"1": 1.2}, "0.55": {"1": 1.15}, "0.9": {"1": 0.8}}}
    assert lowrank_time.transferred_ratios(measured, []) == {}


def _lowrank_time_module():
    return load_benchmark("gpu/lowrank_time.py")


@pytest.mark.skipif(HAS_CUDA, reason="the CPU check of a GPU script, under the interpreter")
def test_lowrank_time_tokens_row_under_the_interpreter(monkeypatch, gen):
    """lowrank_time.time_tokens (--tokens) on a tiny layer: where the picked config of a T-token step is a
    union one, its path with the term (one-row programs, launchers.union_lowrank_config) and the 16-row union
    walk it ran before are both timed and agree; the row says which config ran. Timings are fake here."""
    lowrank_time = _lowrank_time_module()
    monkeypatch.setattr(lowrank_time, "graph_us", lambda calls: [c() for c in calls] and 1.0)
    n, k, rank = 64, 96, 16
    w, _, _, u, v = make_layer(n, k, torch.bfloat16, gen, rank=rank)
    layers = [(w, launchers.prepare_weight(w), *launchers.prepare_lowrank(u, v))]
    union = launchers.GemvConfig(rows=2, block_n=32, block_k=16, split_k=2, num_warps=4, num_stages=1, kernel="compact")
    real_pick = launchers.pick_config
    monkeypatch.setattr(launchers, "pick_config", lambda n, k, tokens, *a, **kw: union if tokens > 1 else real_pick(
        n, k, tokens, *a, **kw))
    row = lowrank_time.time_tokens("tiny/o", n, k, rank, 48, 2, layers, gen)
    assert row["tokens"] == 2 and set(row["paths_us"]) == {"tokens_config", "union_walk"}
    assert row["paths_max_diff"]["union_walk"] < 0.05
    assert row["config"]["rows"] == 1 and row["picked_config"]["rows"] == 2
    assert row["lowrank16_us"] == row["paths_us"]["tokens_config"]
    monkeypatch.setattr(launchers, "pick_config", real_pick)
    row = lowrank_time.time_tokens("tiny/o", n, k, rank, 48, 4, layers, gen)
    assert set(row["paths_us"]) == {"tokens_config", "one_token_config"} and row["config"] == row["picked_config"]


def test_lowrank_merge_and_report_with_tokens(tmp_path):
    """--tokens rows merge under their token count beside the one-token entries of the same level (files of one
    level may be split: one-token rows in one, more tokens in another), and the report lists them in their own
    table after the one-token one, which stays as it was. Rows that timed the shape's one-token config fill the
    second table (ratios["threshold_lowrank_one_token"]); where the picked config was a union one (union_walk
    timed), the token config's time is the one-token config's. Files before session 34 call the token config's
    path "launcher"; later ones "tokens_config"."""
    lowrank_time = _lowrank_time_module()
    # a committed shape: the report marks the layout its config runs
    one = {"n": 4096, "k": 4096, "shape": "t/o", "rank": 16, "input_sparsity": 0.55, "sparsity_passed": True,
           "dense_us": 10.0, "teal_us": 6.0, "lowrank16_us": 8.0, "up_only_us": 2.0,
           "variants_us": {v: 8.0 for v in lowrank_time.TILE_VARIANTS}}
    two = {"n": 4096, "k": 4096, "shape": "t/o", "rank": 16, "tokens": 2, "input_sparsity": 0.55, "dense_us": 10.0,
           "teal_us": 8.0, "lowrank16_us": 9.0, "paths_us": {"launcher": 9.0, "union_walk": 14.0},
           "config": {"rows": 1, "kernel": "compact", "block_n": 8, "split_k": 1}}
    four = {**two, "tokens": 4, "lowrank16_us": 12.0, "paths_us": {"tokens_config": 12.0, "one_token_config": 11.0}}
    head = {"gpu": "GPU X", "sparsity": 0.5, "share": 0.9, "commit": "c"}
    files = [tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"]
    files[0].write_text(json.dumps({**head, "rows": [one]}))
    files[1].write_text(json.dumps({**head, "rows": [two]}))
    files[2].write_text(json.dumps({**head, "commit": "d", "rows": [four]}))
    dispatch = tmp_path / "dispatch.json"
    dispatch.write_text(json.dumps({"ratios": {"threshold_lowrank_one_token": {"N8_K8": {"0.5": {"2": 0.5}}}}}))
    lowrank_time.merge_dispatch([str(f) for f in files], str(dispatch), "wtiles")
    merged = json.loads(dispatch.read_text())
    assert merged["ratios"]["threshold_lowrank"] == {"N4096_K4096": {"0.55": {"1": 0.8, "2": 0.9, "4": 1.2}}}
    # rebuilt from the files alone: the earlier table's shape is gone
    assert merged["ratios"]["threshold_lowrank_one_token"] == {"N4096_K4096": {"0.55": {"2": 0.9, "4": 1.1}}}
    assert "at 1, 2 and 4 tokens" in merged["lowrank_note"] and "lowrank_rows_one_token" in merged["lowrank_note"]
    text = lowrank_time.report([str(f) for f in files])
    assert text.startswith(lowrank_time.report([str(files[0])]).rstrip("\n"))
    # `*`: what the launcher runs with the committed table, which has no second table for GPU X's table
    assert "| 0.5 | t/o | 2 | 16 | 0.550 | 10.0 | 0.80 | 0.90* (9.0) | 1.40 (14.0) | - | rows 1, compact" in text
    assert "| 0.5 | t/o | 4 | 16 | 0.550 | 10.0 | 0.80 | 1.20* (12.0) | - | 1.10 (11.0) | rows 1, compact" in text


def test_union_rows_report_and_tables_match_committed_files():
    """benchmarks/results/union_rows_h200.md is what union_rows --report makes of session 16's runs;
    the 2-16 token configs of the committed table and the dispatch table's 2-16 token threshold
    ratios of the measured shapes and levels are what union_rows --adopt derives from the newest run
    (union_rows_fma_sum_h200.json, session 21: per point the committed config, per-row or the FMA union,
    whichever union_rows.choose takes); the FMA runs' reports (sessions 20-21) are their JSON's."""
    union_rows = load_benchmark("gpu/union_rows.py")
    data = json.loads((RESULTS / "union_rows_h200.json").read_text())
    walk = json.loads((RESULTS / "union_rows_h200_walk.json").read_text())
    assert union_rows.report(data, walk) == (RESULTS / "union_rows_h200.md").read_text()
    for name in ["union_rows_fma_h200", "union_rows_fma_staged_h200", "union_rows_fma_ahead_h200",
                 "union_rows_fma_sum_h200"]:
        run = json.loads((RESULTS / f"{name}.json").read_text())
        assert union_rows.report_choices(run) == (RESULTS / f"{name}.md").read_text(), name
    newest = json.loads((RESULTS / "union_rows_fma_sum_h200.json").read_text())
    table = launchers._load_json(launchers._CONFIG_FILE)
    ratios = launchers._load_json(launchers._DISPATCH_FILE)["ratios"]["threshold"]
    chosen = union_rows.choices_at_ranking(newest["rows"])
    for row in newest["rows"]:
        if row["sparsity"] == union_rows.BAND_SPARSITY[row["band"]]:
            key = launchers._shape_key(row["n"], row["k"])
            choice = chosen[key, row["band"], row["tokens"]]
            assert (launchers.GemvConfig.from_dict(table[row["band"]][key][str(row["tokens"])])
                    == launchers.GemvConfig.from_dict(union_rows.choice_config(row, choice)))
    assert set(chosen.values()) == {"committed", "per-row", "union"}
    for row in newest["rows"]:
        if row["sparsity"] in union_rows.RATIO_LEVELS:
            key = launchers._shape_key(row["n"], row["k"])
            expected = union_rows.choice_us(row, chosen[key, row["band"], row["tokens"]]) / row["dense_us"]
            assert ratios[key][f"{row['sparsity']:g}"][str(row["tokens"])] == round(expected, 4)


def test_union_rows_choice_keeps_the_committed_config_within_the_margin():
    """union_rows.choose: the committed config stays unless per-row or the union is 3% faster; a
    union that disagrees with per-row beyond bf16 rounding is never taken; runs before session 20
    (no committed time) compare with per-row."""
    union_rows = load_benchmark("gpu/union_rows.py")
    row = {"committed_us": 10.0, "per_row_us": 9.8, "union_us": 9.9, "union_max_rel_err_vs_per_row": 1e-3}
    assert union_rows.choose(row) == "committed"
    assert union_rows.choose({**row, "per_row_us": 9.0}) == "per-row"
    assert union_rows.choose({**row, "per_row_us": 9.0, "union_us": 8.0}) == "union"
    assert union_rows.choose({**row, "union_us": 8.0, "union_max_rel_err_vs_per_row": 0.1}) == "committed"
    assert union_rows.choose({"per_row_us": 10.0, "union_us": 9.0, "union_max_rel_err_vs_per_row": 0.0}) == "union"


@pytest.mark.skipif(HAS_CUDA, reason="the dry run is the CPU check of a GPU script")
def test_union_rows_script_dry_run(tmp_path):
    """benchmarks/gpu/union_rows.py end to end on a tiny shape under the interpreter (fake timings):
    the sweep, the list-ahead A/B, --adopt's two tables (also from a JSON) and --report run
    before GPU time is spent."""
    import subprocess
    import sys

    script = BENCHMARKS / "gpu" / "union_rows.py"
    env = {**os.environ, "RSPARSE_BENCH_DRY": "1", "TRITON_INTERPRET": "1"}
    out = tmp_path / "u.json"
    subprocess.run([sys.executable, str(script), "--list-ahead", "--adopt", str(tmp_path / "tables"), "--out", str(out)],
                   check=True, env=env, capture_output=True, timeout=600)
    data = json.loads(out.read_text())
    assert data["union_list_ahead"] and any("union_other_list_ahead_us" in r for r in data["rows"])
    for name in (launchers._CONFIG_FILE, launchers._DISPATCH_FILE):
        assert json.loads((tmp_path / "tables" / name).read_text())
    subprocess.run([sys.executable, str(script), "--report", str(out), "--out", str(tmp_path / "u.md")],
                   check=True, env=env, capture_output=True, timeout=120)
    assert (tmp_path / "u.md").read_text().startswith("# Decode steps of 2-16 tokens")
    # the FMA family alone, and its tables re-derived offline from the JSON
    fma = tmp_path / "fma.json"
    subprocess.run([sys.executable, str(script), "--kernels", "fma", "--fma-stages", "1", "2", "--out", str(fma)],
                   check=True, env=env, capture_output=True, timeout=600)
    data = json.loads(fma.read_text())
    rows = data["rows"]
    assert all(r["union_config"]["rows"] in launchers.UNION_FMA_ROWS for r in rows) and data["fma_stages"] == [1, 2]
    subprocess.run([sys.executable, str(script), "--adopt-from", str(fma), "--adopt", str(tmp_path / "fma_tables"),
                    "--out", os.devnull], check=True, env=env, capture_output=True, timeout=120)
    assert json.loads((tmp_path / "fma_tables" / launchers._DISPATCH_FILE).read_text())["union_note"]


def test_union_rows_fma_stages_rank_both_depths(monkeypatch):
    """union_rows.py --fma-stages 1 2 puts every FMA candidate in the pool at both pipeline depths, the
    wide per-step-sum tiles included (their depth 2 was never timed: docs/kernels.md, session 27)."""
    union_rows = load_benchmark("gpu/union_rows.py")
    one = union_rows.union_candidates(4096, 11008, 132, ("fma",), 4)
    monkeypatch.setattr(union_rows, "FMA_STAGES", [1, 2])
    both = union_rows.union_candidates(4096, 11008, 132, ("fma",), 4)
    assert {c.num_stages for c in one} == {1} and len(both) == 2 * len(one)
    assert {dataclasses.replace(c, num_stages=1) for c in both} == set(one)
    assert any(launchers.fma_step_sum(c) and c.num_stages == 2 for c in both)


def test_lowrank_measurements_replace_the_table(tmp_path):
    """lowrank_time --merge: one GPU's files (one per sparsity) rebuild threshold_lowrank; levels
    of the table they replace (an estimate for this GPU, another GPU's) do not survive, and files
    of two GPUs are refused. Into a table measured on another GPU they go under its by_gpu entry for
    theirs (launchers.dispatch_table), the table's own entries kept."""
    lowrank_time = _lowrank_time_module()

    def result(name, gpu, sparsity, input_sparsity, ratio):
        path = tmp_path / name
        path.write_text(json.dumps({"gpu": gpu, "sparsity": sparsity, "share": 0.9, "commit": "abc", "rows": [
            {"n": 64, "k": 32, "input_sparsity": input_sparsity, "dense_us": 10.0, "lowrank16_us": 10.0 * ratio}]}))
        return str(path)

    dispatch = tmp_path / "dispatch.json"
    dispatch.write_text(json.dumps({"ratios": {"threshold": {"N64_K32": {"0.5": {"1": 0.7}}},
                                               "threshold_lowrank": {"N64_K32": {"0": {"1": 1.5}, "0.9": {"1": 0.8}},
                                                                     "N8_K8": {"0.5": {"1": 0.9}}}}}))
    files = [result("a.json", "GPU X", 0.4, 0.46, 0.9), result("b.json", "GPU X", 0.5, 0.55, 0.8)]
    lowrank_time.merge_dispatch(files, str(dispatch))
    merged = json.loads(dispatch.read_text())
    assert merged["ratios"]["threshold_lowrank"] == {"N64_K32": {"0.46": {"1": 0.9}, "0.55": {"1": 0.8}}}
    assert merged["ratios"]["threshold"] == {"N64_K32": {"0.5": {"1": 0.7}}}  # untouched
    assert "GPU X" in merged["lowrank_note"]
    with pytest.raises(SystemExit, match="different GPUs"):
        lowrank_time.merge_dispatch(files + [result("c.json", "GPU Y", 0.5, 0.55, 0.8)], str(dispatch))
    # a table measured on another GPU keeps its own entries; these files go beside them for GPU X
    dispatch.write_text(json.dumps({**merged, "gpu": "GPU Y", "ratios": {"threshold_lowrank": {"N8_K8": {"0.5": {"1": 0.9}}}}}))
    lowrank_time.merge_dispatch(files, str(dispatch))
    beside = json.loads(dispatch.read_text())
    assert beside["ratios"]["threshold_lowrank"] == {"N8_K8": {"0.5": {"1": 0.9}}}
    assert beside["by_gpu"]["GPU X"]["ratios"]["threshold_lowrank"] == merged["ratios"]["threshold_lowrank"]
    assert "GPU X" in beside["by_gpu"]["GPU X"]["notes"]["threshold_lowrank"]


@pytest.mark.parametrize("patterns,report", [(["lowrank_h200_s{}.json"], "lowrank_h200.md"),
                                             (["lowrank_h100_s{}.json", "lowrank_h100_t2b_s{}.json"],
                                              "lowrank_h100_s33.md")])
def test_lowrank_report_matches_committed_files(patterns, report):
    """The low-rank reports are what lowrank_time --report makes of the committed measurements, and
    the committed low-rank table that GPU reads is their merge by each shape's layout on that GPU: the
    H200's files are the table's own entries; the H100's (session 33) its by_gpu entry, which replaces
    the H200's estimate there (before, the H100 read the H200's ratios and sent o_proj with the term dense),
    with two-token steps (--tokens 2) beside the one-token ones."""
    lowrank_time = _lowrank_time_module()
    files = [str(RESULTS / pattern.format(s)) for pattern in patterns for s in ("0.4", "0.5", "0.7", "0.9")]
    assert lowrank_time.report(files) == (RESULTS / report).read_text()
    table, one_token_table, gpus = {}, {}, set()
    for path in files:
        result = json.load(open(path))
        gpus.add(result["gpu"])
        for row in result["rows"]:
            tokens = row.get("tokens", 1)
            if tokens == 1:
                layout = lowrank_time.config_variant(row["n"], row["k"], lowrank_time._row_sparsity(row), result["gpu"])
                ratio = row["variants_us"][layout] / row["dense_us"]
            else:
                ratio = lowrank_time.tokens_config_us(row) / row["dense_us"]
                one_token = row["paths_us"].get("one_token_config", lowrank_time.tokens_config_us(row))
                level = one_token_table.setdefault(f"N{row['n']}_K{row['k']}", {}).setdefault(
                    f"{round(row['input_sparsity'], 4):g}", {})
                level[str(tokens)] = round(one_token / row["dense_us"], 4)
            level = table.setdefault(f"N{row['n']}_K{row['k']}", {}).setdefault(f"{round(row['input_sparsity'], 4):g}", {})
            level[str(tokens)] = round(ratio, 4)
    (gpu,) = gpus
    assert launchers.dispatch_table(gpu)["ratios"]["threshold_lowrank"] == table
    assert launchers.dispatch_table(gpu)["ratios"].get("threshold_lowrank_one_token", {}) == one_token_table


def test_lowrank_dispatch_per_gpu(monkeypatch):
    """R-Sparse 0.5 (input sparsity ~0.55) with its term: on the H100, with its own table, every shape
    runs the kernels at one token, o_proj too (0.86x); on the H200, o_proj stays dense (its ratio there
    is above the 5% margin). Two tokens with the term are measured on the H100 only (session 33, one-row
    programs): at 0.55 Llama-2 gate_up runs them (0.94x); at 0.73 also Llama-2 qkv and Llama-3 gate_up with
    the shapes' two-token configs, and both downs and Llama-3 qkv with their one-token configs, which the
    launcher runs there (0.74-0.87x against 0.99-1.10x; launchers.lowrank_rows_one_token)."""
    shapes = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (6144, 4096), (28672, 4096), (4096, 14336)]
    h100 = "NVIDIA H100 80GB HBM3"
    for gpu, s, expected in [(h100, 0.55, [1, 1, 2, 1, 1, 1, 1]),
                             (h100, 0.73, [2, 1, 2, 2, 2, 2, 2]),
                             ("NVIDIA H200", 0.55, [1, 0, 1, 1, 1, 1, 1])]:
        monkeypatch.setattr(launchers, "_gpu_name", lambda: gpu)
        assert [launchers.crossover_tokens(n, k, "threshold", s, lowrank=True) for n, k in shapes] == expected, gpu
    one_token = {s: [launchers.lowrank_rows_one_token(n, k, 2, s, gpu=h100) for n, k in shapes] for s in (0.55, 0.73)}
    assert one_token[0.55] == [False, False, False, True, True, False, False]
    # (Llama-3 gate_up: a tie, 57.0 us both at 0.73 and 27.4 / 27.5 us at 0.91)
    assert one_token[0.73] == [False, False, False, True, True, True, True]
    # one token, no sparsity or no second table (the H200's): the token config
    assert not any(launchers.lowrank_rows_one_token(n, k, t, s, gpu=g) for n, k in shapes
                   for t, s, g in [(1, 0.73, h100), (2, None, h100), (2, 0.73, "NVIDIA H200")])


def test_lowrank_step_runs_the_faster_config(monkeypatch):
    """On a layer with the term, a step the launcher configures itself runs the shape's one-token config
    where the dispatch table measured it faster than the token count's config at the module's sparsity
    (H100 at 0.727: Llama-2 down, 0.74x against 1.02x); elsewhere, at one token, with an unknown sparsity,
    or with a caller's config (tokens=None: benchmarks and tests force one), the config as picked. A union
    config always falls back to the one-token config (its kernel has no v_t programs)."""
    monkeypatch.setattr(launchers, "_gpu_name", lambda: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda")  # config lookups only: nothing is launched

    def launch(n, k, tokens, sparsity, own=True):
        picked = launchers.pick_config(n, k, tokens, 80, cuda, sparsity)
        return picked, launchers.lowrank_launch_config(picked, n, k, 80, cuda, sparsity,
                                                       tokens=tokens if own else None)

    # (0.727: below the shape's high band, from 0.73 on, where its two-token config is a union one)
    one_token = launchers.pick_config(4096, 11008, 1, 80, cuda, 0.727)
    picked, ran = launch(4096, 11008, 2, 0.727)
    assert picked.rows == 1 and picked != one_token and ran == one_token
    for args in [(12288, 4096, 2, 0.727), (4096, 11008, 1, 0.727), (4096, 11008, 2, None),
                 (4096, 11008, 2, 0.727, False)]:
        picked, ran = launch(*args)
        assert ran == picked, args
    union = launchers.GemvConfig(rows=4, block_n=64, block_k=16, split_k=4, num_warps=4, num_stages=1, kernel="compact")
    assert launchers.lowrank_launch_config(union, 4096, 11008, 80, cuda, 0.727) == one_token


def test_sparse_gemv_lets_the_table_choose_only_its_own_config(monkeypatch, gen):
    """sparse_gemv asks lowrank_launch_config for the table's choice (tokens = the step's rows) only where it
    picked the config itself; a caller's config (benchmarks, tests) is run as given, bar the union fallback."""
    n, k, m = 64, 96, 3
    w, _, _, u, v = make_layer(n, k, torch.bfloat16, gen, rank=16)
    x = randn(m, k, gen=gen, dtype=torch.bfloat16)
    w_t, v_t = launchers.prepare_weight(w).t(), launchers.prepare_weight(v).t()
    thr = threshold_for(x, 0.5, None).float()
    asked, real = [], launchers.lowrank_launch_config
    monkeypatch.setattr(launchers, "lowrank_launch_config",
                        lambda cfg, *a, **kw: asked.append((kw.get("tokens"), kw.get("selection"))) or real(cfg, *a, **kw))
    ref = reference.sparse_linear(x, w, None, threshold=thr, lowrank_up=u, lowrank_down=v)
    check_close(launchers.sparse_gemv(x, w_t, thr, None, None, None, u, v_t, sparsity=0.5), ref)
    own = launchers.pick_config(n, k, m, 16, x.device, 0.5)
    check_close(launchers.sparse_gemv(x, w_t, thr, None, None, None, u, v_t, own, sparsity=0.5), ref)
    assert asked == [(m, "threshold"), (None, "threshold")]


def test_lowrank_epilogue_report_matches_committed_files():
    """benchmarks/results/lowrank_epilogue_h200.md is what lowrank_time --report makes of the
    committed --epilogues measurements (session 12: the u^T term's ways), and the launcher's
    only way left is the one those files measured faster end to end (launch; fused and claim were
    removed in session 25, their code is at b21387c)."""
    lowrank_time = _lowrank_time_module()
    files = [str(RESULTS / f"lowrank_epilogue_h200_s{s}.json") for s in ("0.4", "0.5", "0.5_widez")]
    assert lowrank_time.report(files) == (RESULTS / "lowrank_epilogue_h200.md").read_text()
    assert set(lowrank_time.EPILOGUE_VARIANTS) == {"launch", "launch_pdl"}
    # measured in session 13 (lowrank_epilogue_pdl_h200.*, e2e_h200_rsparse runs 8-11: no gain end to end
    # with the engine order reversed in runs 10-11): stays off by default
    assert launchers.LOWRANK_UP_PDL is None and not launchers.lowrank_up_pdl_requested()
    assert lowrank_time.default_epilogue_variant() == "launch"


def test_lowrank_epilogue_pdl_report_matches_committed_files():
    """benchmarks/results/lowrank_epilogue_pdl_h200.md is what lowrank_time --report makes of the
    committed --epilogues measurements of session 13, which add launch_pdl (the epilogue launch
    with PDL alone, launchers.LOWRANK_UP_PDL)."""
    lowrank_time = _lowrank_time_module()
    files = [str(RESULTS / f"lowrank_epilogue_pdl_h200_s{s}.json") for s in ("0.4", "0.5")]
    text = lowrank_time.report(files)
    assert text == (RESULTS / "lowrank_epilogue_pdl_h200.md").read_text()
    assert "| launch | launch_pdl | fused | fused_serial |" in text


def test_lowrank_epilogue_claim_report_matches_committed_files():
    """benchmarks/results/lowrank_epilogue_claim_h200.md is what lowrank_time --report makes of the
    session-14 --epilogues measurement, which adds claim (R-Sparse in one launch) and the compiled
    kernels' registers and spills. Claim was slower than the epilogue launch on every shape (and
    end to end, e2e_h200_rsparse runs 12-13), so it was removed (session 25)."""
    lowrank_time = _lowrank_time_module()
    path = RESULTS / "lowrank_epilogue_claim_h200_s0.5.json"
    text = lowrank_time.report([str(path)])
    assert text == (RESULTS / "lowrank_epilogue_claim_h200.md").read_text()
    assert "| launch | launch_pdl | fused | fused_serial | claim |" in text
    assert "| sparse_gemv_claim_kernel | 4 |" in text
    rows = json.load(open(path))["rows"]
    assert len(rows) == 7 and all(row["epilogues_us"]["claim"] > row["epilogues_us"]["launch"] for row in rows)


def test_lowrank_table_takes_each_shapes_layout(tmp_path):
    """lowrank_time --merge --variant config: each shape's ratio comes from the v_t layout its
    committed config runs (Llama-3 gate_up pins w_tiles, o_proj has the default wide_chunks)."""
    lowrank_time = _lowrank_time_module()
    variants = {"wtiles": 10.0, "own_chunk": 20.0, "wide_chunks": 30.0, "wide_chunks_kv32": 40.0}
    rows = [{"n": n, "k": k, "input_sparsity": 0.55, "dense_us": 100.0, "lowrank16_us": 99.0, "variants_us": variants}
            for n, k in [(28672, 4096), (4096, 4096)]]
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"gpu": "GPU X", "sparsity": 0.5, "share": 0.9, "commit": "abc", "rows": rows}))
    dispatch = tmp_path / "dispatch.json"
    dispatch.write_text(json.dumps({"ratios": {}}))
    lowrank_time.merge_dispatch([str(path)], str(dispatch), "config")
    merged = json.loads(dispatch.read_text())
    assert merged["ratios"]["threshold_lowrank"] == {"N28672_K4096": {"0.55": {"1": 0.1}},
                                                     "N4096_K4096": {"0.55": {"1": 0.3}}}
    assert "committed config" in merged["lowrank_note"]


@pytest.mark.parametrize("rank", [1, 13, 16, 40])
def test_prepare_lowrank_pads_exactly(rank, gen):
    """The rank is zero-padded to LOWRANK_RANK_MULTIPLE for the kernels' aligned row loads;
    the result equals the unpadded factors' (padded ranks add exact zeros). lowrank_up is
    stored as contiguous [N, r] rows, which the epilogue launch reads."""
    n, k, m = (96, 200, 3) if not HAS_CUDA else (4096, 4096, 3)
    dtype = torch.bfloat16
    w, b, s, u, v = make_layer(n, k, dtype, gen, rank=rank, scale=True)
    x = randn(m, k, gen=gen, dtype=dtype)
    thr = threshold_for(x, 0.5, s)
    up, down = launchers.prepare_lowrank(u, v)
    padded = -(-rank // launchers.LOWRANK_RANK_MULTIPLE) * launchers.LOWRANK_RANK_MULTIPLE
    assert up.shape == (n, padded)
    assert up.is_contiguous()
    assert down.shape == (padded, k) and down.stride(0) == 1  # [K, r'] storage
    assert torch.equal(up[:, :rank], u) and torch.equal(down[:rank], v)
    assert not up[:, rank:].any() and not down[rank:].any()
    w_p = launchers.prepare_weight(w)
    out = launchers.sparse_linear(x, w_p, b, thr, -1, s, up, down, use_crossover=False)
    mask = reference.threshold_mask(x, thr, s)
    check_close(out, reference.masked_linear(x, w, mask, b, u, v))
    with pytest.raises(ValueError, match="do not match"):
        launchers.prepare_lowrank(u, v[:, :-1].t())
