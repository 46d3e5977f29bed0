"""Exact per-row top-k selection on device (LaRoSA), without a host sync.

Instead of index lists, each row gets a (threshold, tie cut) pair that the threshold
GEMV (sparse_gemv_kernel with PER_ROW) turns back into exactly `keep` channels:
    sel[k] = score[k] > thr  or  (score[k] == thr and k <= jcut)
thr is the keep-th largest score; jcut is the index of the last tied channel that
still fits, ties taken lowest index first. bf16 inputs tie often, so the tie cut is
what makes the count exact.

The keep-th largest score is found by a radix select on the bit pattern of the f32
score: scores are >= 0, and for non-negative floats the int32 bit pattern orders
like the value. Passes of 4 bits from the top; each pass counts, among the channels
that match the digits fixed so far, how many have each value of the next digit.

Only bits [LOW_BIT, TOP_BIT) of a score can be set, and only those get passes
(launchers.score_bit_span): |x| clears the sign bit (TOP_BIT = 31), and a bf16 / fp16
value widened to f32 leaves its low 16 / 13 mantissa bits zero (LOW_BIT), so a bf16
row without a channel scale needs 15 bits of passes instead of 32. The skipped bits
are zero in every score, hence in the keep-th largest: the result is the same.
"""

import triton
import triton.language as tl


@triton.jit
def _score_bits(p_x, p_scale, i_m, o_k, m_k, s_xm, s_xk, HAS_SCALE: tl.constexpr):
    # the same f32 arithmetic as sparse_gemv._select, so the bits compare exactly
    b_score = tl.abs(tl.load(p_x + i_m * s_xm + o_k * s_xk, mask=m_k, other=0.0).to(tl.float32))
    if HAS_SCALE:
        b_score = b_score * tl.load(p_scale + o_k, mask=m_k, other=0.0).to(tl.float32)
    return b_score.to(tl.int32, bitcast=True)


@triton.jit
def topk_threshold_kernel(
    p_x, p_scale, p_thr, p_jcut,
    K, keep, s_xm, s_xk,
    HAS_SCALE: tl.constexpr, BLOCK_K: tl.constexpr, LOW_BIT: tl.constexpr = 0, TOP_BIT: tl.constexpr = 32,
):
    # x [M, K]  scale [K]  ->  thr [M] f32, jcut [M] i32;  grid (M,)
    i_m = tl.program_id(0)
    o_d = tl.arange(0, 16)
    prefix = tl.zeros([], dtype=tl.int32)
    remaining = tl.zeros([], dtype=tl.int32) + keep
    for i_pass in tl.static_range((TOP_BIT - LOW_BIT + 3) // 4):
        # the digit of bits [shift, shift + 4) from the top; the last one is cut at LOW_BIT and may
        # overlap bits fixed already (as in the histogram kernel below)
        shift = TOP_BIT - 4 * (i_pass + 1) if TOP_BIT - 4 * (i_pass + 1) > LOW_BIT else LOW_BIT
        counts = tl.zeros([16], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < K
            b_bits = _score_bits(p_x, p_scale, i_m, o_k, m_k, s_xm, s_xk, HAS_SCALE)
            m_cand = m_k
            if i_pass > 0:
                # only channels whose bits fixed so far (all above this pass's) equal the prefix
                above = TOP_BIT - 4 * i_pass
                m_cand = m_cand & ((b_bits >> above) == (prefix >> above))
            b_digit = (b_bits >> shift) & 15
            hit = (b_digit[None, :] == o_d[:, None]) & m_cand[None, :]
            counts += tl.sum(hit.to(tl.int32), axis=1)
        # at_least[d] = candidates with digit >= d; the keep-th largest has the largest
        # digit d with at_least[d] >= remaining
        at_least = tl.sum(tl.where(o_d[None, :] >= o_d[:, None], counts[None, :], 0), axis=1)
        digit = tl.max(tl.where(at_least >= remaining, o_d, 0), axis=0)
        remaining -= tl.sum(tl.where(o_d > digit, counts, 0), axis=0)
        prefix = prefix | (digit << shift)

    # `remaining` channels equal to the threshold are kept: find the remaining-th
    # one in index order
    jcut = tl.zeros([], dtype=tl.int32) - 1
    seen = tl.zeros([], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_bits = _score_bits(p_x, p_scale, i_m, o_k, m_k, s_xm, s_xk, HAS_SCALE)
        m_eq = (b_bits == prefix) & m_k
        rank = seen + tl.cumsum(m_eq.to(tl.int32), axis=0)
        jcut = tl.maximum(jcut, tl.max(tl.where(m_eq & (rank == remaining), o_k, -1), axis=0))
        seen += tl.sum(m_eq.to(tl.int32), axis=0)

    thr = prefix.to(tl.float32, bitcast=True)
    # keep == 0: nothing is selected (no score exceeds +inf, no index is <= -1)
    thr = tl.where(keep > 0, thr, float("inf"))
    jcut = tl.where(keep > 0, jcut, -1)
    tl.store(p_thr + i_m, thr)
    tl.store(p_jcut + i_m, jcut)


@triton.jit
def topk_threshold_hist_kernel(
    p_x, p_scale, p_thr, p_jcut,
    K, keep, s_xm, s_xk,
    HAS_SCALE: tl.constexpr, BLOCK_K: tl.constexpr, DIGIT_BITS: tl.constexpr,
    LOW_BIT: tl.constexpr = 0, TOP_BIT: tl.constexpr = 32,
):
    # The same contract as topk_threshold_kernel, for rows that fit one block (K <= BLOCK_K):
    # one program per row runs topk_row_threshold.
    i_m = tl.program_id(0)
    thr, jcut = topk_row_threshold(p_x, p_scale, i_m, K, keep, s_xm, s_xk, HAS_SCALE, BLOCK_K, DIGIT_BITS,
                                   LOW_BIT, TOP_BIT)
    tl.store(p_thr + i_m, thr)
    tl.store(p_jcut + i_m, jcut)


@triton.jit
def topk_row_threshold(p_x, p_scale, i_m, K, keep, s_xm, s_xk, HAS_SCALE: tl.constexpr, BLOCK_K: tl.constexpr,
                       DIGIT_BITS: tl.constexpr, LOW_BIT: tl.constexpr, TOP_BIT: tl.constexpr):
    # x row i_m (K <= BLOCK_K channels)  ->  (thr f32, jcut i32) of its exact top-`keep`, in one block
    # (topk_threshold_hist_kernel; the compact GEMV's prologue with launchers.TOPK_IN_KERNEL).
    # The row's score bits are loaded once and stay in registers, and each pass over a digit of
    # DIGIT_BITS bits is one shared-memory histogram (tl.histogram) instead of 16 masked counts
    # per chunk. The digit size sets the cost: Triton 3.6 (the GPU machine's) builds a histogram
    # from warp ballots, about 1.4 k SASS instructions at 32 bins and 3.4 k at 256 for 64 values
    # a thread (session 27), so narrower digits can cost less in all despite more passes.
    BINS: tl.constexpr = 1 << DIGIT_BITS
    o_k = tl.arange(0, BLOCK_K)
    m_k = o_k < K
    b_bits = _score_bits(p_x, p_scale, i_m, o_k, m_k, s_xm, s_xk, HAS_SCALE)
    o_b = tl.arange(0, BINS)
    prefix = tl.zeros([], dtype=tl.int32)
    remaining = tl.zeros([], dtype=tl.int32) + keep
    for i_pass in tl.static_range((TOP_BIT - LOW_BIT + DIGIT_BITS - 1) // DIGIT_BITS):
        # the digit of bits [shift, shift + DIGIT_BITS), from the top; the last one is cut at LOW_BIT
        # and may overlap bits fixed already (candidates agree with the prefix there, so the chosen
        # digit repeats those bits)
        shift = TOP_BIT - DIGIT_BITS * (i_pass + 1) if TOP_BIT - DIGIT_BITS * (i_pass + 1) > LOW_BIT else LOW_BIT
        m_cand = m_k
        if i_pass > 0:
            # candidates: the channels whose bits fixed so far (all above this digit) equal the prefix
            above = TOP_BIT - DIGIT_BITS * i_pass
            m_cand = m_cand & ((b_bits >> above) == (prefix >> above))
        # everything else counts in bin 0, which changes nothing: bin 0's at_least (all
        # candidates, >= remaining) picks digit 0 only when no higher digit qualifies, and
        # `remaining` subtracts the bins above the chosen digit only
        b_digit = tl.where(m_cand, (b_bits >> shift) & (BINS - 1), 0)
        counts = tl.histogram(b_digit, BINS)
        # at_least[d] = values with digit >= d = total - (inclusive prefix sum - counts[d])
        at_least = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts
        digit = tl.max(tl.where(at_least >= remaining, o_b, 0), axis=0)
        remaining -= tl.sum(tl.where(o_b > digit, counts, 0), axis=0)
        prefix = prefix | (digit << shift)
    # ties: keep the first `remaining` channels equal to the threshold, in index order
    m_eq = (b_bits == prefix) & m_k
    rank = tl.cumsum(m_eq.to(tl.int32), axis=0)
    jcut = tl.max(tl.where(m_eq & (rank == remaining), o_k, -1), axis=0)
    thr = prefix.to(tl.float32, bitcast=True)
    thr = tl.where(keep > 0, thr, float("inf"))
    jcut = tl.where(keep > 0, jcut, -1)
    return thr, jcut
