"""Triton kernels of the rsparse decode path (host side: vllm_rsparse/launchers.py).

Decode is bound by weight bytes read, so every kernel here is organised around one
rule: read a weight row only if some token row selected its input channel.

Layouts (chosen by launchers.prepare_weight):
    x    [M, K]   any strides, M <= 16 decode tokens
    w_t  [K, N]   unit stride along N: the N outputs of one input channel are one
                  contiguous row, so skipping channel k skips one contiguous row
    v_t  [K, R]   the R-Sparse lowrank_down, stored like w_t
    u    [N, R]   the R-Sparse lowrank_up, any strides (read densely)

Selection (the contract of vllm_rsparse/reference.py), per token row m:
    score[m, k] = |x[m, k]| * scale[k]                 (scale optional)
    sel[m, k]   = score > thr[m]                         (threshold selection)
                | score == thr[m] and k <= jcut[m]       (PER_ROW: exact top-k, ties by index)

One launch of sparse_gemv_kernel covers a [K, N] GEMV for up to 16 rows:
    grid = (n_tiles_w + n_tiles_v, split_k, row_groups)
Programs split K (split-K) so that small N still fills the GPU. Two ways to finish:

  fixed point (FIXED, split_k <= FX_MAX_SPLIT): each program adds its partial sum, as a
  64-bit fixed-point number with an arrival count in its top bits, to a zeroed int64
  workspace element with ONE atomic that returns the old value. The program whose add
  brings the count to split_k holds the whole sum, writes the output element and zeroes
  the workspace element. No tile counter, no fence, no reload: one round trip to L2
  instead of three. Integer sums do not depend on the arrival order, so results are
  bit-identical between runs. Word layout (int64, always >= 0 once counted):
      bits 57..62 arrivals (<= 63)  bits 51..56 poisoned partials  bits 0..50 the sum
      sum = round-toward-zero(partial * 2^24) summed, |sum| < 2^50 (63 partials of
      |partial| <= FX_LIMIT = 2^20). A partial that is NaN, infinite or beyond FX_LIMIT
      poisons the element: its output is NaN (loud), never a wrapped value.
  A wider word for 64-255 arrivals (count read unsigned in bits 56..63, 2^-20 steps) was
  built and measured in session 10 (59295b4): 14-48% slower than the counter on the configs
  that need it, whose 1-2 KB tiles x 64-128 programs make every word take 64-128 returning
  64-bit atomics (benchmarks/results/fixed_cost_wide_word_h200.json); removed.
  counter (deeper splits): partial sums go by f32 atomics into a persistent zeroed
  accumulator; the last program to finish an output tile (an atomic arrival counter per
  tile) reads the sum, writes the output, and zeroes its accumulator tile and counter.
  f32 atomics sum in arrival order: results can differ between runs in the last f32
  bits (at most 1 ulp of the bf16/fp16 output).
Either way the workspace is left zeroed for the next launch (or CUDA-graph replay).

sparse_gemv_compact_kernel (one row per program, launchers.COMPACT_ROWS_ENABLED) does
the same with work proportional to the selected channels: each program compacts its
K chunk's selected indices into a scratch list, then loads only those weight rows.
sparse_gemv_union_compact_kernel does it for up to 16 rows in one program: the list holds
the channels any of its rows selected (a weight row is read once), the rows meet in tl.dot.
"""

import triton
import triton.language as tl

from .topk_select import topk_row_threshold

# 64-bit fixed-point split-K word (module docstring); launchers.FX_MAX_SPLIT mirrors FX_MAX_SPLIT.
# Plain values, not expressions of each other: the interpreter does no constexpr arithmetic.
FX_SCALE = tl.constexpr(16777216.0)  # 2^24: the sum's fraction bits
FX_UNIT = tl.constexpr(1.0 / 16777216.0)
FX_LIMIT = tl.constexpr(1048576.0)  # 2^20: 63 partials of this size stay below 2^50 in the sum field
FX_POISON_SHIFT = tl.constexpr(51)  # poisoned partials counted in bits 51..56
FX_POISON_MASK = tl.constexpr(63)
FX_HALF_POISON = tl.constexpr(1 << 50)  # the sum field's range: |sum| < 2^50
FX_COUNT_SHIFT = tl.constexpr(6)  # arrivals in bits 57..62: 6 bits above the poison count
FX_MAX_SPLIT = tl.constexpr(63)


@triton.jit
def _await_previous_kernel(WAIT: tl.constexpr, TRIGGER: tl.constexpr):
    # Programmatic dependent launch (launchers.use_pdl): this program may have started while
    # the previous kernel in the stream was still running. WAIT: wait until it has completed
    # and its writes are visible (x, thresholds, the split-K workspace of an earlier launch)
    # before the first memory access. TRIGGER: then let the next PDL kernel's programs be
    # scheduled: they wait the same way (R-Sparse's epilogue launch before its first load),
    # so starting them early is safe.
    if WAIT:
        tl.extra.cuda.gdc_wait()
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _kept(b_score, thr, o_k, jcut, PER_ROW: tl.constexpr):
    # the selection rule of every kernel (operands broadcast by the caller): a score above the
    # threshold; with exact top-k (PER_ROW) also a score equal to it at a channel up to the tie cut
    b_sel = b_score > thr
    if PER_ROW:
        b_sel = b_sel | ((b_score == thr) & (o_k <= jcut))
    return b_sel


@triton.jit
def _select(b_x, o_k, m_k, b_thr, b_jcut, p_scale, HAS_SCALE: tl.constexpr, PER_ROW: tl.constexpr):
    # b_x [ROWS, BLOCK_K] f32  ->  sel [ROWS, BLOCK_K] (padding columns not cleared)
    b_score = tl.abs(b_x)
    if HAS_SCALE:
        b_scale = tl.load(p_scale + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_score = b_score * b_scale[None, :]
    return _kept(b_score, b_thr[:, None], o_k[None, :], b_jcut[:, None], PER_ROW)


@triton.jit
def _row_group(p_thr, p_jcut, M, ROWS: tl.constexpr, PER_ROW: tl.constexpr):
    # the row group of this program (grid axis 2): its index, rows, row mask, and each row's
    # threshold (and tie cut): per row for exact top-k, else the layer's one threshold for every
    # row (jcut unused: the rows themselves as a placeholder)
    i_g = tl.program_id(2)
    o_m = i_g * ROWS + tl.arange(0, ROWS)
    m_m = o_m < M
    if PER_ROW:
        b_thr = tl.load(p_thr + o_m, mask=m_m, other=0.0)
        b_jcut = tl.load(p_jcut + o_m, mask=m_m, other=-1)
    else:
        b_thr = tl.load(p_thr + o_m * 0)
        b_jcut = o_m
    return i_g, o_m, m_m, b_thr, b_jcut


@triton.jit
def _load_x(p_x, o_m, m_m, k0, k_hi, s_xm, s_xk, BLOCK_K: tl.constexpr):
    # x [ROWS, BLOCK_K] of the K step at k0, f32 (columns >= k_hi read as 0)
    o_k = k0 + tl.arange(0, BLOCK_K)
    m_x = m_m[:, None] & (o_k < k_hi)[None, :]
    return tl.load(p_x + o_m[:, None] * s_xm + o_k[None, :] * s_xk, mask=m_x, other=0.0).to(tl.float32)


@triton.jit
def _select_rows(
    b_x, p_mat, p_scale, b_thr, b_jcut, m_m, k0, k_hi, o_n, m_n, s_row,
    BLOCK_K: tl.constexpr, HAS_SCALE: tl.constexpr, PER_ROW: tl.constexpr, INVERT: tl.constexpr,
    EVICT: tl.constexpr,
):
    # one K step: x [ROWS, BLOCK_K] -> selected x (f32) and the weight rows it needs
    o_k = k0 + tl.arange(0, BLOCK_K)
    m_k = o_k < k_hi
    m_x = m_m[:, None] & m_k[None, :]
    b_sel = _select(b_x, o_k, m_k, b_thr, b_jcut, p_scale, HAS_SCALE, PER_ROW)
    if INVERT:
        b_sel = ~b_sel
    b_sel = b_sel & m_x
    b_xs = tl.where(b_sel, b_x, 0.0)
    # union over the rows of this program: a weight row is fetched once if any row
    # needs it; each row still multiplies only its own channels (b_xs)
    m_wrow = tl.max(b_sel.to(tl.int32), axis=0) > 0
    # predicated-off loads issue no memory request: unselected rows cost no bytes
    b_w = tl.load(p_mat + o_k[:, None] * s_row + o_n[None, :], mask=m_wrow[:, None] & m_n[None, :], other=0.0,
                  eviction_policy=EVICT)
    return b_xs, b_w


@triton.jit
def _load_step(
    p_x, p_mat, p_scale, b_thr, b_jcut, o_m, m_m, k0, k_hi, o_n, m_n, s_xm, s_xk, s_row,
    BLOCK_K: tl.constexpr, HAS_SCALE: tl.constexpr, PER_ROW: tl.constexpr, INVERT: tl.constexpr,
    EVICT: tl.constexpr,
):
    b_x = _load_x(p_x, o_m, m_m, k0, k_hi, s_xm, s_xk, BLOCK_K)
    return _select_rows(b_x, p_mat, p_scale, b_thr, b_jcut, m_m, k0, k_hi, o_n, m_n, s_row,
                        BLOCK_K, HAS_SCALE, PER_ROW, INVERT, EVICT)


@triton.jit
def _rows_dot(b_xs, b_w, acc, DOT_F32: tl.constexpr):
    # acc [ROWS, BLOCK_N] f32 += x [ROWS, BLOCK_K] f32 @ w [BLOCK_K, BLOCK_N] (the weight dtype)
    if DOT_F32:
        # interpreter: numpy has no bf16, compute in f32
        return tl.dot(b_xs, b_w.to(tl.float32), acc, input_precision="ieee")
    # x values are exact in the weight dtype, products are exact in f32, tensor cores
    # accumulate in f32
    return tl.dot(b_xs.to(b_w.dtype), b_w, acc)


@triton.jit
def _masked_tile(
    p_x, p_mat, p_scale, b_thr, b_jcut, o_m, m_m,
    k_lo, k_hi, i_col, n_cols, s_xm, s_xk, s_row,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_SCALE: tl.constexpr, PER_ROW: tl.constexpr, INVERT: tl.constexpr, DOT_F32: tl.constexpr,
    AHEAD: tl.constexpr, EVICT: tl.constexpr,
):
    # x [M, K] rows o_m, channels [k_lo, k_hi)  mat [K, n_cols] (unit column stride)
    # -> acc [ROWS, BLOCK_N] f32 = sum_k sel[m, k] * x[m, k] * mat[k, col]
    # INVERT uses the dropped channels (1 - m): the lowrank_down input (1-m)x.
    # n_cols must come straight from a kernel argument: its divisibility by 16 is what
    # lets the masked weight loads stay 16 bytes wide.
    o_n = i_col * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < n_cols
    if ROWS == 1:
        # one row: pure FMAs into a [BLOCK_K, BLOCK_N] register tile, reduced once
        # after the loop, so the loop body has no cross-thread reduction
        acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    if ROWS == 1:
        # software pipeline by hand: the next step's weight loads are issued before
        # the current step's FMAs, so a program keeps a tile in flight while it computes
        # AHEAD: x is loaded one step earlier still, so a step's predicated row loads
        # issue at once instead of waiting for their own x load (x -> rows was a
        # dependent chain of two memory latencies per step; now only the rows' remains)
        b_x = _load_x(p_x, o_m, m_m, k_lo, k_hi, s_xm, s_xk, BLOCK_K)
        b_xs, b_w = _select_rows(b_x, p_mat, p_scale, b_thr, b_jcut, m_m, k_lo, k_hi, o_n, m_n, s_row,
                                 BLOCK_K, HAS_SCALE, PER_ROW, INVERT, EVICT)
        if AHEAD:
            b_x = _load_x(p_x, o_m, m_m, k_lo + BLOCK_K, k_hi, s_xm, s_xk, BLOCK_K)
        for k0 in range(k_lo + BLOCK_K, k_hi + BLOCK_K, BLOCK_K):
            # the last trip loads nothing (all rows masked off) and only computes
            if not AHEAD:
                b_x = _load_x(p_x, o_m, m_m, k0, k_hi, s_xm, s_xk, BLOCK_K)
            b_xs_next, b_w_next = _select_rows(b_x, p_mat, p_scale, b_thr, b_jcut, m_m, k0, k_hi, o_n, m_n,
                                               s_row, BLOCK_K, HAS_SCALE, PER_ROW, INVERT, EVICT)
            if AHEAD:
                b_x = _load_x(p_x, o_m, m_m, k0 + BLOCK_K, k_hi, s_xm, s_xk, BLOCK_K)
            acc2 += tl.sum(b_xs, axis=0)[:, None] * b_w.to(tl.float32)
            b_xs = b_xs_next
            b_w = b_w_next
    else:
        # the tl.dot path is left to Triton's own pipeliner (num_stages): a hand
        # pipelined loop that carries dot operands across iterations gave wrong
        # results on the H100 with num_stages=2 (benchmarks/results/kernel_tests_h100.log)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            b_xs, b_w = _load_step(p_x, p_mat, p_scale, b_thr, b_jcut, o_m, m_m, k0, k_hi, o_n, m_n,
                                   s_xm, s_xk, s_row, BLOCK_K, HAS_SCALE, PER_ROW, INVERT, EVICT)
            acc = _rows_dot(b_xs, b_w, acc, DOT_F32)
    if ROWS == 1:
        acc = tl.sum(acc2, axis=0)[None, :]
    return acc


@triton.jit
def sparse_gemv_kernel(
    p_x, p_w, p_v, p_scale, p_thr, p_jcut, p_bias,
    p_acc, p_count, p_fx, p_out, p_y32, p_z,
    M, N, K, R, k_per_split, n_tiles_w, ws_cols,
    s_xm, s_xk, s_wk, s_vk, s_om, s_on,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_SCALE: tl.constexpr, PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LOWRANK: tl.constexpr, SPLIT: tl.constexpr, FIXED: tl.constexpr, DOT_F32: tl.constexpr,
    AHEAD: tl.constexpr, GDC: tl.constexpr, EVICT: tl.constexpr,
):
    # x [M, K]  w_t [K, N]  v_t [K, R]  scale [K]  thr [1] or [M] f32  jcut [M] i32
    # bias [N]  acc [16, ws_cols] f32 (zeros)  count [tiles * row_groups] i32 (zeros)
    # fx [16, ws_cols] i64 (zeros; FIXED split-K words)
    # out [M, N] (no lowrank) | y32 [M, N] f32 and z [M, R] f32 (lowrank)
    # grid (n_tiles_w + n_tiles_v, split_k, row_groups); tiles >= n_tiles_w are v_t tiles
    _await_previous_kernel(GDC, GDC)
    i_n = tl.program_id(0)
    i_k = tl.program_id(1)
    i_g, o_m, m_m, b_thr, b_jcut = _row_group(p_thr, p_jcut, M, ROWS, PER_ROW)
    k_lo = i_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)

    if HAS_LOWRANK:
        is_v = (i_n >= n_tiles_w).to(tl.int32)
        i_col = i_n - is_v * n_tiles_w
        col0 = is_v * N
        if i_n >= n_tiles_w:
            acc = _masked_tile(p_x, p_v, p_scale, b_thr, b_jcut, o_m, m_m, k_lo, k_hi, i_col, R,
                               s_xm, s_xk, s_vk, ROWS, BLOCK_N, BLOCK_K, HAS_SCALE, PER_ROW, True, DOT_F32, AHEAD, EVICT)
        else:
            acc = _masked_tile(p_x, p_w, p_scale, b_thr, b_jcut, o_m, m_m, k_lo, k_hi, i_col, N,
                               s_xm, s_xk, s_wk, ROWS, BLOCK_N, BLOCK_K, HAS_SCALE, PER_ROW, False, DOT_F32, AHEAD, EVICT)
        m_n = (i_col * BLOCK_N + tl.arange(0, BLOCK_N)) < (N + is_v * (R - N))
    else:
        is_v = 0
        i_col = i_n
        col0 = 0
        acc = _masked_tile(p_x, p_w, p_scale, b_thr, b_jcut, o_m, m_m, k_lo, k_hi, i_col, N,
                           s_xm, s_xk, s_wk, ROWS, BLOCK_N, BLOCK_K, HAS_SCALE, PER_ROW, False, DOT_F32, AHEAD, EVICT)
        m_n = (i_col * BLOCK_N + tl.arange(0, BLOCK_N)) < N

    o_n = i_col * BLOCK_N + tl.arange(0, BLOCK_N)
    m_out = m_m[:, None] & m_n[None, :]
    _finish(acc, is_v, i_n, i_g, col0, o_m, o_n, m_out, p_acc, p_count, p_fx, p_bias, p_out, p_y32, p_z,
            N, R, ws_cols, s_om, s_on, tl.num_programs(1), ROWS, BLOCK_N, HAS_BIAS, HAS_LOWRANK, SPLIT, FIXED)


@triton.jit
def _arrive(p_counter, target):
    # one arrival on a counter shared by several programs (the counter finish's per-tile count);
    # true for the program whose arrival brings it to `target`. Every thread's earlier memory
    # operations happen-before thread 0's release (block barrier first).
    tl.debug_barrier()
    n_before = tl.atomic_add(p_counter, 1, sem="acq_rel", scope="gpu")
    return n_before == target - 1


@triton.jit
def _finish(acc, is_v, i_n, i_g, col0, o_m, o_n, m_out, p_acc, p_count, p_fx, p_bias, p_out, p_y32, p_z,
            N, R, ws_cols, s_om, s_on, n_split,
            ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
            HAS_LOWRANK: tl.constexpr, SPLIT: tl.constexpr, FIXED: tl.constexpr):
    # acc [ROWS, BLOCK_N] f32: this program's partial sum of output tile (i_n, i_g), one of the
    # n_split programs along K that add into it
    if SPLIT and FIXED:
        # one returning atomic per element (module docstring): the add that completes the
        # count sees the whole sum, so no counter, fence or reload is needed
        bad = ~(tl.abs(acc) <= FX_LIMIT)  # NaN compares false: poisoned too
        fixed = tl.where(bad, 0.0, acc * FX_SCALE).to(tl.int64)
        # + one arrival (bit 57), + one poisoned partial (bit 51) if bad
        high_add = tl.where(bad, 65, 64).to(tl.int64)
        word = fixed + (high_add << FX_POISON_SHIFT)
        p_word = p_fx + o_m[:, None] * ws_cols + col0 + o_n[None, :]
        total = tl.atomic_add(p_word, word, mask=m_out, sem="relaxed") + word
        # arrivals * 64 + poisoned: the sum field rounds away (|sum| < 2^50, half a unit)
        high = (total + FX_HALF_POISON) >> FX_POISON_SHIFT
        m_last = m_out & ((high >> FX_COUNT_SHIFT) == n_split)
        val = (total - (high << FX_POISON_SHIFT)).to(tl.float32) * FX_UNIT
        val = tl.where((high & FX_POISON_MASK) != 0, float("nan"), val)
        # only the completing program touches the element again this launch
        tl.store(p_word, tl.zeros([ROWS, BLOCK_N], dtype=tl.int64), mask=m_last)
        _store_result(val, is_v, o_m, o_n, m_last, o_n < N, p_bias, p_out, p_y32, p_z,
                      N, R, s_om, s_on, HAS_BIAS, HAS_LOWRANK)
    elif SPLIT:
        # split-K: fire-and-forget f32 atomics into a zeroed accumulator (no latency
        # chain, whatever split_k is); the last program of the tile reads the sum,
        # writes the result and zeroes the tile again for the next launch
        p_tile = p_acc + o_m[:, None] * ws_cols + col0 + o_n[None, :]
        tl.atomic_add(p_tile, acc, mask=m_out, sem="relaxed")
        # every thread's atomics happen-before thread 0's release in the arrival
        i_cnt = i_g * tl.num_programs(0) + i_n
        if _arrive(p_count + i_cnt, n_split):
            # .cg: read through L2, where the other programs' atomics landed
            acc = tl.load(p_tile, mask=m_out, other=0.0, cache_modifier=".cg")
            # the zeroing store may use another thread layout than the load: no thread
            # may zero an element before every thread has read it
            tl.debug_barrier()
            tl.store(p_tile, tl.zeros([ROWS, BLOCK_N], dtype=tl.float32), mask=m_out)
            _store_result(acc, is_v, o_m, o_n, m_out, o_n < N, p_bias, p_out, p_y32, p_z,
                          N, R, s_om, s_on, HAS_BIAS, HAS_LOWRANK)
            tl.atomic_xchg(p_count + i_cnt, 0)
    else:
        _store_result(acc, is_v, o_m, o_n, m_out, o_n < N, p_bias, p_out, p_y32, p_z,
                      N, R, s_om, s_on, HAS_BIAS, HAS_LOWRANK)


@triton.jit
def _store_result(acc, is_v, o_m, o_n, m_out, m_bias, p_bias, p_out, p_y32, p_z, N, R, s_om, s_on,
                  HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr):
    # acc [ROWS, BLOCK_N] f32 of a w_t tile (-> out or y32) or a v_t tile (-> z)
    if HAS_LOWRANK:
        if is_v != 0:
            tl.store(p_z + o_m[:, None] * R + o_n[None, :], acc, mask=m_out)
        else:
            if HAS_BIAS:
                acc = acc + tl.load(p_bias + o_n, mask=m_bias, other=0.0).to(tl.float32)[None, :]
            tl.store(p_y32 + o_m[:, None] * N + o_n[None, :], acc, mask=m_out)
    else:
        if HAS_BIAS:
            acc = acc + tl.load(p_bias + o_n, mask=m_bias, other=0.0).to(tl.float32)[None, :]
        tl.store(p_out + o_m[:, None] * s_om + o_n[None, :] * s_on, acc.to(p_out.dtype.element_ty), mask=m_out)


@triton.jit
def lowrank_up_kernel(
    p_y32, p_z, p_u, p_out,
    M, N, R, s_un, s_ur, s_om, s_on,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_F32: tl.constexpr,
    GDC: tl.constexpr,
):
    # y32 [M, N] f32  z [M, R] f32  u [N, R]  ->  out [M, N] = y32 + z u^T, cast once
    # grid (cdiv(N, BLOCK_N), cdiv(M, ROWS))
    _await_previous_kernel(GDC, GDC)
    i_n = tl.program_id(0)
    i_g = tl.program_id(1)
    o_m = i_g * ROWS + tl.arange(0, ROWS)
    m_m = o_m < M
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    if ROWS == 1:
        acc2 = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        o_r = r0 + tl.arange(0, BLOCK_R)
        m_r = o_r < R
        b_z = tl.load(p_z + o_m[:, None] * R + o_r[None, :], mask=m_m[:, None] & m_r[None, :], other=0.0)
        # u^T tile [BLOCK_R, BLOCK_N]
        b_ut = tl.load(p_u + o_r[:, None] * s_ur + o_n[None, :] * s_un,
                       mask=m_r[:, None] & m_n[None, :], other=0.0).to(tl.float32)
        if ROWS == 1:
            acc2 += tl.sum(b_z, axis=0)[:, None] * b_ut
        else:
            if DOT_F32:
                acc = tl.dot(b_z, b_ut, acc, input_precision="ieee")
            else:
                # z is f32 (not exact in bf16): three tf32 products keep ~f32 accuracy
                acc = tl.dot(b_z, b_ut, acc, input_precision="tf32x3")
    if ROWS == 1:
        acc = tl.sum(acc2, axis=0)[None, :]
    m_out = m_m[:, None] & m_n[None, :]
    acc += tl.load(p_y32 + o_m[:, None] * N + o_n[None, :], mask=m_out, other=0.0)
    tl.store(p_out + o_m[:, None] * s_om + o_n[None, :] * s_on, acc.to(p_out.dtype.element_ty), mask=m_out)


# ---------------------------------------------------------------------------
# one-row programs over a compact list of the selected channels
# ---------------------------------------------------------------------------


@triton.jit
def _compact_list(p_x, p_scale, p_list, i_m, thr, jcut, k_lo, k_hi, s_xm, s_xk,
                  CHUNK: tl.constexpr, HAS_SCALE: tl.constexpr, PER_ROW: tl.constexpr, INVERT: tl.constexpr):
    # x row i_m, channels [k_lo, k_hi) -> list[k_lo : k_lo + n_sel] = selected channel
    # indices in ascending order; returns n_sel.
    # One vector load of the whole chunk replaces the walk over K: the weight loop below
    # then runs n_sel / BLOCK_K steps, not CHUNK / BLOCK_K, so time follows the bytes.
    o_k = k_lo + tl.arange(0, CHUNK)
    m_k = o_k < k_hi
    b_score = tl.abs(tl.load(p_x + i_m * s_xm + o_k * s_xk, mask=m_k, other=0.0).to(tl.float32))
    if HAS_SCALE:
        # the same f32 arithmetic as reference.channel_scores and topk_select._score_bits
        b_score = b_score * tl.load(p_scale + o_k, mask=m_k, other=0.0).to(tl.float32)
    m_sel = _kept(b_score, thr, o_k, jcut, PER_ROW)
    if INVERT:
        m_sel = ~m_sel
    return _store_list(p_list + k_lo, o_k, m_sel & m_k)


@triton.jit
def _store_list(p_list_chunk, o_k, m_sel):
    # channels o_k [CHUNK] where m_sel -> list entries 0.. of the chunk, ascending; returns their
    # number. Every program of the same (row or row group, chunk, w|v) writes the same values to
    # the same slots, so concurrent writers cannot disagree; the list lives in L2 and is read back
    b_rank = tl.cumsum(m_sel.to(tl.int32), axis=0)
    n_sel = tl.sum(m_sel.to(tl.int32), axis=0)
    tl.store(p_list_chunk + b_rank - 1, o_k, mask=m_sel)
    # the caller's loop reads slots other threads of this program wrote: block barrier (it also
    # orders this CTA's global writes before its reads)
    tl.debug_barrier()
    return n_sel


@triton.jit
def _load_list(p_list, j0, n_sel, BLOCK_K: tl.constexpr):
    # list entries [j0, j0 + BLOCK_K) -> channel indices (0 past n_sel)
    o_j = j0 + tl.arange(0, BLOCK_K)
    return tl.load(p_list + o_j, mask=o_j < n_sel, other=0)


@triton.jit
def _gather_rows(p_xrow, p_mat, b_idx, j0, n_sel, o_n, m_n, s_xk, s_row, BLOCK_K: tl.constexpr,
                 EVICT: tl.constexpr):
    # channel indices of list entries [j0, j0 + BLOCK_K) -> x values [BLOCK_K] f32 and
    # weight rows [BLOCK_K, BLOCK_N]
    m_j = (j0 + tl.arange(0, BLOCK_K)) < n_sel
    b_xv = tl.load(p_xrow + b_idx * s_xk, mask=m_j, other=0.0).to(tl.float32)
    # every unmasked row is a selected channel: each weight load is useful bytes
    b_w = tl.load(p_mat + b_idx[:, None] * s_row + o_n[None, :], mask=m_j[:, None] & m_n[None, :], other=0.0,
                  eviction_policy=EVICT)
    return b_xv, b_w


@triton.jit
def _compact_tile(p_x, p_mat, p_scale, p_list, i_m, thr, jcut, k_lo, k_hi, i_col, n_cols, s_xm, s_xk, s_row,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
                  HAS_SCALE: tl.constexpr, PER_ROW: tl.constexpr, INVERT: tl.constexpr, AHEAD: tl.constexpr,
                  EVICT: tl.constexpr, STAGES: tl.constexpr):
    # -> acc [1, BLOCK_N] f32 = sum over selected k in [k_lo, k_hi) of x[i_m, k] * mat[k, cols]
    n_sel = _compact_list(p_x, p_scale, p_list, i_m, thr, jcut, k_lo, k_hi, s_xm, s_xk,
                          CHUNK, HAS_SCALE, PER_ROW, INVERT)
    p_list_chunk = p_list + k_lo
    p_xrow = p_x + i_m * s_xm
    o_n = i_col * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < n_cols
    # [BLOCK_K, BLOCK_N] register tile of FMAs, reduced once after the loop (no
    # cross-thread reduction in the loop body)
    acc2 = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    if STAGES > 1:
        # Triton's pipeliner instead of the hand pipeline: the list entries, x values and
        # weight rows of the next STAGES - 1 steps are copied to shared memory with cp.async
        # (LDGSTS on sm_90) while a step's FMAs run, so the bytes in flight cost shared
        # memory, not registers. (Triton does not pipeline the hand-pipelined loop below:
        # its loads feed loop-carried values.)
        for j0 in tl.range(0, n_sel, BLOCK_K, num_stages=STAGES):
            b_idx = _load_list(p_list_chunk, j0, n_sel, BLOCK_K)
            b_xv, b_w = _gather_rows(p_xrow, p_mat, b_idx, j0, n_sel, o_n, m_n, s_xk, s_row, BLOCK_K, EVICT)
            acc2 += b_xv[:, None] * b_w.to(tl.float32)
    else:
        # hand pipeline: the next step's gathers are issued before the current FMAs.
        # AHEAD: the list entries are loaded one step earlier still, so a step's gathers
        # issue at once instead of waiting for their own list load (list -> rows was a
        # dependent chain of two memory latencies per step)
        b_idx = _load_list(p_list_chunk, 0, n_sel, BLOCK_K)
        b_xv, b_w = _gather_rows(p_xrow, p_mat, b_idx, 0, n_sel, o_n, m_n, s_xk, s_row, BLOCK_K, EVICT)
        if AHEAD:
            b_idx = _load_list(p_list_chunk, BLOCK_K, n_sel, BLOCK_K)
        for j0 in range(BLOCK_K, n_sel + BLOCK_K, BLOCK_K):
            # the last trip loads nothing (every entry masked off) and only computes
            if not AHEAD:
                b_idx = _load_list(p_list_chunk, j0, n_sel, BLOCK_K)
            b_xv_next, b_w_next = _gather_rows(p_xrow, p_mat, b_idx, j0, n_sel, o_n, m_n, s_xk, s_row, BLOCK_K,
                                               EVICT)
            if AHEAD:
                b_idx = _load_list(p_list_chunk, j0 + BLOCK_K, n_sel, BLOCK_K)
            acc2 += b_xv[:, None] * b_w.to(tl.float32)
            b_xv = b_xv_next
            b_w = b_w_next
    return tl.sum(acc2, axis=0)[None, :]


@triton.jit
def sparse_gemv_compact_kernel(
    p_x, p_w, p_v, p_scale, p_thr, p_jcut, p_bias, p_list,
    p_acc, p_count, p_fx, p_out, p_y32, p_z,
    M, N, K, R, n_tiles_w, ws_cols, list_cols, n_split_v,
    s_xm, s_xk, s_wk, s_vk, s_om, s_on, keep,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_KV: tl.constexpr, CHUNK_V: tl.constexpr, SPLIT_V: tl.constexpr,
    HAS_SCALE: tl.constexpr, PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LOWRANK: tl.constexpr, SPLIT: tl.constexpr, FIXED: tl.constexpr,
    AHEAD: tl.constexpr, GDC_WAIT: tl.constexpr, GDC_TRIGGER: tl.constexpr, EVICT: tl.constexpr,
    STAGES: tl.constexpr, TOPK_BLOCK: tl.constexpr, TOPK_DIGIT_BITS: tl.constexpr, TOPK_LOW_BIT: tl.constexpr,
    TOPK_TOP_BIT: tl.constexpr,
):
    # x [M, K]  w_t [K, N]  v_t [K, R]  scale [K]  thr [1] or [M] f32  jcut [M] i32  bias [N]
    # keep: with TOPK_BLOCK > 0 the exact top-k of each row, selected in this launch (below)
    # list [2 * M, list_cols] i32 (scratch: selected | dropped channel lists per row)
    # acc [16, ws_cols] f32 (zeros)  count [tiles * M] i32 (zeros)  fx [16, ws_cols] i64 (zeros)
    # out [M, N] (no lowrank) | y32 [M, N] f32 and z [M, R] f32 (lowrank)
    # grid (n_tiles_w + n_tiles_v, cdiv(K, CHUNK), M); tiles >= n_tiles_w are v_t tiles of
    # BLOCK_R columns, the others w_t tiles of BLOCK_N. One program = one token row x one output
    # tile x one K chunk.
    # v_t rows are short (R of 64-256 against N of 4096-28672), so its tiles have their own
    # shape: BLOCK_R columns (all of R in one tile where it fits), BLOCK_KV rows per list step
    # (about the register tile of a w_t step) and K chunks of CHUNK_V, so that a v_t program
    # takes about as many list steps as a w_t program and there are few of them. With the w_t
    # shape and chunk, the v_t column added split_k programs: on o_proj, both qkv shapes and
    # Llama-2 down that pushed a grid that fills the GPU once into a second wave (session 11,
    # benchmarks/results/lowrank_h200_s*.json).
    # (The u^T term added by the w_t programs themselves -- after a z launch of the v_t programs
    # ("fused", session 12) or in this launch once z is complete ("claim", sessions 13-14) -- was
    # slower than the epilogue launch (lowrank_epilogue_h200.md, lowrank_epilogue_claim_h200.md)
    # and was removed in session 25; the code is at b21387c.)
    _await_previous_kernel(GDC_WAIT, GDC_TRIGGER)
    i_n = tl.program_id(0)
    i_k = tl.program_id(1)
    i_m = tl.program_id(2)
    if TOPK_BLOCK > 0:
        # exact top-k without a select launch (launchers.TOPK_IN_KERNEL): every program finds its
        # row's (threshold, tie cut) itself from the whole row, which is in L2 (K <= TOPK_BLOCK), in
        # place of the select kernel's launch and the load of its result; the same arithmetic as
        # that kernel, so the same channels
        thr, jcut = topk_row_threshold(p_x, p_scale, i_m, K, keep, s_xm, s_xk, HAS_SCALE, TOPK_BLOCK,
                                       TOPK_DIGIT_BITS, TOPK_LOW_BIT, TOPK_TOP_BIT)
    elif PER_ROW:
        thr = tl.load(p_thr + i_m)
        jcut = tl.load(p_jcut + i_m)
    else:
        thr = tl.load(p_thr)
        jcut = i_m
    k_lo = i_k * CHUNK
    k_hi = tl.minimum(k_lo + CHUNK, K)
    o_m = i_m + tl.arange(0, 1)
    m_m = o_m < M
    if HAS_LOWRANK and i_n >= n_tiles_w:
        # z = V ((1 - m) x): the list of the dropped channels, in its own scratch row, over
        # K chunks of CHUNK_V >= CHUNK (n_split_v programs add into z; the programs of
        # this column past them have nothing to do)
        if i_k < n_split_v:
            i_col = i_n - n_tiles_w
            k_lo_v = i_k * CHUNK_V
            k_hi_v = tl.minimum(k_lo_v + CHUNK_V, K)
            acc = _compact_tile(p_x, p_v, p_scale, p_list + (M + i_m) * list_cols, i_m, thr, jcut, k_lo_v,
                                k_hi_v, i_col, R, s_xm, s_xk, s_vk, BLOCK_R, BLOCK_KV, CHUNK_V, HAS_SCALE,
                                PER_ROW, True, AHEAD, EVICT, 1)
            o_r = i_col * BLOCK_R + tl.arange(0, BLOCK_R)
            m_out = m_m[:, None] & (o_r < R)[None, :]
            _finish(acc, 1, i_n, i_m, N, o_m, o_r, m_out, p_acc, p_count, p_fx, p_bias, p_out, p_y32, p_z,
                    N, R, ws_cols, s_om, s_on, n_split_v, 1, BLOCK_R, HAS_BIAS, HAS_LOWRANK, SPLIT_V, FIXED)
    else:
        _compact_w_program(p_x, p_w, p_scale, p_list, p_acc, p_count, p_fx, p_bias, p_out, p_y32, p_z,
                           i_n, i_m, o_m, m_m, thr, jcut, k_lo, k_hi, N, R, ws_cols, list_cols,
                           s_xm, s_xk, s_wk, s_om, s_on, BLOCK_N, BLOCK_K, CHUNK, HAS_SCALE, PER_ROW, HAS_BIAS,
                           HAS_LOWRANK, SPLIT, FIXED, AHEAD, EVICT, STAGES)


@triton.jit
def _compact_w_program(p_x, p_w, p_scale, p_list, p_acc, p_count, p_fx, p_bias, p_out, p_y32, p_z,
                       i_n, i_m, o_m, m_m, thr, jcut, k_lo, k_hi, N, R, ws_cols, list_cols,
                       s_xm, s_xk, s_wk, s_om, s_on,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
                       HAS_SCALE: tl.constexpr, PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_LOWRANK: tl.constexpr, SPLIT: tl.constexpr, FIXED: tl.constexpr, AHEAD: tl.constexpr,
                       EVICT: tl.constexpr, STAGES: tl.constexpr):
    # the w_t tile i_n of a compact program: its selected channels' rows -> out (or y32)
    acc = _compact_tile(p_x, p_w, p_scale, p_list + i_m * list_cols, i_m, thr, jcut, k_lo, k_hi,
                        i_n, N, s_xm, s_xk, s_wk, BLOCK_N, BLOCK_K, CHUNK, HAS_SCALE, PER_ROW, False, AHEAD,
                        EVICT, STAGES)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_out = m_m[:, None] & (o_n < N)[None, :]
    _finish(acc, 0, i_n, i_m, 0, o_m, o_n, m_out, p_acc, p_count, p_fx, p_bias, p_out, p_y32, p_z,
            N, R, ws_cols, s_om, s_on, tl.num_programs(1), 1, BLOCK_N, HAS_BIAS, HAS_LOWRANK, SPLIT, FIXED)


# ---------------------------------------------------------------------------
# several rows per program over a compact list of the channels any of them selected
# ---------------------------------------------------------------------------


@triton.jit
def _union_gather(p_x, p_w, p_scale, b_idx, j0, n_sel, o_m, m_m, b_thr, b_jcut, o_n, m_n, s_xm, s_xk, s_wk,
                  BLOCK_K: tl.constexpr, HAS_SCALE: tl.constexpr, PER_ROW: tl.constexpr, EVICT: tl.constexpr):
    # union list entries [j0, j0 + BLOCK_K) (channel indices b_idx) -> each row's x on them, 0 where
    # that row did not select the channel ([ROWS, BLOCK_K] f32: a row multiplies only its own
    # channels, its selection re-evaluated on the gathered x), and the weight rows [BLOCK_K, BLOCK_N]
    m_j = (j0 + tl.arange(0, BLOCK_K)) < n_sel
    m_xg = m_m[:, None] & m_j[None, :]
    b_xg = tl.load(p_x + o_m[:, None] * s_xm + b_idx[None, :] * s_xk, mask=m_xg, other=0.0).to(tl.float32)
    b_xs = tl.where(_select(b_xg, b_idx, m_j, b_thr, b_jcut, p_scale, HAS_SCALE, PER_ROW) & m_xg, b_xg, 0.0)
    # every unmasked row is a channel some row selected: each weight load is useful bytes
    b_w = tl.load(p_w + b_idx[:, None] * s_wk + o_n[None, :], mask=m_j[:, None] & m_n[None, :], other=0.0,
                  eviction_policy=EVICT)
    return b_xs, b_w


@triton.jit
def _row_threshold(p_thr, p_jcut, row, M, PER_ROW: tl.constexpr):
    # one token row's threshold and tie cut (exact top-k: per row; else the layer's one threshold,
    # tie cut unused), as _row_group loads them for a group
    if PER_ROW:
        return (tl.load(p_thr + row, mask=row < M, other=0.0),
                tl.load(p_jcut + row, mask=row < M, other=-1))
    return tl.load(p_thr), row


@triton.jit
def _row_selected_x(p_x, b_scale, row, M, thr, jcut, b_idx, m_j, s_xm, s_xk,
                    HAS_SCALE: tl.constexpr, PER_ROW: tl.constexpr):
    # one row's x on the gathered channels b_idx [BLOCK_K], f32, 0 where that row did not select the
    # channel (the same f32 score as _select, the rule of _kept) or the row is past M
    # the row test as a vector (the interpreter rejects a scalar-and-vector mask)
    m_x = m_j & ((b_idx * 0 + row) < M)
    b_x = tl.load(p_x + row * s_xm + b_idx * s_xk, mask=m_x, other=0.0).to(tl.float32)
    b_score = tl.abs(b_x)
    if HAS_SCALE:
        b_score = b_score * b_scale
    return tl.where(_kept(b_score, thr, b_idx, jcut, PER_ROW) & m_x, b_x, 0.0)


@triton.jit
def _union_fma_step(p_x, p_w, p_scale, b_idx, row0, M, j0, n_sel, o_n, m_n, s_xm, s_xk, s_wk,
                    t0, c0, t1, c1, t2, c2, t3, c3,
                    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SCALE: tl.constexpr, PER_ROW: tl.constexpr,
                    EVICT: tl.constexpr):
    # union list entries [j0, j0 + BLOCK_K) (channel indices b_idx) -> the weight rows
    # [BLOCK_K, BLOCK_N] and each row's selected x [BLOCK_K] (rows 2 and 3 only with ROWS = 4; else
    # copies of row 1 that the caller never adds)
    m_j = (j0 + tl.arange(0, BLOCK_K)) < n_sel
    # every unmasked row is a channel some row selected: each weight load is useful bytes
    b_w = tl.load(p_w + b_idx[:, None] * s_wk + o_n[None, :], mask=m_j[:, None] & m_n[None, :], other=0.0,
                  eviction_policy=EVICT)
    # (Staging each row's selected x next to the union list instead of gathering it here was
    # measured in session 21: 0.94-1.73x this loop's time, union_rows_fma_staged_h200.md; removed in
    # session 25, the code is at b21387c.)
    b_scale = m_j.to(tl.float32)  # unused without channel scores
    if HAS_SCALE:
        b_scale = tl.load(p_scale + b_idx, mask=m_j, other=0.0).to(tl.float32)
    x0 = _row_selected_x(p_x, b_scale, row0, M, t0, c0, b_idx, m_j, s_xm, s_xk, HAS_SCALE, PER_ROW)
    x1 = _row_selected_x(p_x, b_scale, row0 + 1, M, t1, c1, b_idx, m_j, s_xm, s_xk, HAS_SCALE, PER_ROW)
    x2 = x1
    x3 = x1
    if ROWS == 4:
        x2 = _row_selected_x(p_x, b_scale, row0 + 2, M, t2, c2, b_idx, m_j, s_xm, s_xk, HAS_SCALE, PER_ROW)
        x3 = _row_selected_x(p_x, b_scale, row0 + 3, M, t3, c3, b_idx, m_j, s_xm, s_xk, HAS_SCALE, PER_ROW)
    return b_w, x0, x1, x2, x3


@triton.jit
def _fma_zeros(BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, STEP_SUM: tl.constexpr):
    # one row's accumulator of the FMA union loop: [BLOCK_N] with per-step sums, else the
    # [BLOCK_K, BLOCK_N] register tile summed after the loop (one return: Triton checks every
    # return of a function against the others, also in a branch its constexpr drops)
    if STEP_SUM:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    return acc


@triton.jit
def _fma_add(acc, b_x, b_wf, STEP_SUM: tl.constexpr):
    # one row's FMAs of a list step: x [BLOCK_K] times the weight rows [BLOCK_K, BLOCK_N]
    if STEP_SUM:
        acc += tl.sum(b_x[:, None] * b_wf, axis=0)
    else:
        acc += b_x[:, None] * b_wf
    return acc


@triton.jit
def _fma_total(acc, STEP_SUM: tl.constexpr):
    # one row's accumulator -> [1, BLOCK_N]
    if STEP_SUM:
        out = acc[None, :]
    else:
        out = tl.sum(acc, axis=0)[None, :]
    return out


@triton.jit
def _union_fma_rows(p_x, p_w, p_scale, p_thr, p_jcut, p_lst, i_g, M, n_sel, o_n, m_n,
                    s_xm, s_xk, s_wk, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    HAS_SCALE: tl.constexpr, PER_ROW: tl.constexpr, EVICT: tl.constexpr,
                    AHEAD_STEPS: tl.constexpr, STEP_SUM: tl.constexpr):
    # -> acc [ROWS, BLOCK_N] f32 over the union list's n_sel channels, ROWS = 2 or 4, without tl.dot:
    # one [BLOCK_K, BLOCK_N] register tile of FMAs per row, in the weight load's own layout, reduced
    # once after the loop -- the one-row compact loop (_compact_tile) with each gathered weight row
    # feeding ROWS tiles. A first version kept one [ROWS, BLOCK_K, BLOCK_N] tile: Triton gave it a
    # layout of one element per thread, so every step moved the weight tile through shared memory
    # to it (a convert_layout in the loop) and the union streamed at 1.2-1.7x dense where per-row
    # streamed at its usual speed (session 20, benchmarks/results/union_rows_fma_3d_h200.json).
    # Why the 2-row loop read a dense union at 2.8 TB/s where the one-row loop reads 3.3 (session 21,
    # ncu_fma_h200.md): ROWS accumulator tiles of f32 take the registers the one-row loop spends on a
    # twice larger weight step, so the 2-row loop could only afford 8 KB steps, the one-row loop 16 KB.
    # AHEAD_STEPS (1 or 2): list steps whose gathers are in flight while a step's FMAs run. Two steps
    # ahead was the first answer to that; measured slower on the H200 (session 21), the sweep ranks one.
    # STEP_SUM: each step's products summed over its BLOCK_K rows at once into a [BLOCK_N] accumulator
    # per row. The launcher sets it where Triton's layout of the weight tile puts all its warps along N
    # (launchers.fma_step_sum): each thread then holds whole columns of the step and the sum stays in
    # its registers, so 16 KB steps (1024 x 8, 2048 x 4 at 4 warps) build in 154-167 registers without
    # a stack (union_rows_fma_sum_h200.md: a dense union at 2 tokens 1.20-1.42x dense, was 1.23-1.64x).
    row0 = i_g * ROWS
    t0, c0 = _row_threshold(p_thr, p_jcut, row0, M, PER_ROW)
    t1, c1 = _row_threshold(p_thr, p_jcut, row0 + 1, M, PER_ROW)
    t2, c2 = _row_threshold(p_thr, p_jcut, row0 + 2, M, PER_ROW)
    t3, c3 = _row_threshold(p_thr, p_jcut, row0 + 3, M, PER_ROW)
    acc0 = _fma_zeros(BLOCK_K, BLOCK_N, STEP_SUM)
    acc1 = _fma_zeros(BLOCK_K, BLOCK_N, STEP_SUM)
    acc2 = _fma_zeros(BLOCK_K, BLOCK_N, STEP_SUM)
    acc3 = _fma_zeros(BLOCK_K, BLOCK_N, STEP_SUM)
    # hand pipeline as _compact_tile with AHEAD: the list entries one step ahead of the gathers, the
    # gathers AHEAD_STEPS ahead of the FMAs, so no gather waits for its own list load
    b_idx = _load_list(p_lst, 0, n_sel, BLOCK_K)
    b_w, x0, x1, x2, x3 = _union_fma_step(p_x, p_w, p_scale, b_idx, row0, M, 0, n_sel, o_n, m_n,
                                          s_xm, s_xk, s_wk, t0, c0, t1, c1, t2, c2, t3, c3,
                                          ROWS, BLOCK_K, HAS_SCALE, PER_ROW, EVICT)
    if AHEAD_STEPS == 2:
        b_idx = _load_list(p_lst, BLOCK_K, n_sel, BLOCK_K)
        b_w_2nd, y0, y1, y2, y3 = _union_fma_step(p_x, p_w, p_scale, b_idx, row0, M, BLOCK_K, n_sel,
                                                  o_n, m_n, s_xm, s_xk, s_wk, t0, c0, t1, c1, t2, c2,
                                                  t3, c3, ROWS, BLOCK_K, HAS_SCALE, PER_ROW, EVICT)
    b_idx = _load_list(p_lst, AHEAD_STEPS * BLOCK_K, n_sel, BLOCK_K)
    for j0 in range(AHEAD_STEPS * BLOCK_K, n_sel + AHEAD_STEPS * BLOCK_K, BLOCK_K):
        # the last AHEAD_STEPS trips load nothing (every entry masked off) and only compute
        b_w_next, x0_next, x1_next, x2_next, x3_next = _union_fma_step(
            p_x, p_w, p_scale, b_idx, row0, M, j0, n_sel, o_n, m_n, s_xm, s_xk, s_wk,
            t0, c0, t1, c1, t2, c2, t3, c3, ROWS, BLOCK_K, HAS_SCALE, PER_ROW, EVICT)
        b_idx = _load_list(p_lst, j0 + BLOCK_K, n_sel, BLOCK_K)
        b_wf = b_w.to(tl.float32)
        acc0 = _fma_add(acc0, x0, b_wf, STEP_SUM)
        acc1 = _fma_add(acc1, x1, b_wf, STEP_SUM)
        if ROWS == 4:
            acc2 = _fma_add(acc2, x2, b_wf, STEP_SUM)
            acc3 = _fma_add(acc3, x3, b_wf, STEP_SUM)
        if AHEAD_STEPS == 2:
            # the second step in flight moves up; the step just issued takes its place
            b_w = b_w_2nd
            x0 = y0
            x1 = y1
            x2 = y2
            x3 = y3
            b_w_2nd = b_w_next
            y0 = x0_next
            y1 = x1_next
            y2 = x2_next
            y3 = x3_next
        else:
            b_w = b_w_next
            x0 = x0_next
            x1 = x1_next
            x2 = x2_next
            x3 = x3_next
    o_r = tl.arange(0, ROWS)[:, None]
    acc = tl.where(o_r == 0, _fma_total(acc0, STEP_SUM), _fma_total(acc1, STEP_SUM))
    if ROWS == 4:
        acc = tl.where(o_r == 2, _fma_total(acc2, STEP_SUM), acc)
        acc = tl.where(o_r == 3, _fma_total(acc3, STEP_SUM), acc)
    return acc


@triton.jit
def sparse_gemv_union_compact_kernel(
    p_x, p_w, p_scale, p_thr, p_jcut, p_bias, p_list,
    p_acc, p_count, p_fx, p_out,
    M, N, K, ws_cols, list_cols,
    s_xm, s_xk, s_wk, s_om, s_on,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
    HAS_SCALE: tl.constexpr, PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr, FIXED: tl.constexpr, DOT_F32: tl.constexpr, GDC: tl.constexpr, EVICT: tl.constexpr,
    LIST_AHEAD: tl.constexpr, AHEAD_STEPS: tl.constexpr, STEP_SUM: tl.constexpr,
):
    # x [M, K]  w_t [K, N]  scale [K]  thr [1] or [M] f32  jcut [M] i32  bias [N]
    # list [row_groups, list_cols] i32 (scratch: the union list of each row group)
    # acc / count / fx: the split-K workspace (sparse_gemv_kernel)  out [M, N]
    # grid (cdiv(N, BLOCK_N), cdiv(K, CHUNK), cdiv(M, ROWS)). One program = ROWS token rows x one
    # output tile x one K chunk.
    # The union program of sparse_gemv_kernel (ROWS > 1) walks every K step of its split with
    # predicated row loads: on the H200 its time hardly follows the selection (session 16,
    # benchmarks/results/union_rows_h200.json: 1.0-1.3x dense at a union density of 0.19). Here
    # the chunk's union of the rows' selections is compacted first, as the one-row compact kernel
    # does for one row, so the loop runs n_union / BLOCK_K steps over gathered weight rows; each
    # row still multiplies only its own channels (its selection re-evaluated on the gathered x).
    # The loop is left to Triton's pipeliner (num_stages): no hand pipeline around tl.dot
    # (_masked_tile says why). LIST_AHEAD (launchers.UNION_LIST_AHEAD) carries only the list
    # entries one step ahead, not dot operands: a step's gathers then wait for their own weight
    # and x loads, not for the list load before them (the chain the one-row compact kernel's
    # AHEAD removed). Measured in session 16 without it: 1.4-2.3x dense on a dense union.
    # ROWS < 16 (2, 4): no tl.dot (it needs 16 rows) but FMAs on register tiles, hand
    # pipelined as the one-row compact loop that streams its rows at 87-105% of copy bandwidth
    # (_union_fma_rows); a step of 2 tokens no longer pays 16 rows of dot operands.
    _await_previous_kernel(GDC, GDC)
    i_n = tl.program_id(0)
    i_k = tl.program_id(1)
    i_g, o_m, m_m, b_thr, b_jcut = _row_group(p_thr, p_jcut, M, ROWS, PER_ROW)
    k_lo = i_k * CHUNK
    k_hi = tl.minimum(k_lo + CHUNK, K)
    # the chunk's union list: the channels any row of the group selected
    o_k = k_lo + tl.arange(0, CHUNK)
    m_k = o_k < k_hi
    b_x = _load_x(p_x, o_m, m_m, k_lo, k_hi, s_xm, s_xk, CHUNK)
    b_sel = _select(b_x, o_k, m_k, b_thr, b_jcut, p_scale, HAS_SCALE, PER_ROW) & m_m[:, None] & m_k[None, :]
    p_lst = p_list + i_g * list_cols + k_lo
    m_union = tl.max(b_sel.to(tl.int32), axis=0) > 0
    n_sel = _store_list(p_lst, o_k, m_union)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    if ROWS < 16:
        acc = _union_fma_rows(p_x, p_w, p_scale, p_thr, p_jcut, p_lst, i_g, M, n_sel, o_n, m_n,
                              s_xm, s_xk, s_wk, ROWS, BLOCK_N, BLOCK_K, HAS_SCALE, PER_ROW, EVICT,
                              AHEAD_STEPS, STEP_SUM)
    else:
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        if LIST_AHEAD:
            b_idx_next = _load_list(p_lst, 0, n_sel, BLOCK_K)
        for j0 in range(0, n_sel, BLOCK_K):
            if LIST_AHEAD:
                b_idx = b_idx_next
                b_idx_next = _load_list(p_lst, j0 + BLOCK_K, n_sel, BLOCK_K)
            else:
                b_idx = _load_list(p_lst, j0, n_sel, BLOCK_K)
            b_xs, b_w = _union_gather(p_x, p_w, p_scale, b_idx, j0, n_sel, o_m, m_m, b_thr, b_jcut, o_n, m_n,
                                      s_xm, s_xk, s_wk, BLOCK_K, HAS_SCALE, PER_ROW, EVICT)
            acc = _rows_dot(b_xs, b_w, acc, DOT_F32)
    m_out = m_m[:, None] & m_n[None, :]
    _finish(acc, 0, i_n, i_g, 0, o_m, o_n, m_out, p_acc, p_count, p_fx, p_bias, p_out, p_out, p_out,
            N, 0, ws_cols, s_om, s_on, tl.num_programs(1), ROWS, BLOCK_N, HAS_BIAS, False, SPLIT, FIXED)
