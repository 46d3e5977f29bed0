"""H100 microbenchmark of the rsparse decode kernels against cuBLAS dense.

    python benchmarks/bench_kernels.py --out DIR [--tune] [--quick]

Per projection shape of Llama-2-7B and Llama-3-8B (qkv, o, gate_up, down), tokens
1/2/4/8/16 and input-channel sparsity 0..0.9, times:
  dense     F.linear on vLLM's default [N, K]-contiguous weight (cuBLAS, bf16)
  teal      threshold on |x|                                   (1 launch)
  rsparse   threshold on |x| * column norm                     (1 launch)
  rsparse_lowrank  the same + rank-64 correction U V((1-m)x)   (2 launches)
  larosa    exact top-k per token: select kernel + GEMV        (2 launches)
Timing: triton.testing.do_bench median; do_bench zeroes a 256 MB buffer before every
repetition, so weights never sit in the 50 MB L2; x rotates over several buffers.
GB/s counts the bytes actually read: weight rows of the union of the rows' selected
channels (+ low-rank factors), x, and the output.

--tune first sweeps block configs at sparsity 0.5 (per shape and token count, both
per-row and union programs) and benchmarks with the winners; it writes the tables
kernels/configs/sparse_gemv.json and kernels/configs/dispatch.json into --out.
Outputs: kernels_h100.json, kernels_h100.md, one PNG per shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from vllm_rsparse import launchers, reference

MODELS = {
    # hidden, intermediate, heads, kv heads (../shared/gpu/models/*/config.json)
    "llama2-7b": (4096, 11008, 32, 32),
    "llama3-8b": (4096, 14336, 32, 8),
}
TOKENS = [1, 2, 4, 8, 16]
SPARSITIES = [0.0, 0.3, 0.5, 0.7, 0.9]
METHODS = ["teal", "rsparse", "rsparse_lowrank", "larosa"]
LOWRANK_RANK = 64
X_BUFFERS = 4
DTYPE = torch.bfloat16
# RSPARSE_BENCH_DRY=1: a CPU dry run of the whole script under TRITON_INTERPRET=1 on
# tiny shapes with fake timings, to catch script errors before spending GPU time.
DRY_RUN = os.environ.get("RSPARSE_BENCH_DRY") == "1"
DEVICE = "cpu" if DRY_RUN else "cuda"
if DRY_RUN:
    MODELS = {"tiny": (256, 320, 4, 2)}


def projection_shapes() -> list[tuple[str, int, int]]:
    """(name, N, K) per model projection."""
    shapes = []
    for model, (h, inter, heads, kv) in MODELS.items():
        head_dim = h // heads
        shapes += [
            (f"{model}/qkv", h + 2 * kv * head_dim, h),
            (f"{model}/o", h, h),
            (f"{model}/gate_up", 2 * inter, h),
            (f"{model}/down", h, inter),
        ]
    return shapes


def distinct_shapes() -> list[tuple[str, int, int]]:
    """projection_shapes() without repeats of an (N, K) (Llama-3-8B's o_proj is Llama-2-7B's), first name kept."""
    seen, out = set(), []
    for name, n, k in projection_shapes():
        if (n, k) not in seen:
            seen.add((n, k))
            out.append((name, n, k))
    return out


def bench(fn, rep_ms: float = 20.0) -> float:
    if DRY_RUN:
        fn()
        return 0.01
    import triton

    return triton.testing.do_bench(fn, warmup=5, rep=rep_ms, return_mode="median")


def copy_bandwidth_gbs() -> float:
    if DRY_RUN:
        return 1.0
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), rep_ms=100)
    return 2 * src.numel() / ms / 1e6


class Layer:
    """Random weights of one projection, in the kernel layout and vLLM's layout."""

    def __init__(self, n: int, k: int, gen: torch.Generator):
        self.n, self.k = n, k
        w = torch.randn(n, k, device=DEVICE, generator=gen, dtype=torch.float32).mul_(k**-0.5).to(DTYPE)
        self.w_dense = w  # [N, K] contiguous: what vLLM's UnquantizedLinearMethod reads
        self.w_prep = launchers.prepare_weight(w)  # [K, N] storage
        self.scale = w.float().norm(dim=0)  # R-Sparse column norms
        self.u = torch.randn(n, LOWRANK_RANK, device=DEVICE, generator=gen).mul_(LOWRANK_RANK**-0.5).to(DTYPE)
        self.v_prep = launchers.prepare_weight(
            torch.randn(LOWRANK_RANK, k, device=DEVICE, generator=gen).mul_(k**-0.5).to(DTYPE)
        )

    def free(self):
        del self.w_dense, self.w_prep, self.u, self.v_prep


@dataclasses.dataclass
class Case:
    method: str
    tokens: int
    sparsity: float


def make_inputs(layer: Layer, case: Case, gen: torch.Generator):
    """x buffers, the op arguments and the bytes one call reads."""
    xs = [torch.randn(case.tokens, layer.k, device=DEVICE, generator=gen).to(DTYPE) for _ in range(X_BUFFERS)]
    scale = layer.scale if case.method.startswith("rsparse") else None
    lowrank = case.method == "rsparse_lowrank"
    k, n = layer.k, layer.n
    if case.method == "larosa":
        keep = round((1 - case.sparsity) * k)
        thr = None
        masks = [reference.topk_mask(x, keep, scale) for x in xs]
    else:
        keep = launchers.THRESHOLD_SELECTION
        score = torch.cat([reference.channel_scores(x, scale) for x in xs]).flatten()
        thr = (torch.quantile(score.float(), case.sparsity).reshape(1) if case.sparsity > 0
               else torch.tensor([-1.0], device=DEVICE))
        masks = [reference.threshold_mask(x, thr, scale) for x in xs]
    union = sum(m.any(0).float().mean().item() for m in masks) / len(masks)
    dropped_union = sum((~m).any(0).float().mean().item() for m in masks) / len(masks)
    elem = 2
    nbytes = union * k * n * elem + case.tokens * (k + n) * elem
    if lowrank:
        nbytes += dropped_union * k * LOWRANK_RANK * elem + n * LOWRANK_RANK * elem
    args = dict(
        weight=layer.w_prep, bias=None, threshold=thr, keep=keep, channel_scale=scale,
        lowrank_up=layer.u if lowrank else None, lowrank_down=layer.v_prep if lowrank else None,
    )
    return xs, args, nbytes, union


def rotating(fn_of_x, xs):
    it = itertools.cycle(xs)
    return lambda: fn_of_x(next(it))


# ---------------------------------------------------------------------------
# tuning
# ---------------------------------------------------------------------------

# (block_n, block_k) tiles, and K steps per program (split_k = K / (steps * block_k))
PER_ROW_TILES = [(64, 64), (64, 128), (128, 64), (128, 128), (256, 32)]
UNION_TILES = [(64, 64), (128, 64), (64, 128), (128, 128)]
STEPS_PER_PROGRAM = [1, 2, 4, 8]


def candidate_configs(n: int, k: int, tokens: int, sms: int) -> list[launchers.GemvConfig]:
    out = []
    row_kinds = [1] if tokens == 1 else [1, launchers.MAX_ROWS]
    for rows in row_kinds:
        tiles_list = PER_ROW_TILES if rows == 1 else UNION_TILES
        warps_list = [4, 8] if rows == 1 else [4]
        for (bn, bk), warps, steps in itertools.product(tiles_list, warps_list, STEPS_PER_PROGRAM):
            split = max(1, launchers.triton_cdiv(k, steps * bk))
            out.append(launchers.GemvConfig(rows, bn, bk, split, warps, 2))
    out = sorted(set(out), key=lambda c: dataclasses.astuple(c))
    return out[::len(out) // 2] if DRY_RUN else out


def tune(shapes, gen, log) -> tuple[dict, list]:
    sms = 4 if DRY_RUN else torch.cuda.get_device_properties(0).multi_processor_count
    table, union_vs_row = {}, []
    for name, n, k in shapes:
        key = launchers._shape_key(n, k)
        if key in table:
            continue
        layer = Layer(n, k, gen)
        table[key] = {}
        for tokens in TOKENS:
            xs, args, _, _ = make_inputs(layer, Case("teal", tokens, 0.5), gen)
            best = {}
            for cfg in candidate_configs(n, k, tokens, sms):
                fn = rotating(lambda x: launchers.sparse_linear(x, **args, config=cfg, use_crossover=False), xs)
                try:
                    ms = bench(fn, rep_ms=8)
                except Exception as exc:  # a config that does not compile is skipped, and logged
                    log(f"  skip {cfg}: {type(exc).__name__}: {exc}")
                    continue
                if cfg.rows not in best or ms < best[cfg.rows][0]:
                    best[cfg.rows] = (ms, cfg)
            rows_best = min(best.values(), key=lambda t: t[0])
            table[key][str(tokens)] = dataclasses.asdict(rows_best[1])
            entry = {"shape": name, "tokens": tokens,
                     **{("per_row_ms" if r == 1 else "union_ms"): v[0] for r, v in best.items()}}
            union_vs_row.append(entry)
            log(f"tune {name:18s} M={tokens:2d} best {rows_best[0] * 1e3:7.1f} us {rows_best[1]}  {entry}")
        layer.free()
    return table, union_vs_row


# ---------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------


def unfused_lowrank(x, args, config):
    """R-Sparse low-rank term in PyTorch ops next to the threshold kernel, for comparison."""
    w, thr, s, u, v = args["weight"], args["threshold"], args["channel_scale"], args["lowrank_up"], args["lowrank_down"]
    y = launchers.sparse_linear(x, w, None, thr, -1, s, None, None, config=config, use_crossover=False)
    dropped = torch.where(x.float().abs() * s > thr, 0.0, x.float())
    return (y.float() + (dropped @ v.float().t()) @ u.float().t()).to(x.dtype)


def run_bench(shapes, gen, configs: dict, log, quick: bool) -> tuple[list, list, list]:
    results, layout_rows, fusion_rows = [], [], []
    for name, n, k in shapes:
        layer = Layer(n, k, gen)
        key = launchers._shape_key(n, k)
        for tokens in TOKENS:
            cfg_raw = configs.get(key, {}).get(str(tokens))
            cfg = launchers.GemvConfig.from_dict(cfg_raw) if cfg_raw else None
            xs_dense = [torch.randn(tokens, k, device=DEVICE, generator=gen).to(DTYPE) for _ in range(X_BUFFERS)]
            dense_ms = bench(rotating(lambda x: F.linear(x, layer.w_dense), xs_dense))
            for method, sparsity in itertools.product(METHODS, SPARSITIES):
                if quick and method in ("rsparse", "rsparse_lowrank") and sparsity not in (0.5,):
                    continue
                case = Case(method, tokens, sparsity)
                xs, args, nbytes, union = make_inputs(layer, case, gen)
                ms = bench(rotating(lambda x: launchers.sparse_linear(x, **args, config=cfg, use_crossover=False), xs))
                results.append({
                    "shape": name, "n": n, "k": k, "method": method, "tokens": tokens, "sparsity": sparsity,
                    "dense_ms": dense_ms, "sparse_ms": ms, "gbs": nbytes / ms / 1e6,
                    "ratio": ms / dense_ms, "union_density": union, "bytes_read": nbytes,
                })
                if method == "rsparse_lowrank" and sparsity == 0.5 and tokens in (1, 16):
                    un_ms = bench(rotating(lambda x: unfused_lowrank(x, args, cfg), xs))
                    fusion_rows.append({"shape": name, "tokens": tokens, "sparsity": sparsity,
                                        "fused_ms": ms, "unfused_ms": un_ms})
            log(f"bench {name:18s} M={tokens:2d} dense {dense_ms * 1e3:7.1f} us  " + "  ".join(
                f"{r['method'][:6]}@{r['sparsity']}={r['ratio']:.2f}x" for r in results
                if r["shape"] == name and r["tokens"] == tokens and r["sparsity"] in (0.5, 0.9)))
        # dense prefill / decode on the prepared layout vs vLLM's default layout
        for tokens in (1, 16, 256, 2048, 8192):
            x = torch.randn(tokens, k, device=DEVICE, generator=gen).to(DTYPE)
            d = bench(lambda: F.linear(x, layer.w_dense))
            p = bench(lambda: F.linear(x, layer.w_prep))
            layout_rows.append({"shape": name, "tokens": tokens, "default_layout_ms": d, "prepared_layout_ms": p})
        layer.free()
        if not DRY_RUN:
            torch.cuda.empty_cache()
    return results, layout_rows, fusion_rows


def capture_graph(calls, reps: int):
    """One CUDA graph of `reps` rounds of `calls`, after a warm-up on a side stream
    (compilation and allocation stay out of the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for c in calls:
                c()
    return graph


def graph_ms(calls, reps: int = 8) -> float:
    """Per-call GPU time of `calls` (each on its own weight copy, so consecutive calls
    do not find their weights in L2), captured in one CUDA graph: no CPU launch cost,
    as in vLLM's decode graphs."""
    import triton

    graph = capture_graph(calls, reps)
    ms = triton.testing.do_bench(graph.replay, warmup=3, rep=15, return_mode="median")
    return ms / (reps * len(calls))


L2_ROTATION_BYTES = 160e6  # > 3x the 50 MB L2: weights of the next call are never cached


def graph_check(shapes, gen, configs, log) -> list:
    """CUDA-graph timings of teal (tokens 1..16 at s=0.5, 1 token at s=0.9) and larosa
    (1 token, s=0.5) against dense, rotating weight copies."""
    rows, seen = [], set()
    for name, n, k in shapes:
        key = launchers._shape_key(n, k)
        if key in seen:
            continue
        seen.add(key)
        copies = max(3, math.ceil(L2_ROTATION_BYTES / (n * k * 2)))
        layers = [Layer(n, k, gen) for _ in range(copies)]
        points = [("teal", t, 0.5) for t in TOKENS] + [("teal", 1, 0.9), ("larosa", 1, 0.5)]
        dense_cache = {}
        for method, tokens, sparsity in points:
            cfg_raw = configs.get(key, {}).get(str(tokens))
            cfg = launchers.GemvConfig.from_dict(cfg_raw) if cfg_raw else None
            if tokens not in dense_cache:
                xs = [torch.randn(tokens, k, device=DEVICE, generator=gen).to(DTYPE) for _ in layers]
                dense_cache[tokens] = graph_ms([
                    (lambda l=l, x=x: F.linear(x, l.w_dense)) for l, x in zip(layers, xs)])
            calls, nbytes = [], 0.0
            for layer in layers:
                xs, args, nb, _ = make_inputs(layer, Case(method, tokens, sparsity), gen)
                nbytes += nb
                calls.append(lambda x=xs[0], a=args: launchers.sparse_linear(x, **a, config=cfg, use_crossover=False))
            ms = graph_ms(calls)
            row = {"shape": name, "n": n, "k": k, "method": method, "tokens": tokens, "sparsity": sparsity,
                   "dense_ms": dense_cache[tokens], "sparse_ms": ms, "ratio": ms / dense_cache[tokens],
                   "gbs": nbytes / len(layers) / ms / 1e6, "timing": "cuda_graph"}
            rows.append(row)
            log(f"graph {name:18s} {method:6s} M={tokens:2d} s={sparsity} dense {row['dense_ms'] * 1e3:6.1f} us "
                f"sparse {ms * 1e3:6.1f} us  {row['ratio']:.2f}x  {row['gbs']:.0f} GB/s")
        for layer in layers:
            layer.free()
        del layers
        torch.cuda.empty_cache()
    return rows


def graph_time_ms(calls, reps: int = 4, replays: int = 7) -> float:
    """graph_ms with CUDA events and few replays: the same measurement (one CUDA graph of
    reps x calls, weights rotated), cheap enough for a config sweep."""
    if DRY_RUN:
        for c in calls:
            c()
        return 0.01
    from vllm_rsparse.cuda_timing import replay_ms

    return replay_ms(capture_graph(calls, reps), replays) / (reps * len(calls))


def one_token_layers(n: int, k: int, gen: torch.Generator):
    """Weight copies of one shape (enough that a call never finds its weights in L2; one in a
    dry run), one token of x per copy, and the CUDA-graph ms of dense cuBLAS on them."""
    copies = 1 if DRY_RUN else max(3, math.ceil(L2_ROTATION_BYTES / (n * k * 2)))
    layers = [Layer(n, k, gen) for _ in range(copies)]
    xs = [torch.randn(1, k, device=DEVICE, generator=gen).to(DTYPE) for _ in layers]
    dense_ms = graph_time_ms([(lambda l=l, x=x: F.linear(x, l.w_dense)) for l, x in zip(layers, xs)])
    return layers, xs, dense_ms


def one_token_calls(inputs, cfg: launchers.GemvConfig) -> list:
    """One sparse call per weight copy (make_inputs results), each on its copy's first x, with a
    fixed config and no dispatch table: what the graph-timed probes replay."""
    return [lambda x=xs[0], a=args: launchers.sparse_linear(x, **a, config=cfg, use_crossover=False)
            for xs, args, _, _ in inputs]


# one-row sweep. compact: (block_n, block_k, num_warps) x K chunk; walk: (block_n, block_k,
# num_warps) x K steps per program (1 step = every program issues its whole tile at once,
# no loop-carried latency chain; more steps = fewer split-K atomics)
SWEEP_TILES = [(64, 32, 4), (64, 64, 4), (128, 32, 4), (128, 64, 4), (256, 32, 4), (256, 64, 8)]
SWEEP_CHUNKS = [256, 512, 1024, 2048]
WALK_TILES = [(64, 64, 4), (128, 32, 4), (128, 64, 4), (128, 128, 8), (256, 32, 4), (256, 64, 8)]
WALK_STEPS = [2, 4, 8, 16]
# 0.7: where launchers.HIGH_SPARSITY_FROM switches to the configs ranked at 0.9; the sweep
# times both bands' winners there ("teal" = the band's, "teal_design" = the 0.5-ranked one)
SWEEP_SPARSITIES = [0.0, 0.5, 0.7, 0.9]
# the second ranking of the sweep: configs for modules at launchers.HIGH_SPARSITY_FROM and above
HIGH_SPARSITY = 0.9
SWEEP_LEADERS = 4


def config_with_union_rows(mode: str | None, n: int, k: int, tokens: int, sparsity: float) -> launchers.GemvConfig:
    """The config the launcher picks for a decode step of `tokens` rows with launchers.UNION_ROWS held
    at `mode` ("off": the committed per-row config; None: what RSPARSE_UNION_ROWS says), the previous
    value restored after."""
    held = launchers.UNION_ROWS
    launchers.UNION_ROWS = mode
    try:
        return launchers.pick_config(n, k, tokens, 0, torch.device(DEVICE), sparsity)
    finally:
        launchers.UNION_ROWS = held


def one_row_config(kernel: str, block_n: int, block_k: int, num_warps: int, per: int, k: int) -> launchers.GemvConfig:
    """A one-row config from the sweep's terms: per = K chunk (compact) or K steps per program
    (walk); the walk loop is left to Triton's 2-stage pipeliner, the compact one is hand-pipelined."""
    if kernel == "compact":
        return launchers.GemvConfig(1, block_n, block_k, launchers.triton_cdiv(k, per), num_warps, 1, kernel="compact")
    return launchers.GemvConfig(1, block_n, block_k, launchers.triton_cdiv(k, block_k * per), num_warps, 2, kernel="walk")


def sweep_configs(n: int, k: int, sms: int, kernels=("walk", "compact")) -> list[launchers.GemvConfig]:
    out = []
    if "compact" in kernels:
        for (bn, bk, warps), chunk in itertools.product(SWEEP_TILES, SWEEP_CHUNKS):
            cfg = one_row_config("compact", bn, bk, warps, chunk, k)
            # fewer programs than SMs leaves bandwidth idle at 1 token
            if launchers.triton_cdiv(n, bn) * cfg.split_k < sms:
                continue
            out.append(cfg)
    if "walk" in kernels:
        for (bn, bk, warps), steps in itertools.product(WALK_TILES, WALK_STEPS):
            cfg = one_row_config("walk", bn, bk, warps, steps, k)
            if launchers.triton_cdiv(n, bn) * cfg.split_k < sms or launchers.triton_cdiv(n, bn) > launchers.COUNTER_SLOTS:
                continue
            out.append(cfg)
    if DRY_RUN:
        # one of each kernel: the dry run checks the script, not the timings
        return [next(c for c in out if c.kernel == kind) for kind in kernels if any(c.kernel == kind for c in out)]
    return out


def graph_sweep(shapes, gen, log, out_dir: str = "", kernels=("walk", "compact")) -> tuple[list, dict]:
    """Per shape and token count: every sweep config (walk and compact kernels) at s = 0.5
    under CUDA graphs, the winner then at every SWEEP_SPARSITIES level; dense in the same
    graphs; larosa at 1 token; "teal_walk" = the previously committed config."""
    sms = 4 if DRY_RUN else torch.cuda.get_device_properties(0).multi_processor_count
    # the config's `kernel` field decides walk vs compact
    launchers.COMPACT_ROWS_ENABLED = False
    committed = launchers._load_json("sparse_gemv.json").get("configs", {})
    rows, table, table_high, seen = [], {}, {}, set()
    for name, n, k in shapes:
        key = launchers._shape_key(n, k)
        if key in seen:
            continue
        seen.add(key)
        copies = 1 if DRY_RUN else max(3, math.ceil(L2_ROTATION_BYTES / (n * k * 2)))
        layers = [Layer(n, k, gen) for _ in range(copies)]
        table[key] = {}
        for tokens in TOKENS[:2] if DRY_RUN else TOKENS:
            xs = [torch.randn(tokens, k, device=DEVICE, generator=gen).to(DTYPE) for _ in layers]
            dense = graph_time_ms([(lambda l=l, x=x: F.linear(x, l.w_dense)) for l, x in zip(layers, xs)])

            inputs = {}

            def sparse_calls(method, sparsity, cfg):
                # the same inputs for every config of a point: configs compare on equal data
                if (method, sparsity) not in inputs:
                    inputs[method, sparsity] = [make_inputs(layer, Case(method, tokens, sparsity), gen)
                                                for layer in layers]
                calls, nbytes = [], 0.0
                for xs_, args, nb, _ in inputs[method, sparsity]:
                    nbytes += nb
                    calls.append(lambda x=xs_[0], a=args: launchers.sparse_linear(
                        x, **a, config=cfg, use_crossover=False))
                return calls, nbytes / len(layers)

            def rank(candidates, sparsity):
                # -> [(ms, cfg)] fastest first; a config that fails to compile is skipped
                timed = []
                for cfg in candidates:
                    calls_cfg, _ = sparse_calls("teal", sparsity, cfg)
                    try:
                        timed.append((graph_time_ms(calls_cfg), cfg))
                    except Exception as exc:
                        log(f"  skip {cfg}: {type(exc).__name__}: {exc}")
                return sorted(timed, key=lambda t: t[0])

            # every config at 1 token, at the design sparsity 0.5 and again at 0.9 (the
            # launcher picks per sparsity band: launchers.pick_config); more tokens re-rank
            # the 1-token leaders (compile and device time: the sweep has to fit one short
            # GPU call; the 0.9 ranking compiles nothing new)
            if tokens == 1:
                every = sweep_configs(n, k, sms, kernels)
                timed, timed_high = rank(every, 0.5), rank(every, HIGH_SPARSITY)
                leaders = [c for _, c in timed[:SWEEP_LEADERS]]
                leaders_high = [c for _, c in timed_high[:SWEEP_LEADERS]]
            else:
                timed, timed_high = rank(leaders, 0.5), rank(leaders_high, HIGH_SPARSITY)
            best, best_high = timed[0][1], timed_high[0][1]
            table[key][str(tokens)] = dataclasses.asdict(best)
            table_high.setdefault(key, {})[str(tokens)] = dataclasses.asdict(best_high)
            points = [("teal", s) for s in SWEEP_SPARSITIES] + (
                [("larosa", 0.5), ("larosa_hist", 0.5), ("teal_one_ahead", 0.5), ("teal_one_ahead", HIGH_SPARSITY),
                 ("teal_design", 0.7)]
                if tokens == 1 else [])
            if tokens == 1 and committed.get(key, {}).get("1"):
                points += [("teal_walk", 0.5), ("teal_walk", 0.9)]
            for method, sparsity in points:
                if method == "teal_walk":
                    cfg_point = launchers.GemvConfig.from_dict(committed[key]["1"])
                elif method == "teal_design":
                    cfg_point = best
                else:
                    cfg_point = best_high if sparsity >= launchers.HIGH_SPARSITY_FROM else best
                base_method = {"teal_walk": "teal", "larosa_hist": "larosa", "teal_one_ahead": "teal",
                               "teal_design": "teal"}.get(
                    method, method)
                calls_s, nbytes = sparse_calls(base_method, sparsity, cfg_point)
                # the select kernel and the loop variant are chosen when the graph is captured
                launchers.TOPK_HISTOGRAM_ENABLED = method == "larosa_hist"
                launchers.LOAD_AHEAD_ENABLED = method != "teal_one_ahead"
                try:
                    ms = graph_time_ms(calls_s)
                finally:
                    launchers.TOPK_HISTOGRAM_ENABLED = False
                    launchers.LOAD_AHEAD_ENABLED = True
                row = {"shape": name, "n": n, "k": k, "method": method, "tokens": tokens, "sparsity": sparsity,
                       "dense_ms": dense, "sparse_ms": ms, "ratio": ms / dense, "gbs": nbytes / ms / 1e6,
                       "ideal_ms": dense * (1 - sparsity), "config": dataclasses.asdict(cfg_point),
                       "timing": "cuda_graph"}
                rows.append(row)
                log(f"sweep {name:18s} {method:6s} M={tokens:2d} s={sparsity} dense {dense * 1e3:6.1f} us "
                    f"sparse {ms * 1e3:6.1f} us {row['ratio']:.2f}x {row['gbs']:.0f} GB/s "
                    f"{cfg_point.kernel} bn{cfg_point.block_n} bk{cfg_point.block_k} split{cfg_point.split_k} "
                    f"w{cfg_point.num_warps}")
        for layer in layers:
            layer.free()
        del layers
        if not DRY_RUN:
            torch.cuda.empty_cache()
        if out_dir:
            # what is measured so far survives a time limit
            with open(os.path.join(out_dir, "sweep_partial.json"), "w") as f:
                json.dump({"results": rows, "configs": table, "configs_high": table_high}, f)
    return rows, {"configs": table, "configs_high": table_high}


def crossover_table(results) -> dict:
    """Largest token count (of those measured) up to which sparse beats dense at every
    smaller count; 0 = never (dense even at 1 token)."""
    table = {"threshold": {}, "topk": {}}
    for (sel, key, sp), by_tokens in _ratios(results).items():
        limit = 0
        for tokens in sorted(by_tokens):
            if by_tokens[tokens] < 1.0:
                limit = tokens
            else:
                break
        table[sel].setdefault(key, {})[f"{sp:g}"] = limit
    return table


def write_dispatch(path: str, meta: dict, rows: list, note: str, ratios: bool = False,
                   timing: str | None = None) -> None:
    """A dispatch.json (the candidate for kernels/configs/) from benchmark rows: the committed table with
    the measuring GPU's crossover counts replaced by these rows', and with ``ratios`` the sparse/dense
    ratios launchers.crossover_tokens interpolates (without: the measured selections' ratios are dropped,
    so that the crossover counts decide). On the table's own GPU that is the table's main entries; on
    another GPU its "by_gpu" entry (launchers.entry_for_gpu), as the other writers do: one GPU's
    measurement must not replace another's. What this benchmark does not measure stays as committed:
    the low-rank tables (ratios "<selection>_lowrank...", from benchmarks/gpu/lowrank_time.py --merge)
    and their note, and the other GPUs' entries; so copying the output over the committed file loses
    none of them."""
    out = json.loads(json.dumps(launchers._load_json(launchers._DISPATCH_FILE)))
    entry = launchers.entry_for_gpu(out, meta["gpu"])
    measured_ratios = ratio_table(rows) if ratios else {}
    # the selections these rows measured (a TEAL-only run leaves exact top-k's entries as they are)
    crossover = {selection: table for selection, table in crossover_table(rows).items() if table}
    entry.setdefault("crossover", {}).update(crossover)
    entry_ratios = entry.setdefault("ratios", {})
    for selection in crossover:
        # an empty table on another GPU's entry hides the main table's ratios there (they outrank counts)
        entry_ratios[selection] = measured_ratios.get(selection, {})
    if entry is out:
        out.update({"gpu": meta["gpu"], "commit": meta["commit"], "note": note})
        out.setdefault("design_sparsity", 0.5)
        if timing:
            out["timing"] = timing
        for stale in ("union_note", "topk_note"):  # notes on the ratios just replaced
            out.pop(stale, None)
    else:
        for selection in crossover:
            launchers.put_note(out, entry, selection, note + (f" ({timing})" if timing else ""))
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


def ratio_table(results) -> dict:
    """{selection: {shape: {sparsity: {tokens: sparse/dense}}}}: what launchers.crossover_tokens
    interpolates between sparsity levels."""
    table = {"threshold": {}, "topk": {}}
    for (sel, key, sp), by_tokens in _ratios(results).items():
        table[sel].setdefault(key, {})[f"{sp:g}"] = {str(t): round(r, 4) for t, r in sorted(by_tokens.items())}
    return table


def _ratios(results) -> dict:
    by = {}
    for r in results:
        sel = {"teal": "threshold", "larosa": "topk"}.get(r["method"])
        if sel is None:
            continue
        by.setdefault((sel, launchers._shape_key(r["n"], r["k"]), r["sparsity"]), {})[r["tokens"]] = (
            r["sparse_ms"] / r["dense_ms"])
    return by


def write_markdown(path, meta, results, union_vs_row, layout_rows, fusion_rows):
    lines = [f"# rsparse kernels on {meta['gpu']}", "",
             f"commit {meta['commit']}, {meta['versions']}, copy bandwidth {meta['copy_bandwidth_gbs']:.0f} GB/s "
             "(read + write). Command: `" + meta["command"] + "`.", "",
             "Times are do_bench medians with L2 flushed before every call; ratio = sparse / dense "
             "(cuBLAS F.linear, bf16, vLLM's [N, K] layout); GB/s = bytes actually read / time.", ""]
    lines += ["## 1 token", "", "| shape | method | s=0 | s=0.3 | s=0.5 | s=0.7 | s=0.9 | GB/s @0.5 | dense us |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["shape"] for r in results):
        for method in METHODS:
            rows = {r["sparsity"]: r for r in results if r["shape"] == name and r["method"] == method and r["tokens"] == 1}
            if not rows:
                continue
            cells = [f"{rows[s]['ratio']:.2f}x" if s in rows else "" for s in SPARSITIES]
            gbs = f"{rows[0.5]['gbs']:.0f}" if 0.5 in rows else ""
            dense_us = next(iter(rows.values()))["dense_ms"] * 1e3
            lines.append(f"| {name} | {method} | " + " | ".join(cells) + f" | {gbs} | {dense_us:.1f} |")
    lines += ["", "## teal by token count (ratio sparse/dense)", "",
              "| shape | sparsity | " + " | ".join(f"M={t}" for t in TOKENS) + " |",
              "|---|---|" + "---|" * len(TOKENS)]
    for name in dict.fromkeys(r["shape"] for r in results):
        for sp in SPARSITIES:
            rows = {r["tokens"]: r for r in results if r["shape"] == name and r["method"] == "teal" and r["sparsity"] == sp}
            lines.append(f"| {name} | {sp} | " + " | ".join(f"{rows[t]['ratio']:.2f}x" if t in rows else "" for t in TOKENS) + " |")
    if union_vs_row:
        lines += ["", "## union vs per-row programs (teal, s=0.5, best config of each, us)", "",
                  "| shape | tokens | per-row | union |", "|---|---|---|---|"]
        for e in union_vs_row:
            pr = f"{e['per_row_ms'] * 1e3:.1f}" if "per_row_ms" in e else ""
            un = f"{e['union_ms'] * 1e3:.1f}" if "union_ms" in e else ""
            lines.append(f"| {e['shape']} | {e['tokens']} | {pr} | {un} |")
    lines += ["", "## low-rank term fused (2 launches) vs PyTorch ops (us)", "",
              "| shape | tokens | fused | unfused |", "|---|---|---|---|"]
    for e in fusion_rows:
        lines.append(f"| {e['shape']} | {e['tokens']} | {e['fused_ms'] * 1e3:.1f} | {e['unfused_ms'] * 1e3:.1f} |")
    lines += ["", "## dense F.linear: prepared [K, N] storage vs vLLM's [N, K] (us)", "",
              "| shape | tokens | [N, K] | [K, N] | ratio |", "|---|---|---|---|---|"]
    for e in layout_rows:
        lines.append(f"| {e['shape']} | {e['tokens']} | {e['default_layout_ms'] * 1e3:.1f} | "
                     f"{e['prepared_layout_ms'] * 1e3:.1f} | {e['prepared_layout_ms'] / e['default_layout_ms']:.2f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


GRAPH_METHODS = ["teal", "teal_walk", "larosa", "larosa_hist"]


def write_graph_markdown(path, meta, rows, dobench_name: str = "kernels_h100_dobench.md"):
    """Tables of a --graph-sweep result (CUDA-graph timings: what vLLM's decode graphs see)."""
    copy = meta["copy_bandwidth_gbs"]
    lines = [f"# rsparse kernels on {meta['gpu']} (CUDA-graph timings)", "",
             f"commit {meta['commit']}, {meta['versions']}, copy bandwidth {copy:.0f} GB/s (read + write). "
             "Command: `" + meta["command"] + "`.", "",
             "Each time is one CUDA graph of 4 rounds over >= 160 MB of weight copies (the next call never "
             "finds its weights in L2), median of 7 replays: no CPU launch cost, as in vLLM's decode graphs. "
             "Dense = cuBLAS F.linear on vLLM's [N, K] layout, bf16, same graph method. ratio = sparse / dense; "
             "GB/s = bytes the sparse call actually reads / its time. teal = best one-row config of the sweep "
             "(walk or compact kernel, chosen at s = 0.5, committed in kernels/configs/sparse_gemv.json); "
             "teal_walk = the walk kernel with the configs committed before this sweep; larosa = exact top-k "
             "(select kernel + GEMV); larosa_hist = the same with the histogram select kernel; one_ahead = "
             "the teal config with the one-step-ahead loop (launchers.LOAD_AHEAD_ENABLED = False; teal itself "
             "loads x / list entries two steps ahead). s >= launchers.HIGH_SPARSITY_FROM runs the configs ranked "
             "at 0.9 (configs_high); design cfg s=0.7 = the 0.5-ranked config at 0.7, for placing that boundary.", "",
             "## 1 token", "",
             "| shape | dense us | teal s=0 | teal s=0.5 | GB/s @0.5 (% copy) | teal s=0.9 | teal_walk s=0.5 | "
             "teal_walk s=0.9 | one_ahead s=0.5 | one_ahead s=0.9 | teal s=0.7 | design cfg s=0.7 | larosa s=0.5 | "
             "larosa_hist s=0.5 | kernel |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["shape"] for r in rows):
        one = {(r["method"], r["sparsity"]): r for r in rows if r["shape"] == name and r["tokens"] == 1}
        cell = lambda m, sp: f"{one[m, sp]['ratio']:.2f}x" if (m, sp) in one else ""  # noqa: E731
        half = one.get(("teal", 0.5))
        gbs = f"{half['gbs']:.0f} ({half['gbs'] / copy * 100:.0f}%)" if half else ""
        cfg = half["config"] if half else {}
        kernel = (f"{cfg.get('kernel', 'walk')} bn{cfg['block_n']} bk{cfg['block_k']} split{cfg['split_k']} "
                  f"w{cfg['num_warps']}") if cfg else ""
        dense_us = next(iter(one.values()))["dense_ms"] * 1e3
        lines.append(f"| {name} | {dense_us:.1f} | {cell('teal', 0.0)} | {cell('teal', 0.5)} | {gbs} | "
                     f"{cell('teal', 0.9)} | {cell('teal_walk', 0.5)} | {cell('teal_walk', 0.9)} | "
                     f"{cell('teal_one_ahead', 0.5)} | {cell('teal_one_ahead', 0.9)} | "
                     f"{cell('teal', 0.7)} | {cell('teal_design', 0.7)} | "
                     f"{cell('larosa', 0.5)} | {cell('larosa_hist', 0.5)} | {kernel} |")
    tokens = sorted({r["tokens"] for r in rows})
    lines += ["", "## teal by token count (ratio sparse/dense; M > 1 = one program per row)", "",
              "| shape | sparsity | " + " | ".join(f"M={t}" for t in tokens) + " |",
              "|---|---|" + "---|" * len(tokens)]
    for name in dict.fromkeys(r["shape"] for r in rows):
        for sp in sorted({r["sparsity"] for r in rows if r["method"] == "teal"}):
            by_t = {r["tokens"]: r for r in rows if r["shape"] == name and r["method"] == "teal" and r["sparsity"] == sp}
            lines.append(f"| {name} | {sp} | " + " | ".join(
                f"{by_t[t]['ratio']:.2f}x" if t in by_t else "" for t in tokens) + " |")
    lines += ["", "## sparse/dense crossover (largest token count where sparse beat dense; the dispatch table)",
              "", "```", json.dumps(crossover_table(rows), indent=1), "```", "",
              f"All methods and sparsities 0-0.9 with do_bench timing (includes the sparse side's Python launch "
              f"cost, older kernels and configs): {dobench_name}."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot_shape(path: str, shape: str, results: list[dict], methods, levels=None) -> None:
    """One PNG for one shape: time against sparsity at 1 / 4 / 16 tokens, each method, dense cuBLAS and
    the ideal dense * (1 - s) line (issue 4's plot). levels: the x points of the two dense lines
    (default: the sparsities measured in each panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, tokens in zip(axes, (1, 4, 16)):
        rows = [r for r in results if r["shape"] == shape and r["tokens"] == tokens]
        if not rows:
            continue
        xs = levels if levels is not None else sorted({r["sparsity"] for r in rows})
        dense_us = rows[0]["dense_ms"] * 1e3
        ax.plot(xs, [dense_us] * len(xs), "k-", label="dense cuBLAS")
        ax.plot(xs, [dense_us * (1 - s) for s in xs], "k--", label="ideal dense*(1-s)")
        for method in methods:
            pts = sorted((r["sparsity"], r["sparse_ms"] * 1e3) for r in rows if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), "o-", label=method)
        ax.set_title(f"{shape}, {tokens} token(s)")
        ax.set_xlabel("input-channel sparsity")
        ax.set_ylabel("us")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot(out_dir, results, methods=None):
    for name in dict.fromkeys(r["shape"] for r in results):
        plot_shape(os.path.join(out_dir, name.replace("/", "_") + ".png"), name, results, methods or METHODS,
                   levels=SPARSITIES)


DRY_RUN_GPU = "cpu (dry run)"  # the "gpu" of a record made without one


def run_header(script: str) -> dict:
    """Where a GPU probe's numbers come from, first in its JSON: the commit from $RSPARSE_COMMIT (the
    device machine's copy of the tree has no usable .git), the GPU, the versions and the command, led
    by the plugin's switches set in the environment (an A/B such as RSPARSE_TOPK_IN_KERNEL=1 is part of
    how the numbers were made)."""
    import triton

    switches = " ".join(f"{name}={value}" for name, value in sorted(os.environ.items())
                        if name.startswith("RSPARSE_") and name not in ("RSPARSE_COMMIT", "RSPARSE_BENCH_DRY")
                        and value)
    return {"commit": os.environ.get("RSPARSE_COMMIT", "unknown"),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else DRY_RUN_GPU,
            "versions": {"torch": torch.__version__, "triton": triton.__version__,
                         "python": platform.python_version()},
            "command": (f"{switches} " if switches else "") + f"python3 -P {script} " + " ".join(sys.argv[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tune", action="store_true", help="sweep block configs first and write the tables")
    ap.add_argument("--quick", action="store_true", help="rsparse variants at s=0.5 only")
    ap.add_argument("--shapes", default="", help="comma-separated subset of shape names")
    ap.add_argument("--graph-check", action="store_true",
                    help="only CUDA-graph timings (committed configs) of a subset; writes graph_h100.json")
    ap.add_argument("--report", default="",
                    help="only render a --graph-sweep JSON (kernels_h100.json) to kernels_h100.md + PNGs in --out")
    ap.add_argument("--dispatch-from-report", action="store_true",
                    help="with --report: also write dispatch.json (crossover + ratios) from that JSON")
    ap.add_argument("--kernels", default="walk,compact",
                    help="one-row kernels the --graph-sweep tries (comma-separated: walk, compact)")
    ap.add_argument("--graph-sweep", action="store_true",
                    help="CUDA-graph config sweep of the compact kernel + table; writes kernels_h100_graph.json, "
                         "sparse_gemv.json, dispatch.json")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.report:
        with open(args.report) as f:
            meta = json.load(f)
        if args.dispatch_from_report:
            # the dispatch table of a committed sweep result (e.g. after a change of its format)
            write_dispatch(os.path.join(args.out, "dispatch.json"), meta, meta["results"],
                           "from " + os.path.basename(args.report) + " (--graph-sweep): crossover = largest "
                           "token count up to which sparse beat cuBLAS; ratios = sparse/dense per sparsity "
                           "and token count, interpolated by launchers.crossover_tokens",
                           ratios=True, timing="cuda_graph")
        write_graph_markdown(os.path.join(args.out, "kernels_h100.md"), meta, meta["results"])
        plot(args.out, meta["results"], GRAPH_METHODS)
        return
    log_file = open(os.path.join(args.out, "bench.log"), "a")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    shapes = projection_shapes()
    if args.shapes:
        wanted = set(args.shapes.split(","))
        shapes = [s for s in shapes if s[0] in wanted]
    gen = torch.Generator(device=DEVICE)
    gen.manual_seed(0)
    import triton

    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        commit = os.environ.get("RSPARSE_COMMIT", "unknown")
    meta = {
        "commit": os.environ.get("RSPARSE_COMMIT", commit),
        "gpu": "dry-run" if DRY_RUN else torch.cuda.get_device_name(0),
        "versions": f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}",
        "command": "python " + " ".join(sys.argv),
    }
    t0 = time.time()
    meta["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    log(f"{meta}")

    if args.graph_sweep:
        rows, tables = graph_sweep(shapes, gen, log, args.out, tuple(args.kernels.split(",")))
        meta["results"] = rows
        with open(os.path.join(args.out, "kernels_h100_graph.json"), "w") as f:
            json.dump(meta, f, indent=1)
        with open(os.path.join(args.out, "sparse_gemv.json"), "w") as f:
            json.dump({"gpu": meta["gpu"], "commit": meta["commit"], "tokens": TOKENS, "timing": "cuda_graph",
                       "note": "best one-row config (walk or compact kernel) of benchmarks/bench_kernels.py --graph-sweep, "
                               f"teal at sparsity 0.5 (configs) and {HIGH_SPARSITY} (configs_high: modules at "
                               f"sparsity >= {launchers.HIGH_SPARSITY_FROM})", **tables}, f, indent=1)
        write_dispatch(os.path.join(args.out, "dispatch.json"), meta, rows,
                       "largest token count (of 1,2,4,8,16) up to which the sparse kernel beat cuBLAS "
                       "dense under CUDA graphs (--graph-sweep); 0 = dense even at 1 token; topk "
                       "measured at 1 token only", ratios=True, timing="cuda_graph")
        log(f"done in {time.time() - t0:.0f} s")
        for r in rows:
            if r["tokens"] == 1 and r["sparsity"] in (0.5, 0.9):
                log(f"{r['shape']:18s} {r['method']:7s} s={r['sparsity']} dense {r['dense_ms'] * 1e3:.1f} us "
                    f"{r['sparse_ms'] * 1e3:.1f} us {r['ratio']:.2f}x, "
                    f"{r['gbs']:.0f} GB/s ({r['gbs'] / meta['copy_bandwidth_gbs'] * 100:.0f}% of copy)")
        return

    if args.graph_check:
        configs = launchers._load_json("sparse_gemv.json").get("configs", {})
        rows = graph_check(shapes, gen, configs, log)
        meta["results"] = rows
        with open(os.path.join(args.out, "graph_h100.json"), "w") as f:
            json.dump(meta, f, indent=1)
        write_dispatch(os.path.join(args.out, "dispatch.json"), meta, rows,
                       "largest token count where the sparse kernel beat cuBLAS dense under CUDA graphs "
                       "(--graph-check)", timing="cuda_graph")
        log(f"done in {time.time() - t0:.0f} s")
        return

    if args.tune:
        configs, union_vs_row = tune(shapes, gen, log)
        with open(os.path.join(args.out, "sparse_gemv.json"), "w") as f:
            json.dump({"gpu": meta["gpu"], "commit": meta["commit"], "tokens": TOKENS,
                       "note": "best of the sweep in benchmarks/bench_kernels.py --tune, teal at sparsity 0.5",
                       "configs": configs}, f, indent=1)
        log(f"tuning done in {time.time() - t0:.0f} s")
    else:
        configs, union_vs_row = launchers._load_json("sparse_gemv.json").get("configs", {}), []

    results, layout_rows, fusion_rows = run_bench(shapes, gen, configs, log, args.quick)
    meta["results"] = results
    meta["union_vs_per_row"] = union_vs_row
    meta["dense_layout"] = layout_rows
    meta["lowrank_fusion"] = fusion_rows
    with open(os.path.join(args.out, "kernels_h100.json"), "w") as f:
        json.dump(meta, f, indent=1)
    write_dispatch(os.path.join(args.out, "dispatch.json"), meta, results,
                   "largest measured token count where the sparse kernel beats cuBLAS dense, per "
                   "selection, shape and sparsity (random independent masks per row: a pessimistic "
                   "union); launchers applies the design_sparsity column")
    write_markdown(os.path.join(args.out, "kernels_h100.md"), meta, results, union_vs_row, layout_rows, fusion_rows)
    try:
        plot(args.out, results)
    except Exception as exc:
        log(f"plot failed: {exc}")
    log(f"done in {time.time() - t0:.0f} s")
    # the key numbers last (the device tool returns the tail of the output)
    for r in results:
        if r["tokens"] == 1 and r["sparsity"] in (0.5, 0.9) and r["method"] in ("teal", "larosa"):
            log(f"{r['shape']:18s} {r['method']:7s} s={r['sparsity']} {r['ratio']:.2f}x dense, "
                f"{r['gbs']:.0f} GB/s ({r['gbs'] / meta['copy_bandwidth_gbs'] * 100:.0f}% of copy)")


if __name__ == "__main__":
    main()
