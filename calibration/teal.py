"""TEAL: one magnitude threshold per input group, from calibration histograms.

m_j = 1[|x_j| > t] with t the s-quantile of |x| over calibration tokens (equivalently
F^-1(0.5 + s/2) of x under TEAL's zero-centred symmetric assumption). q/k/v share an
input and so one threshold, likewise gate/up. The per-group sparsity comes from
``allocation`` (uniform by default; greedy block allocation lives in its own module).
"""

from __future__ import annotations

import torch

from vllm_rsparse import architectures
from vllm_rsparse.architectures import ModelShapes
from vllm_rsparse.calibration.result import CalibrationResult
from vllm_rsparse.calibration.stats import LogHistogram, run_calibration_forward
from vllm_rsparse.checkpoint import tensor_name
from vllm_rsparse.config import ModuleSettings


def collect_abs_histograms(model, shapes: ModelShapes, windows: torch.Tensor) -> dict[str, LogHistogram]:
    hists: dict[str, LogHistogram] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        hists.setdefault(name, LogHistogram(x.device)).add(x.abs())

    run_calibration_forward(model, windows, shapes, observe, desc="teal: |x| histograms")
    return hists


def threshold_result(shapes: ModelShapes, hists: dict[str, LogHistogram],
                     allocation: dict[str, float]) -> CalibrationResult:
    """Thresholds at each group's allocated input sparsity."""
    modules, tensors = {}, {}
    for group_name, group in architectures.iter_groups(shapes):
        sparsity = allocation[group_name]
        threshold = hists[group_name].quantile(sparsity) if sparsity > 0 else 0.0
        modules[group_name] = ModuleSettings(selection="threshold", sparsity=sparsity, input_sparsity=sparsity)
        base = group_name[: -len(group.merged_name)]
        for member in group.members:
            tensors[tensor_name(base + member, "threshold")] = torch.tensor([threshold], dtype=torch.float32)
    return CalibrationResult(modules=modules, tensors=tensors)


ALLOCATIONS = ("uniform", "greedy", "layer-search")
GREEDY_WINDOWS = 2  # windows whose sub-block inputs the greedy search replays (kept in memory)


def greedy_group_sparsity(model, shapes: ModelShapes, windows: torch.Tensor, sparsity: float,
                          hists: dict[str, LogHistogram] | None = None) -> dict[str, float]:
    """Per-group sparsity from TEAL's greedy path, every layer at ``sparsity`` (weighted).

    Also used by the rsparse/larosa combinations (``--allocation greedy``): there the
    model may be rotated already, and the greedy then scores |x| thresholds on the
    rotated inputs, which is what a threshold selection on that model will apply.
    """
    from vllm_rsparse.calibration.allocation import allocation_for_target, greedy_block_allocation

    hists = hists if hists is not None else collect_abs_histograms(model, shapes, windows)
    paths = greedy_block_allocation(model, shapes, windows[:GREEDY_WINDOWS], hists, max_target=sparsity)
    return allocation_for_target(shapes, paths, sparsity)


def greedy_split_or_none(allocation: str, model, shapes: ModelShapes, windows: torch.Tensor,
                         sparsity: float) -> dict[str, float] | None:
    """The per-group split the rsparse/larosa combinations pass to calibrate_rsparse for an
    --allocation choice: TEAL's greedy split for "greedy", None (every group at
    ``sparsity``) for "uniform" or at sparsity 0."""
    if allocation == "greedy" and sparsity > 0:
        return greedy_group_sparsity(model, shapes, windows, sparsity)
    return None


def calibrate_teal(model, shapes: ModelShapes, windows: torch.Tensor, sparsity: float,
                   allocation: str = "uniform") -> CalibrationResult:
    """allocation "uniform": every group at ``sparsity``; "greedy": TEAL's per-layer
    greedy split (``allocation.greedy_block_allocation``), every layer at ``sparsity``
    parameter-weighted; "layer-search": per-layer levels (uniform inside a layer) with
    mean ``sparsity``, searched against the model loss (``allocation.layer_loss_allocation``).
    The model-level byte sparsity is ``sparsity`` in every case."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation is {allocation!r}; allowed values are {list(ALLOCATIONS)}")
    hists = collect_abs_histograms(model, shapes, windows)
    if allocation == "greedy" and sparsity > 0:
        per_group = greedy_group_sparsity(model, shapes, windows, sparsity, hists)
    elif allocation == "layer-search" and sparsity > 0:
        from vllm_rsparse.calibration.allocation import layer_loss_allocation

        found = layer_loss_allocation(model, shapes, windows, hists, sparsity)
        per_group = {architectures.layer_group_name(l, g): found.levels[l]
                     for l in range(shapes.num_layers) for g in architectures.INPUT_GROUPS}
        search_info = {"layer_sparsity": found.levels, "search_loss_uniform": round(found.loss_uniform, 5),
                       "search_loss": round(found.loss, 5), "search_evaluations": found.evaluations}
    else:
        per_group = {name: sparsity for name, _ in architectures.iter_groups(shapes)}
    result = threshold_result(shapes, hists, per_group)
    result.info["allocation"] = allocation
    if allocation == "layer-search" and sparsity > 0:
        result.info.update(search_info)
    return result
