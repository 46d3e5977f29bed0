"""LaRoSA: one global PCA rotation folded into the weights, then exact per-token top-k.

``rotation.fold_global_rotation`` turns the model (in place) into an equivalent one
whose residual stream lives in the PCA basis of the calibration inputs, with RMSNorm
gammas folded into the following weights; the checkpoint stays a standard
Llama/Qwen2 (lm_head untied), so vLLM serves it with no runtime rotation. Every group
then keeps exactly k = (1 - s) * d_in channels per token (selection "topk"): on q/k/v
and gate/up that is top-k of the rotated input, on o/down of the plain input, as in
the paper. Uniform s per group, so the model-level byte sparsity is s exactly (up to
rounding k).

The combinations reuse the R-Sparse code on the rotated model: ``options`` may add
column-norm scores, the low-rank term, or threshold selection.
"""

from __future__ import annotations

import torch

from vllm_rsparse.architectures import ModelShapes
from vllm_rsparse.calibration.result import CalibrationResult
from vllm_rsparse.calibration.rotation import fold_global_rotation
from vllm_rsparse.calibration.rsparse import RSparseOptions, calibrate_rsparse

LAROSA_OPTIONS = RSparseOptions(selection="topk", score_weight=False, lowrank=False)


def _mark_rotated(result: CalibrationResult, info: dict) -> None:
    """A result computed on the rotated model: the config says so and unties lm_head."""
    result.rotation = "global"
    result.config_overrides["tie_word_embeddings"] = False
    result.info.update(info)


def calibrate_larosa(model, shapes: ModelShapes, windows: torch.Tensor, sparsity: float,
                     options: RSparseOptions | None = None, allocation: str = "uniform") -> CalibrationResult:
    """Fold the global rotation into ``model`` (in place), then calibrate the selection.

    allocation "greedy" (a combination): TEAL's per-layer greedy split, searched on the
    rotated model, so it sees the inputs the selection will see.
    The caller exports the model's (now rotated) weights; lm_head is untied by the fold.
    """
    options = options or LAROSA_OPTIONS
    rotation = fold_global_rotation(model, shapes, windows)
    from vllm_rsparse.calibration.teal import greedy_split_or_none

    per_group = greedy_split_or_none(allocation, model, shapes, windows, sparsity)
    result = calibrate_rsparse(model, shapes, windows, sparsity, options, allocation=per_group)
    _mark_rotated(result, rotation.info)
    result.info["allocation"] = allocation
    return result
