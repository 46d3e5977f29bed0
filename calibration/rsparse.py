"""R-Sparse: sparse channels by column-norm score + a low-rank term for the rest.

Per input group (q/k/v merged, o, gate/up merged, down), with W the MERGED matrix
[d_out, d_in] and target sparsity s (fraction of the group's weight bytes not read):

    score_j = |x_j| * ||W[:, j]||_2                       (score_weight = column norms)
    m_j     = score_j > t   (threshold)  |  top-k(score) (selection "topk")
    y       = W (m * x) + U_r S_r V_r^T ((1 - m) * x)
    k = (1-s) * a * d_in kept channels,  r = floor(((1-s) d_in d_out - k d_out) / (d_in + d_out))

The sparse share a is chosen per group by ``allocation.search_sparse_share``: an
exhaustive grid over a, scored by the group's output error on sampled calibration
inputs (see that function for why a decoupled grid, not the paper's evolutionary
search). The same code serves the combinations: score by |x| only, no low-rank term,
top-k instead of thresholds, and (through ``larosa``) a folded rotation first.

SVD and errors are float64; factors are stored bf16, thresholds/score weights fp32.
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_rsparse import architectures
from vllm_rsparse.architectures import InputGroup, ModelShapes
from vllm_rsparse.calibration.allocation import ShareChoice, search_sparse_share
from vllm_rsparse.calibration.result import CalibrationResult
from vllm_rsparse.calibration.stats import LogHistogram, run_calibration_forward
from vllm_rsparse.checkpoint import tensor_name
from vllm_rsparse.config import ModuleSettings

# Sparse shares tried per group. 1.0 = pure sparse (no low-rank); the paper's range ends at
# 0.02 (a = 0 would skip every channel, which the config rejects as input_sparsity 1).
DEFAULT_SHARE_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02)


@dataclasses.dataclass(frozen=True)
class RSparseOptions:
    """What the sparse+low-rank calibration does; the defaults are R-Sparse."""

    selection: str = "threshold"  # "threshold" (per-group quantile) or "topk" (exact per token)
    score_weight: bool = True  # score = |x| * column norm (False: |x| alone)
    lowrank: bool = True  # search the sparse share; False: a = 1 everywhere (no SVD term)
    share_grid: tuple[float, ...] = DEFAULT_SHARE_GRID
    samples_per_window: int = 64  # calibration rows kept per window per group, for the share search
    # cap on the low-rank factors' extra memory, as a fraction of each group's weight elements
    # (None: no cap; the search may then pick shares down to 0.02, factors up to ~(1 - s))
    max_factor_memory: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.selection not in ("threshold", "topk"):
            raise ValueError(f"selection must be 'threshold' or 'topk', got {self.selection!r}")
        if not self.share_grid or any(not 0.0 <= a <= 1.0 for a in self.share_grid):
            raise ValueError(f"share_grid must be values in [0, 1], got {self.share_grid}")
        if self.max_factor_memory is not None and not 0.0 <= self.max_factor_memory <= 1.0:
            raise ValueError(f"max_factor_memory must be in [0, 1], got {self.max_factor_memory}")
        if self.samples_per_window < 1:
            raise ValueError(f"samples_per_window must be >= 1, got {self.samples_per_window}")


def merged_weight(model, group_name: str, group: InputGroup) -> torch.Tensor:
    """[sum of member d_out, d_in] float64: the group's members stacked like vLLM merges them."""
    modules = dict(model.named_modules())
    base = group_name[: -len(group.merged_name)]
    return torch.cat([modules[base + m].weight.detach().double().cpu() for m in group.members], 0)


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W[:, j]||_2 per input channel. weight [d_out, d_in] -> [d_in] float64."""
    return weight.double().norm(dim=0)


@dataclasses.dataclass
class GroupStats:
    hist: LogHistogram  # of the selection score over every calibration token
    samples: list[torch.Tensor]  # sampled input rows [n_i, d_in] float32 (for the share search)

    def sample_matrix(self) -> torch.Tensor:
        return torch.cat(self.samples, 0).double()


def collect_group_stats(model, shapes: ModelShapes, windows: torch.Tensor,
                        scales: dict[str, torch.Tensor | None], options: RSparseOptions) -> dict[str, GroupStats]:
    """One forward pass: score histograms and a seeded sample of input rows per group."""
    gen = torch.Generator().manual_seed(options.seed)
    stats: dict[str, GroupStats] = {}

    def observe(name: str, x: torch.Tensor) -> None:
        st = stats.setdefault(name, GroupStats(LogHistogram(x.device), []))
        scale = scales[name]
        score = x.abs() if scale is None else x.abs() * scale.to(x.device, torch.float32)
        st.hist.add(score)
        n = min(options.samples_per_window, x.shape[0])
        rows = torch.randperm(x.shape[0], generator=gen)[:n]
        st.samples.append(x[rows.to(x.device)].cpu().clone())

    run_calibration_forward(model, windows, shapes, observe, desc="rsparse: score histograms")
    return stats


def group_tensors(group_name: str, group: InputGroup, shapes: ModelShapes, choice: ShareChoice,
                  scale: torch.Tensor | None, svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                  selection: str) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of every member of one group."""
    out = {}
    base = group_name[: -len(group.merged_name)]
    if choice.rank > 0:
        u, s, vh = svd
        up = (u[:, :choice.rank] * s[:choice.rank]).to(torch.bfloat16)  # U_r S_r of the merged matrix
        down = vh[:choice.rank].to(torch.bfloat16).contiguous()  # V_r^T, shared by all members
    row = 0
    for member in group.members:
        name = base + member
        d_out, _ = shapes.member_shape(member)
        if selection == "threshold":
            out[tensor_name(name, "threshold")] = torch.tensor([choice.threshold], dtype=torch.float32)
        if scale is not None:
            out[tensor_name(name, "score_weight")] = scale.float().clone()
        if choice.rank > 0:
            out[tensor_name(name, "lowrank_up")] = up[row:row + d_out].contiguous()
            out[tensor_name(name, "lowrank_down")] = down.clone()
        row += d_out
    return out


def calibrate_rsparse(model, shapes: ModelShapes, windows: torch.Tensor, sparsity: float,
                      options: RSparseOptions | None = None,
                      allocation: dict[str, float] | None = None) -> CalibrationResult:
    """R-Sparse (or a combination, per ``options``) at model-level sparsity ``sparsity``.

    allocation: per-group byte sparsity (default: ``sparsity`` for every group, which is
    the released R-Sparse recipe: s uniform, a per module).
    """
    options = options or RSparseOptions()
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    groups = list(architectures.iter_groups(shapes))
    weights = {name: merged_weight(model, name, group) for name, group in groups}
    scales = {name: column_norms(w) if options.score_weight else None for name, w in weights.items()}
    stats = collect_group_stats(model, shapes, windows, scales, options)

    modules, tensors, shares = {}, {}, {}
    grid = options.share_grid if options.lowrank else (1.0,)
    for name, group in groups:
        w = weights[name]
        s = allocation[name] if allocation is not None else sparsity
        svd = torch.linalg.svd(w, full_matrices=False) if options.lowrank and s > 0 else None
        choice = search_sparse_share(
            weight=w, svd=svd, samples=stats[name].sample_matrix(), hist=stats[name].hist,
            scale=scales[name], sparsity=s, grid=grid if s > 0 else (1.0,), selection=options.selection,
            max_factor_memory=options.max_factor_memory,
        )
        modules[name] = ModuleSettings(
            selection=options.selection,
            sparsity=s,
            input_sparsity=1.0 - choice.keep_fraction,
            keep=choice.keep if options.selection == "topk" else None,
            rank=choice.rank,
            score_weight=options.score_weight,
        )
        tensors.update(group_tensors(name, group, shapes, choice, scales[name], svd, options.selection))
        shares[name] = {"share": choice.share, "rank": choice.rank, "rel_error": round(choice.rel_error, 6)}
        del svd

    pure_sparse = sum(1 for v in shares.values() if v["share"] >= 1.0)
    info = {
        "selection": options.selection,
        "score": "abs(x) * column_norm" if options.score_weight else "abs(x)",
        "lowrank": options.lowrank,
        "share_search": "per-group exhaustive grid on group output error" if options.lowrank else "none (a = 1)",
        "share_grid": list(grid),
        "max_factor_memory": options.max_factor_memory,
        "groups_pure_sparse": f"{pure_sparse}/{len(shares)}",
        "per_group": shares,
    }
    return CalibrationResult(modules=modules, tensors=tensors, info=info)


def implied_read_fraction(shapes: ModelShapes, modules: dict[str, ModuleSettings]) -> float:
    """Weight bytes read per token implied by the stored settings, as a fraction of dense.

    kept channels * d_out + rank * (d_in + d_out), summed over groups (low-rank counted as read).
    """
    read = dense = 0.0
    for name, group in architectures.iter_groups(shapes):
        d_out, d_in = shapes.group_shape(group)
        st = modules[name]
        kept = st.keep if st.keep is not None else (1.0 - st.input_sparsity) * d_in
        read += kept * d_out + st.rank * (d_in + d_out)
        dense += d_in * d_out
    return read / dense

