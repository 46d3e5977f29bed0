"""How a model-level sparsity budget is split: TEAL's greedy block allocation and the
R-Sparse sparse-share search.

Both measure errors on real calibration inputs; both are searches, not formulas.

* ``greedy_block_allocation`` (TEAL): inside each transformer layer, repeatedly raise
  by ``step`` the input sparsity of the group whose step costs the least extra output
  error per unit of parameter-weighted sparsity gained, until the layer's weighted
  sparsity reaches the target. One greedy path serves every target (a path point is
  recorded after each step; a target between two points is reached by a fractional
  last step). "Block" here is the attention sub-block (qkv, o) and the MLP sub-block
  (gate_up, down), each scored at its residual-stream output: both errors are in the
  same units, so they compete directly, and a step only invalidates the candidates of
  its own sub-block (2 forwards a step instead of 4 full-layer forwards). Each token's
  squared error is divided by its residual-stream norm^2 (see ``error``). What this
  ignores: the attention error's effect on the MLP input within the same layer.

* ``search_sparse_share`` (R-Sparse): with the group's byte budget fixed at s (the
  released recipe: s uniform, a per module), groups do not compete for budget, so the
  choice of a decouples per group and an exhaustive grid over a is optimal for the
  proxy (group output error on sampled inputs, relative per token). The paper's
  evolutionary search scores joint choices by model loss (~1 GPU-hour for 7B); on this
  2-core CPU that is out of reach, and the decoupled grid costs seconds. The low-rank error for every rank comes
  from one projection onto the right singular vectors:
      ||(W - W_r) d||^2 = sum_{i >= r} sigma_i^2 (v_i . d)^2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from vllm_rsparse import architectures
from vllm_rsparse.architectures import ModelShapes
from vllm_rsparse.calibration.stats import LogHistogram
from vllm_rsparse.launchers import LOWRANK_RANK_MULTIPLE

NEVER = float(torch.finfo(torch.float32).max)  # a finite threshold no score exceeds (a = 0)
SHARE_TIE = 1e-3  # prefer the larger sparse share when within 0.1% error: less low-rank work


# --------------------------------------------------------------------------- R-Sparse


@dataclasses.dataclass(frozen=True)
class ShareChoice:
    share: float  # a: fraction of the kept budget spent on sparse channels
    keep_fraction: float  # (1 - s) * a: expected fraction of input channels read
    keep: int  # channels per token for top-k selection (round of keep_fraction * d_in)
    threshold: float  # score threshold for threshold selection
    rank: int
    rel_error: float  # mean over sampled tokens of ||y - y_dense||^2 / ||y_dense||^2


def budget_rank(d_out: int, d_in: int, sparsity: float, kept: float) -> int:
    """r = floor(((1-s) d_in d_out - k d_out) / (d_in + d_out)), clamped to [0, min(d_in, d_out)]."""
    r = math.floor(((1.0 - sparsity) * d_in * d_out - kept * d_out) / (d_in + d_out) + 1e-9)
    return max(0, min(r, d_in, d_out))


# The decode kernels read the low-rank factors in rows of `rank` elements and need that
# to be a multiple of 16 for 16-byte loads (the plugin pads other ranks at load time,
# costing memory). Calibration rounds the budget rank down to it and gives the freed bytes
# back to the sparse part, so the byte budget holds.
RANK_MULTIPLE = LOWRANK_RANK_MULTIPLE


def aligned_budget(d_out: int, d_in: int, sparsity: float, keep_fraction: float) -> tuple[float, int]:
    """(keep fraction, rank) for a group at byte sparsity s: the budget rank of
    ``keep_fraction`` rounded down to a multiple of RANK_MULTIPLE (ranks below it are kept
    as they are), the dropped ranks' (d_in + d_out) bytes each turned into kept channels."""
    rank = budget_rank(d_out, d_in, sparsity, keep_fraction * d_in)
    if rank < RANK_MULTIPLE:
        return keep_fraction, rank
    aligned = rank - rank % RANK_MULTIPLE
    return keep_fraction + (rank - aligned) * (d_in + d_out) / (d_out * d_in), aligned


def search_sparse_share(*, weight: torch.Tensor, svd, samples: torch.Tensor, hist: LogHistogram,
                        scale: torch.Tensor | None, sparsity: float, grid: tuple[float, ...],
                        selection: str, max_factor_memory: float | None = None) -> ShareChoice:
    """Best sparse share a on ``grid`` for one group at byte sparsity ``sparsity``.

    weight [d_out, d_in] f64  svd (U, S, Vh) of weight or None  samples [n, d_in] f64
    max_factor_memory: shares whose low-rank factors (rank * (d_in + d_out) elements) would add
    more than this fraction of the group's weight elements are not tried (a = 1, no factors,
    always is): the factors are extra memory on top of the unchanged weights.
    """
    d_out, d_in = weight.shape
    if samples.shape[-1] != d_in:
        raise ValueError(f"samples have {samples.shape[-1]} channels, weight expects {d_in}")
    score = samples.abs() if scale is None else samples.abs() * scale.double()
    # Error per token relative to that token's output, then averaged: a plain sum of
    # squares is dominated by the few massive-activation tokens (attention sinks), and
    # a share tuned to them made perplexity worse (SmolLM2 @0.5: 26.9 vs 25.1).
    dense_norm = (samples @ weight.t()).pow(2).sum(-1).clamp_min(1e-300)  # [n]
    if svd is not None:
        _, sing, vh = svd
        right = vh.t() * sing  # [d_in, rmin]: d -> its components sigma_i (v_i . d)
    best: ShareChoice | None = None
    for share in sorted(set(grid), reverse=True):
        keep_fraction = (1.0 - sparsity) * share
        rank = 0
        if svd is not None:
            keep_fraction, rank = aligned_budget(d_out, d_in, sparsity, keep_fraction)
        if max_factor_memory is not None and rank * (d_in + d_out) > max_factor_memory * d_in * d_out:
            continue
        keep = round(keep_fraction * d_in)
        if selection == "topk":
            mask = torch.zeros_like(score, dtype=torch.bool)
            if keep > 0:
                mask.scatter_(-1, torch.topk(score, keep, dim=-1).indices, True)
            threshold = 0.0
        else:
            threshold = hist.quantile(1.0 - keep_fraction) if keep_fraction > 0 else NEVER
            mask = score > threshold
        dropped = torch.where(mask, 0.0, samples)
        if svd is not None:
            # ||(W - W_r) d||^2 per token: energy in the singular directions past r
            error = (dropped @ right[:, rank:]).pow(2).sum(-1)
        else:
            error = (dropped @ weight.t()).pow(2).sum(-1)
        rel_error = float((error / dense_norm).mean())
        choice = ShareChoice(share, keep_fraction, keep, threshold, rank, rel_error)
        if best is None or choice.rel_error < best.rel_error * (1.0 - SHARE_TIE):
            best = choice
    if best is None:
        raise ValueError(f"no sparse share of {sorted(set(grid), reverse=True)} keeps a [{d_out}, {d_in}] group's "
                         f"low-rank factors within max_factor_memory={max_factor_memory} (a share of 1.0 always does)")
    return best


# --------------------------------------------------------------------------- TEAL greedy

SUB_BLOCKS = {"qkv": "attn", "o": "attn", "gate_up": "mlp", "down": "mlp"}


@dataclasses.dataclass
class _SubBlockInputs:
    attn_kwargs: list[dict]  # self_attn(**kwargs) per window
    mlp_inputs: list[torch.Tensor]
    token_weights: list[torch.Tensor]  # 1 / ||h_t||^2 of the layer's residual input, [1, T, 1]


@torch.no_grad()
def _capture_sub_block_inputs(model, windows: torch.Tensor) -> list[_SubBlockInputs]:
    layers = model.model.layers
    captured = [_SubBlockInputs([], [], []) for _ in layers]
    handles = []

    def attn_hook(mod, args, kwargs, _l):
        kw = dict(kwargs)
        if args:
            kw["hidden_states"] = args[0]
        kw["hidden_states"] = kw["hidden_states"].detach().clone()
        kw.pop("past_key_values", None)
        kw.pop("past_key_value", None)
        captured[_l].attn_kwargs.append(kw)

    def layer_hook(mod, args, kwargs, _l):
        h = args[0] if args else kwargs["hidden_states"]
        captured[_l].token_weights.append(1.0 / h.detach().float().pow(2).sum(-1, keepdim=True).clamp_min(1e-12))

    def mlp_hook(mod, args, _l):
        captured[_l].mlp_inputs.append(args[0].detach().clone())

    try:
        for l, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(
                lambda m, a, k, _l=l: layer_hook(m, a, k, _l), with_kwargs=True))
            handles.append(layer.self_attn.register_forward_pre_hook(
                lambda m, a, k, _l=l: attn_hook(m, a, k, _l), with_kwargs=True))
            handles.append(layer.mlp.register_forward_pre_hook(lambda m, a, _l=l: mlp_hook(m, a, _l)))
        device = next(model.parameters()).device
        for i in range(windows.shape[0]):
            model(windows[i:i + 1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


@contextlib.contextmanager
def _masked_inputs(layer, thresholds: dict[str, float]):
    """Zero |x| <= t on the inputs of the layer's groups (kind -> t); hooks always removed."""
    attn, mlp = layer.self_attn, layer.mlp
    members = {"qkv": (attn.q_proj, attn.k_proj, attn.v_proj), "o": (attn.o_proj,),
               "gate_up": (mlp.gate_proj, mlp.up_proj), "down": (mlp.down_proj,)}
    handles = []
    try:
        for kind, t in thresholds.items():
            if t <= 0:
                continue
            for lin in members[kind]:
                handles.append(lin.register_forward_pre_hook(
                    lambda m, a, _t=t: (torch.where(a[0].abs() > _t, a[0], 0.0), *a[1:])))
        yield
    finally:
        for h in handles:
            h.remove()


def _sub_block_output(layer, inputs: _SubBlockInputs, which: str) -> list[torch.Tensor]:
    if which == "attn":
        return [layer.self_attn(**kw)[0] for kw in inputs.attn_kwargs]
    return [layer.mlp(x) for x in inputs.mlp_inputs]


@dataclasses.dataclass
class AllocationPath:
    """Greedy path of one layer: (weighted sparsity, {kind: input sparsity}) after each step."""

    points: list[tuple[float, dict[str, float]]]
    weights: dict[str, float]  # kind -> parameter share of the layer

    def at(self, target: float) -> dict[str, float]:
        pts = self.points
        if target <= 0:
            return {k: 0.0 for k in self.weights}
        for (w0, s0), (w1, s1) in zip(pts, pts[1:]):
            if w0 <= target <= w1 + 1e-12:
                changed = [k for k in s1 if s1[k] != s0[k]]
                out = dict(s0)
                if changed:  # fractional last step on the group the greedy raised
                    k = changed[0]
                    out[k] = s0[k] + (target - w0) / self.weights[k]
                return out
        raise ValueError(f"target sparsity {target} beyond the greedy path's end {pts[-1][0]:.3f}")


@torch.no_grad()
def greedy_block_allocation(model, shapes: ModelShapes, windows: torch.Tensor,
                            hists: dict[str, LogHistogram], max_target: float,
                            step: float = 0.05, max_group_sparsity: float = 0.95) -> dict[int, AllocationPath]:
    """TEAL greedy allocation path per layer, up to layer-weighted sparsity ``max_target``.

    windows [B, T]: a few calibration windows (their sub-block inputs are kept in memory).
    hists: |x| histograms per group (from ``teal.collect_abs_histograms``).
    """
    if not 0 < max_target <= max_group_sparsity:
        raise ValueError(f"max_target must be in (0, {max_group_sparsity}], got {max_target}")
    captured = _capture_sub_block_inputs(model, windows)
    kinds = [g.kind for g in architectures.INPUT_GROUPS]
    sizes = {g.kind: math.prod(shapes.group_shape(g)) for g in architectures.INPUT_GROUPS}
    total = sum(sizes.values())
    weights = {k: sizes[k] / total for k in kinds}
    paths: dict[int, AllocationPath] = {}
    for l, layer in enumerate(model.model.layers):
        names = {g.kind: architectures.layer_group_name(l, g) for g in architectures.INPUT_GROUPS}
        dense = {b: _sub_block_output(layer, captured[l], b) for b in ("attn", "mlp")}

        def error(levels: dict[str, float], block: str) -> float:
            thresholds = {k: hists[names[k]].quantile(levels[k]) if levels[k] > 0 else 0.0
                          for k in kinds if SUB_BLOCKS[k] == block}
            with _masked_inputs(layer, thresholds):
                outs = _sub_block_output(layer, captured[l], block)
            # Each token's error relative to its residual stream: unweighted, the few
            # massive-activation tokens dominate and the greedy piles sparsity onto
            # groups that hurt every other token (SmolLM2 @0.5: ppl 30.1 vs uniform 22.4).
            return sum(float(((o - d).float().pow(2) * w).sum())
                       for o, d, w in zip(outs, dense[block], captured[l].token_weights))

        levels = {k: 0.0 for k in kinds}
        current = {"attn": 0.0, "mlp": 0.0}
        candidates: dict[str, float] = {}

        def refresh(block: str) -> None:
            for k in kinds:
                if SUB_BLOCKS[k] == block:
                    if levels[k] + step <= max_group_sparsity + 1e-9:
                        candidates[k] = error({**levels, k: levels[k] + step}, block)
                    else:
                        candidates.pop(k, None)

        refresh("attn")
        refresh("mlp")
        points = [(0.0, dict(levels))]
        weighted = 0.0
        while weighted < max_target - 1e-12 and candidates:
            kind = min(candidates, key=lambda k: (candidates[k] - current[SUB_BLOCKS[k]]) / (step * weights[k]))
            block = SUB_BLOCKS[kind]
            levels[kind] = round(levels[kind] + step, 10)
            current[block] = candidates[kind]
            weighted += step * weights[kind]
            points.append((weighted, dict(levels)))
            refresh(block)
        paths[l] = AllocationPath(points=points, weights=weights)
        del captured[l].attn_kwargs[:], captured[l].mlp_inputs[:], captured[l].token_weights[:]
    return paths


def allocation_for_target(shapes: ModelShapes, paths: dict[int, AllocationPath], target: float) -> dict[str, float]:
    """Per-group input sparsity (vLLM group name -> s) with every layer at ``target``."""
    out = {}
    for l in range(shapes.num_layers):
        levels = paths[l].at(target)
        for g in architectures.INPUT_GROUPS:
            out[architectures.layer_group_name(l, g)] = min(max(levels[g.kind], 0.0), 0.99)
    return out


# --------------------------------------------------------------------------- layer search (model loss)


@dataclasses.dataclass(frozen=True)
class LayerSearchOptions:
    """Coarse greedy search of per-layer sparsity against the model's own loss.

    step: how far one move shifts a layer (coarse: smaller moves drown in the loss
    noise of a few calibration windows). windows: calibration windows scored per
    candidate (the cost is (2 * layers + a few) forwards of them per round).
    """

    step: float = 0.1
    windows: int = 2
    rounds: int = 1
    min_sparsity: float = 0.0
    max_sparsity: float = 0.9

    def __post_init__(self):
        if not 0 < self.step < 0.5:
            raise ValueError(f"step must be in (0, 0.5), got {self.step}")
        if self.windows < 1 or self.rounds < 1:
            raise ValueError(f"windows and rounds must be >= 1, got {self.windows}, {self.rounds}")
        if not 0 <= self.min_sparsity <= self.max_sparsity < 1:
            raise ValueError(f"need 0 <= min_sparsity <= max_sparsity < 1, got {self.min_sparsity}, {self.max_sparsity}")


@dataclasses.dataclass
class LayerSearchResult:
    levels: list[float]  # input sparsity of every group of layer l (uniform inside the layer)
    loss_uniform: float  # mean token NLL on the search windows, every layer at the target
    loss: float  # the same with ``levels``
    evaluations: int


def _window_loss(model, windows: torch.Tensor) -> float:
    """Mean next-token NLL over windows [B, T]."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(windows.shape[0]):
        ids = windows[i:i + 1].to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return nll / count


@torch.no_grad()
def layer_loss_allocation(model, shapes: ModelShapes, windows: torch.Tensor, hists: dict[str, LogHistogram],
                          target: float, options: LayerSearchOptions = LayerSearchOptions()) -> LayerSearchResult:
    """Per-layer TEAL sparsity with mean ``target``, chosen by the model loss (greedy, coarse).

    Every layer of these models has the same linear weight count, so the plain mean of
    the layer levels is the model-level byte sparsity: moves come in pairs (one layer
    up by ``step``, another down by ``step``), which keeps the mean at ``target``.
    Per round: the loss change of moving each layer alone up and alone down (2 L
    forwards of the search windows), then pair the cheapest raises with the most
    useful lowerings while the predicted sum is a gain. Effects are not exactly
    additive, so the joint move is measured and, if it is not better, halved until
    it is (or dropped). TEAL's own greedy scores sub-block outputs locally; this one
    scores what the user sees, at the cost of full forwards (on 2 CPU cores: minutes
    for SmolLM2, which is why the step is coarse and the rounds few).
    """
    from vllm_rsparse.calibration.teal import threshold_result
    from vllm_rsparse.evaluation.simulate import simulated_sparsity

    n_layers = shapes.num_layers
    search = windows[:options.windows]
    evaluations = 0

    def loss(levels: list[float]) -> float:
        nonlocal evaluations
        evaluations += 1
        per_group = {architectures.layer_group_name(l, g): levels[l]
                     for l in range(n_layers) for g in architectures.INPUT_GROUPS}
        res = threshold_result(shapes, hists, per_group)
        with simulated_sparsity(model, shapes, res.modules, res.tensors):
            return _window_loss(model, search)

    levels = [target] * n_layers
    base = loss_uniform = loss(levels)
    eps = 1e-9
    for _ in range(options.rounds):
        up, down = [math.inf] * n_layers, [math.inf] * n_layers
        for l in range(n_layers):
            if levels[l] + options.step <= options.max_sparsity + eps:
                up[l] = loss([*levels[:l], levels[l] + options.step, *levels[l + 1:]]) - base
            if levels[l] - options.step >= options.min_sparsity - eps:
                down[l] = loss([*levels[:l], levels[l] - options.step, *levels[l + 1:]]) - base
        raise_order = sorted(range(n_layers), key=up.__getitem__)
        lower_order = sorted(range(n_layers), key=down.__getitem__)
        pairs: list[tuple[int, int]] = []
        used: set[int] = set()
        for r in raise_order:
            if r in used:
                continue
            w = next((w for w in lower_order if w not in used and w != r), None)
            if w is None or not up[r] + down[w] < 0:
                break
            pairs.append((r, w))
            used.update((r, w))
        n = len(pairs)
        improved = False
        while n > 0:
            cand = list(levels)
            for r, w in pairs[:n]:
                cand[r] = round(cand[r] + options.step, 10)
                cand[w] = round(cand[w] - options.step, 10)
            value = loss(cand)
            if value < base:
                levels, base, improved = cand, value, True
                break
            n //= 2
        if not improved:
            break
    return LayerSearchResult(levels=levels, loss_uniform=loss_uniform, loss=base, evaluations=evaluations)
