"""Host launchers for the Triton kernels in kernels/ (owned by the kernels work).

Placeholder until the kernels land: no Triton path is claimed yet, so the op falls
back to the PyTorch reference.
"""

from __future__ import annotations

import torch


def triton_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return False


def sparse_linear(x, weight, bias, threshold, keep, channel_scale, lowrank_up, lowrank_down):
    raise NotImplementedError("no Triton sparse kernel is available")


def prepare_weight(weight: torch.Tensor) -> torch.Tensor:
    return weight
