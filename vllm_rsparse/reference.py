"""Pure-PyTorch reference of the rsparse sparse linear layer.

This module is the contract between the runtime (``RSparseLinearMethod``) and the
Triton kernels: every kernel is tested against these functions, and they are also
the runtime path wherever no kernel applies (CPU, the Triton interpreter off).

One formulation covers every method (see docs/checkpoint-format.md):

    score_j = |x_j| * channel_scale_j            (channel_scale = 1 when absent)
    m_j     = score_j > threshold                (selection "threshold": TEAL, R-Sparse)
            | j in topk(score, keep)             (selection "topk": LaRoSA)
    y       = W (m * x) + U (V ((1 - m) * x)) + bias

U = ``lowrank_up`` [N, r] and V = ``lowrank_down`` [r, K] are the R-Sparse low-rank
term (absent when r = 0). Masks are per token row: a kernel that reads the union of
several rows' channels must still give each row only its own channels.

All arithmetic is in float32 and cast to the input dtype once at the end, which is
also what the kernels do (bf16 arithmetic is inexact, and wrong in the interpreter).
"""

from __future__ import annotations

import torch


def channel_scores(x: torch.Tensor, channel_scale: torch.Tensor | None) -> torch.Tensor:
    """Selection score per input channel.

    x [M, K]  channel_scale [K] or None  ->  score [M, K] float32
    """
    score = x.float().abs()
    if channel_scale is not None:
        score = score * channel_scale.float()
    return score


def threshold_mask(
    x: torch.Tensor, threshold: torch.Tensor | float, channel_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Channels whose score exceeds the threshold (strictly), per row.

    x [M, K]  threshold scalar (0-d/1-element tensor or float)  ->  mask [M, K] bool
    """
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.float().reshape(())
    return channel_scores(x, channel_scale) > threshold


def topk_mask(x: torch.Tensor, keep: int, channel_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Exactly ``keep`` channels per row: those with the largest scores.

    Ties are broken by torch.topk (lowest index first on CPU); kernels must keep the
    same count per row but may break exact ties differently.
    x [M, K]  ->  mask [M, K] bool with mask.sum(-1) == keep for every row
    """
    n_channels = x.shape[-1]
    if not 0 <= keep <= n_channels:
        raise ValueError(f"keep must be in [0, {n_channels}], got {keep}")
    score = channel_scores(x, channel_scale)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if keep > 0:
        index = torch.topk(score, keep, dim=-1, sorted=False).indices
        mask.scatter_(-1, index, True)
    return mask


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    lowrank_up: torch.Tensor | None = None,
    lowrank_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = W (m * x) + U (V ((1 - m) * x)) + bias, in float32, cast to x.dtype.

    x [M, K]  weight [N, K]  mask [M, K] bool  bias [N]
    lowrank_up [N, r]  lowrank_down [r, K]  ->  y [M, N]
    """
    x32 = x.float()
    kept = torch.where(mask, x32, 0.0)
    y = kept @ weight.float().t()
    if lowrank_up is not None and lowrank_up.shape[-1] > 0:
        dropped = x32 - kept
        y = y + (dropped @ lowrank_down.float().t()) @ lowrank_up.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    threshold: torch.Tensor | float | None = None,
    keep: int | None = None,
    channel_scale: torch.Tensor | None = None,
    lowrank_up: torch.Tensor | None = None,
    lowrank_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """The rsparse linear layer: exactly one of ``threshold`` / ``keep`` selects channels.

    x [..., K]  weight [N, K]  ->  y [..., N]
    """
    if (threshold is None) == (keep is None):
        raise ValueError("sparse_linear needs exactly one of threshold= or keep=")
    lead_shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if threshold is not None:
        mask = threshold_mask(x2, threshold, channel_scale)
    else:
        mask = topk_mask(x2, keep, channel_scale)
    y = masked_linear(x2, weight, mask, bias, lowrank_up, lowrank_down)
    return y.reshape(*lead_shape, weight.shape[0])
