"""The one torch custom op the LinearMethod calls: ``torch.ops.rsparse.sparse_linear``.

Why a custom op: vLLM traces ``apply()`` with torch.compile and captures CUDA graphs
per batch size. A Python ``if num_tokens <= max_sparse_tokens`` inside a traced
apply() would be frozen at trace time for every size; inside an opaque op it runs
each call, on shapes only (no host sync), so every captured size gets the right path.

The op chooses, in this order:
  tokens > max_sparse_tokens        -> dense F.linear (prefill and large batches)
  CUDA tensors and a Triton kernel  -> vllm_rsparse.launchers (kernels/)
  otherwise                         -> vllm_rsparse.reference (pure PyTorch)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_rsparse import reference

# A keep value that means "selection by threshold" (custom ops take no Optional[int]).
THRESHOLD_SELECTION = -1


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dense fallback on the stored layout. weight may be a transposed view of a
    [K, N]-contiguous buffer: F.linear hands that to BLAS as a transposed operand."""
    return F.linear(x, weight, bias)


def _sparse_path(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor | None,
    keep: int,
    channel_scale: torch.Tensor | None,
    lowrank_up: torch.Tensor | None,
    lowrank_down: torch.Tensor | None,
    use_crossover: bool = True,
    sparsity: float = -1.0,
) -> torch.Tensor:
    if x.is_cuda:
        from vllm_rsparse import launchers

        if launchers.triton_supported(x, weight):
            return launchers.sparse_linear(
                x, weight, bias, threshold, keep, channel_scale, lowrank_up, lowrank_down,
                use_crossover=use_crossover, sparsity=None if sparsity < 0 else sparsity,
            )
    return reference.sparse_linear(
        x,
        weight,
        bias,
        threshold=threshold if keep == THRESHOLD_SELECTION else None,
        keep=None if keep == THRESHOLD_SELECTION else keep,
        channel_scale=channel_scale,
        lowrank_up=lowrank_up,
        lowrank_down=lowrank_down,
    )


@torch.library.custom_op("rsparse::sparse_linear", mutates_args=())
def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor | None,
    keep: int,
    channel_scale: torch.Tensor | None,
    lowrank_up: torch.Tensor | None,
    lowrank_down: torch.Tensor | None,
    max_sparse_tokens: int,
    use_crossover: bool,
    sparsity: float = -1.0,
) -> torch.Tensor:
    """x [M, K]  weight [N, K] (any strides)  bias [N]  threshold [1] f32
    channel_scale [K]  lowrank_up [N, r]  lowrank_down [r, K]  ->  y [M, N]

    keep == THRESHOLD_SELECTION selects by threshold, keep >= 0 by exact top-k.
    use_crossover: let the kernels fall back to dense where their measured crossover
    says dense is faster. False when the user set the limit explicitly (e.g. "every
    token sparse" for quality evaluation, or a speed experiment).
    sparsity: the module's calibrated input sparsity (-1: unknown); it picks the kernel
    config tuned for that sparsity band (launchers.pick_config), never the selection.
    """
    if x.shape[0] > max_sparse_tokens:
        return dense_linear(x, weight, bias)
    return _sparse_path(x, weight, bias, threshold, keep, channel_scale, lowrank_up, lowrank_down,
                        use_crossover, sparsity)


@sparse_linear.register_fake
def _sparse_linear_fake(
    x, weight, bias, threshold, keep, channel_scale, lowrank_up, lowrank_down, max_sparse_tokens, use_crossover,
    sparsity=-1.0,
):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("rsparse::cpu_selection_mask", mutates_args=())
def cpu_selection_mask(x: torch.Tensor, threshold: torch.Tensor | None, keep: int,
                       score_weight: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] -> mask [M, K] bool: the channels each row keeps (reference.threshold_mask /
    topk_mask). An opaque op so that the mask is taken on x as the GEMM multiplies it, as the GPU
    kernels take it: traced inline, Inductor fuses the score into the kernel that produces x and
    compares the float32 value before its rounding to x's dtype. (End to end that was not what
    moves a compiled engine's perplexity from an eager one's: benchmarks/results/
    compiled_cpu_opaque_mask.md.)"""
    if keep == THRESHOLD_SELECTION:
        return reference.threshold_mask(x, threshold, score_weight)
    return reference.topk_mask(x, keep, score_weight)


@cpu_selection_mask.register_fake
def _cpu_selection_mask_fake(x, threshold, keep, score_weight):
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)


def cpu_sparse_linear(
    cpu_linear,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: torch.Tensor | None,
    keep: int,
    score_weight: torch.Tensor | None,
    lowrank_up: torch.Tensor | None,
    lowrank_down: torch.Tensor | None,
    max_sparse_tokens: int,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """The CPU path: vLLM's own CPU GEMM (``cpu_linear``, oneDNN pre-packed) on the
    masked input, plus the low-rank term. Branch-free on the token count (the mask is
    OR-ed with "too many tokens"), so a traced graph stays right for every size.

    batch_invariant (RSPARSE_BATCH_INVARIANT=1): every token is masked whatever the
    batch size, and both GEMMs run in fixed blocks of rows, so a row's result does not
    depend on the rows it is batched with (vllm_rsparse.batch_invariant).

    x [M, K]  weight [N, K]  ->  y [M, N]
    """
    mask = cpu_selection_mask(x, threshold, keep, score_weight)
    if not batch_invariant:
        too_many_tokens = torch.full((), x.shape[0], dtype=torch.int64) > max_sparse_tokens
        mask = mask | too_many_tokens
    kept = torch.where(mask, x, torch.zeros((), dtype=x.dtype))
    if batch_invariant:
        from vllm_rsparse.batch_invariant import blocked_linear

        y = blocked_linear(cpu_linear, kept, weight, bias)
    else:
        y = cpu_linear(kept, weight, bias)
    if lowrank_up is not None:
        dropped = (x - kept).float()
        if batch_invariant:
            inner = blocked_linear(torch.nn.functional.linear, dropped, lowrank_down.float(), None)
            low = blocked_linear(torch.nn.functional.linear, inner, lowrank_up.float(), None)
        else:
            low = (dropped @ lowrank_down.float().t()) @ lowrank_up.float().t()
        y = (y.float() + low).to(y.dtype)
    return y
