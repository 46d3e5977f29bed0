"""Issue 4 (d): decode steps of 2-16 tokens -- one program per row ("per-row") against all rows in
one program ("union") -- timed side by side on the model shapes; --adopt writes the tables from it.

Per-row programs read, for each token, the weight rows of that token's channels: M tokens at
sparsity s read about M (1 - s) of the matrix, so from 2 tokens on at s = 0.5 they read more than
dense (dispatch.json: 1.1-1.6x dense at 2 tokens). The union program (launchers.MAX_ROWS rows, one
tl.dot per K step) reads a weight row once if any token selected its channel: 1 - s^M of the
matrix for independent tokens. Two union kernels: the walk (sparse_gemv_kernel, ROWS = 16, predicated
loads over every K step; off from its first H100 run, e2a1af1, after wrong results in a share of runs)
and the compact (sparse_gemv_union_compact_kernel, session 16: a list of the channels any row
selected, gathered rows). No union config was committed before this script.

Timing as the one-token sweep (bench_kernels.graph_time_ms: one CUDA graph over >= 160 MB of
weight copies, so no call finds its weights in L2), bf16, TEAL threshold selection on random x:
the tokens select independently, which is the least a union can save (real activations share
channels, but little: benchmarks/union_density.py measured real decode requests' unions at 0.87-0.99
of the independent ones on SmolLM2 and Qwen2.5-0.5B). Per shape and token count (2, 4, 8, 16), in one process:
  * dense cuBLAS (F.linear, vLLM's [N, K] weight);
  * per-row: the committed config of the sparsity's band (launchers.pick_config with UNION_ROWS
    = "off": what the launcher ran before this script);
  * union: UNION_CANDIDATES ranked at s = 0.5 (band "configs") and at 0.9 ("configs_high"), all of
    them at 2 tokens, the RANK_LEADERS fastest again at 4 / 8 / 16 tokens; then per-row and the
    band's best union at s = 0, 0.5, 0.7, 0.9, each union output checked against per-row.
--adopt DIR: DIR/sparse_gemv.json = the installed table with, for each (band, token count), the
config `choose` takes at the band's ranking sparsity (the committed one unless per-row or the union
is ADOPT_MAX_RATIO faster; the union only where it agrees with per-row to bf16 rounding); DIR/dispatch.json = the installed dispatch table with the
threshold ratios of 2-16 tokens at the levels 0 / 0.5 / 0.9 replaced by this run's, each with the
config the launcher will now use at that level (one token keeps its own measurement).
A run on a GPU other than the tables' own ("gpu" in each) writes both under their "by_gpu" entries for
that GPU (launchers.config_table / dispatch_table), the tables' own entries staying those of the GPU that
measured them; --one-token-from a committed_kernels.py run's teal rows on the same GPU sets that GPU's
one-token ratios at the same levels, so its whole threshold table is its own measurement.

    python3 -P benchmarks/gpu/union_rows.py --adopt $RES/union_tables --out $RES/union_rows_h200.json
    RSPARSE_BENCH_DRY=1 TRITON_INTERPRET=1 python benchmarks/gpu/union_rows.py --out /tmp/u.json   # CPU: script check
    python benchmarks/gpu/union_rows.py --report benchmarks/results/union_rows_h200.json \
        benchmarks/results/union_rows_h200_walk.json --out benchmarks/results/union_rows_h200.md
    python benchmarks/gpu/union_rows.py --report benchmarks/results/union_rows_fma_h200.json \
        --out benchmarks/results/union_rows_fma_h200.md     # a run with committed times: three columns
    python benchmarks/gpu/union_rows.py --adopt-from benchmarks/results/union_rows_fma_h200.json \
        --adopt kernels/configs --out /dev/null   # the tables from a committed run (the source tree's)
    python benchmarks/gpu/union_rows.py --adopt-from benchmarks/results/union_rows_fma_depth_h100.json \
        --one-token-from benchmarks/results/kernels_committed_s32_h100.json \
        --adopt kernels/configs --out /dev/null   # an H100 run: the tables' by_gpu entries for the H100
"""

import argparse
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_rsparse import launchers

_spec = importlib.util.spec_from_file_location(
    "bench_kernels", Path(__file__).resolve().parent.parent / "bench_kernels.py")
bk = importlib.util.module_from_spec(_spec)
sys.modules["bench_kernels"] = bk  # its dataclasses look their module up
_spec.loader.exec_module(bk)


SHAPES = bk.distinct_shapes()  # Llama-2-7B and Llama-3-8B: qkv, o, gate_up, down
TOKENS = [2, 4, 8, 16]
LEVELS = [0.0, 0.5, 0.7, 0.9]  # the final points; dispatch.json keeps 0 / 0.5 / 0.9
RATIO_LEVELS = [0.0, 0.5, 0.9]
BAND_SPARSITY = {"configs": 0.5, "configs_high": 0.9}  # where each band's union is ranked
RANK_LEADERS = 4
ADOPT_MAX_RATIO = 0.97
ADOPT_MAX_ERR = 1e-2
# union walk tiles (sparse_gemv_kernel, ROWS = 16): (block_n, block_k, num_warps) x K steps per
# program x pipeline stages. tl.dot needs block_k >= 16. Session 16's first run timed 64 of them:
# 1.0-1.3x dense even at a union density of 0.19 (their time hardly follows the selection), but at
# a density near 1 (8-16 tokens) 1.2-1.6x against the compact union's 1.4-2.3x. The second run
# timed only steps 1 and 4 and so missed the first run's winners (steps 2), hence all three here.
UNION_TILES = [(64, 64, 4), (128, 32, 4), (128, 64, 4), (256, 32, 4), (256, 64, 8)]
UNION_STEPS = [1, 2, 4]
UNION_STAGES = [2]
# union compact tiles (sparse_gemv_union_compact_kernel): (block_n, block_k, num_warps) x K chunk
# (<= launchers.UNION_MAX_CHUNK) x pipeline stages of the gathered loop
COMPACT_TILES = [(64, 16, 4), (128, 16, 4), (64, 32, 4), (128, 32, 4), (256, 16, 4), (256, 32, 8), (128, 64, 8)]
COMPACT_CHUNKS = [128, 256, 512]
COMPACT_STAGES = [1, 2, 3]
# union FMA tiles (the union compact kernel with 2 / 4 rows, no tl.dot; session 20): rows ->
# (block_n, block_k, num_warps), the one-row compact kernel's tile family, each built for sm_90
# offline without a stack (offline_build.py --union); a program's rows <= the step's tokens, as
# more would only run masked-off rows. K chunks up to launchers.union_max_chunk(rows).
# Session 21: the tiles whose warps all lie along N (block_n >= 256 x warps: launchers.fma_step_sum sums
# each step over K in registers) take 16 KB steps at 154-178 registers: (1024, 8, 4), (2048, 4, 4),
# (2048, 8, 8), 4 rows (1024, 4, 4); and K chunks of 128, so that those wide tiles still fill the GPU.
FMA_TILES = {2: [(512, 8, 4), (256, 16, 4), (256, 8, 4), (1024, 4, 4), (1024, 8, 8), (1024, 8, 4), (2048, 4, 4),
                 (2048, 8, 8)],
             4: [(256, 8, 4), (128, 16, 4), (128, 8, 4), (512, 4, 4), (1024, 4, 4)]}
FMA_CHUNKS = [128, 256, 512, 1024]
# the FMA loop's hand pipeline depth (GemvConfig.num_stages of an FMA union: list steps gathered ahead
# of the FMAs; launchers.FMA_AHEAD_STEPS). Two steps ahead ran slower on the H200 (session 21,
# union_rows_fma_ahead_h200.json, ncu_fma_h200.md), so the sweep no longer ranks them by default; that run
# predates the per-step sums of the wide tiles (fewer registers a row), which --fma-stages 1 2 ranks at both.
FMA_STAGES = [1]
# candidate families: "walk" / "compact" (16 rows, tl.dot) and "fma" (2 / 4 rows); --kernels
KINDS = ("walk", "compact", "fma")


def kind_of(cfg: launchers.GemvConfig) -> str:
    """The candidate family of a union config (KINDS)."""
    return "fma" if cfg.rows in launchers.UNION_FMA_ROWS else cfg.kernel


def union_candidates(n: int, k: int, sms: int, kinds=KINDS[:2], tokens: int = TOKENS[-1]) -> list[launchers.GemvConfig]:
    out = []
    if "walk" in kinds:
        for (bn, bkk, warps), steps, stages in itertools.product(UNION_TILES, UNION_STEPS, UNION_STAGES):
            out.append(launchers.GemvConfig(launchers.MAX_ROWS, bn, bkk, launchers.triton_cdiv(k, bkk * steps), warps,
                                            stages))
    if "compact" in kinds:
        for (bn, bkk, warps), chunk, stages in itertools.product(COMPACT_TILES, COMPACT_CHUNKS, COMPACT_STAGES):
            out.append(launchers.GemvConfig(launchers.MAX_ROWS, bn, bkk, launchers.triton_cdiv(k, chunk), warps,
                                            stages, kernel="compact"))
    if "fma" in kinds:
        for rows, tiles in FMA_TILES.items():
            chunks = [c for c in FMA_CHUNKS if c <= launchers.union_max_chunk(rows)]
            for (bn, bkk, warps), chunk, ahead in itertools.product(tiles, chunks, FMA_STAGES):
                if rows <= tokens:
                    out.append(launchers.GemvConfig(rows, bn, bkk, launchers.triton_cdiv(k, chunk), warps, ahead,
                                                    kernel="compact"))
    every = out
    # fewer programs than SMs leaves bandwidth idle; more output tiles than counters cannot run
    out = [c for c in out if launchers.triton_cdiv(n, c.block_n) * launchers.k_split(k, c)[1] >= sms
           and launchers.triton_cdiv(n, c.block_n) <= launchers.COUNTER_SLOTS]
    if bk.DRY_RUN:
        # one of each family, the compact first: with the dry run's equal timings it is the one
        # chosen, so the --list-ahead A/B runs too (a family the tiny shape filters out entirely:
        # its first candidate all the same)
        return [next((c for c in out if kind_of(c) == kind), next(c for c in every if kind_of(c) == kind))
                for kind in ("compact", "walk", "fma") if any(kind_of(c) == kind for c in every)]
    return out


def label(cfg: launchers.GemvConfig) -> str:
    if cfg.rows == 1:
        return f"per-row {cfg.kernel} bn{cfg.block_n} bk{cfg.block_k} split{cfg.split_k} w{cfg.num_warps}"
    rows = f" r{cfg.rows}" if cfg.rows != launchers.MAX_ROWS else ""
    return (f"union {cfg.kernel}{rows} bn{cfg.block_n} bk{cfg.block_k} split{cfg.split_k} w{cfg.num_warps} "
            f"st{cfg.num_stages}")


def band_of(n: int, k: int, sparsity: float) -> str:
    return "configs_high" if sparsity >= launchers.high_sparsity_from(n, k) else "configs"


def measure_shape(name: str, n: int, k: int, gen: torch.Generator, sms: int, log,
                  list_ahead_ab: bool = False, kinds=KINDS[:2]) -> list[dict]:
    dev = torch.device(bk.DEVICE)
    copies = 1 if bk.DRY_RUN else max(3, math.ceil(bk.L2_ROTATION_BYTES / (n * k * 2)))
    layers = [bk.Layer(n, k, gen) for _ in range(copies)]
    rows = []
    leaders = {}
    for tokens in TOKENS[:2] if bk.DRY_RUN else TOKENS:
        xs = [torch.randn(tokens, k, device=dev, generator=gen).to(bk.DTYPE) for _ in layers]
        dense_ms = bk.graph_time_ms([(lambda l=l, x=x: F.linear(x, l.w_dense)) for l, x in zip(layers, xs)])
        inputs = {s: [bk.make_inputs(layer, bk.Case("teal", tokens, s), gen) for layer in layers] for s in LEVELS}

        def timed(cfg, s):
            calls = bk.one_token_calls(inputs[s], cfg)  # each copy's first x, all `tokens` rows
            return bk.graph_time_ms(calls), calls[0]().float()

        best = {}
        # the FMA family is ranked again at every token count: which row group wins depends on it
        fma_pool = union_candidates(n, k, sms, ("fma",), tokens) if "fma" in kinds else []
        for band, s_rank in BAND_SPARSITY.items():
            pool = union_candidates(n, k, sms, kinds, tokens) if tokens == TOKENS[0] else leaders[band] + fma_pool
            ranked = []
            for cfg in pool:
                try:
                    ranked.append((timed(cfg, s_rank)[0], cfg))
                except Exception as exc:  # a tile that does not compile is reported, not fatal
                    log(f"  {name} M={tokens} {label(cfg)}: {type(exc).__name__}: {str(exc)[:200]}")
            ranked.sort(key=lambda t: t[0])
            if tokens == TOKENS[0]:
                # the leaders of each kernel: the union density grows with the tokens, and the walk's
                # time hardly follows it while the compact's does, so the order can flip
                leaders[band] = [cfg for kind in ("walk", "compact")
                                 for cfg in [c for _, c in ranked if kind_of(c) == kind][:RANK_LEADERS // 2]]
            best[band] = ranked[0][1]
        for s in LEVELS:
            band = band_of(n, k, s)
            per_row = bk.config_with_union_rows("off", n, k, tokens, s)
            per_row_ms, per_row_out = timed(per_row, s)

            # what the launcher runs now (a union config an earlier run adopted, else per-row)
            committed = launchers.pick_config(n, k, tokens, 0, dev, s)
            committed_ms = per_row_ms if committed == per_row else timed(committed, s)[0]
            union_ms, union_out = timed(best[band], s)
            err = float((union_out - per_row_out).abs().max() / per_row_out.abs().max().clamp_min(1e-6))
            other_ahead_us = None
            if kind_of(best[band]) == "compact" and list_ahead_ab:
                # the same config with the union compact loop's list entries the other way
                launchers.UNION_LIST_AHEAD = not launchers.UNION_LIST_AHEAD
                try:
                    other_ahead_us = timed(best[band], s)[0] * 1e3
                finally:
                    launchers.UNION_LIST_AHEAD = not launchers.UNION_LIST_AHEAD
            density = sum(u for _, _, _, u in inputs[s]) / len(inputs[s])
            row = {"shape": name, "n": n, "k": k, "tokens": tokens, "sparsity": s, "band": band,
                   "dense_us": dense_ms * 1e3, "per_row_us": per_row_ms * 1e3, "union_us": union_ms * 1e3,
                   "per_row_ratio": per_row_ms / dense_ms, "union_ratio": union_ms / dense_ms,
                   "union_density": density, "union_max_rel_err_vs_per_row": err,
                   "per_row_config": dataclasses.asdict(per_row), "union_config": dataclasses.asdict(best[band]),
                   "union_list_ahead": launchers.UNION_LIST_AHEAD,
                   "committed_us": committed_ms * 1e3, "committed_config": dataclasses.asdict(committed)}
            if other_ahead_us is not None:
                row["union_other_list_ahead_us"] = other_ahead_us
            rows.append(row)
            log(f"{name:18s} M={tokens:2d} s={s} dense {dense_ms * 1e3:6.1f} us  per-row {per_row_ms * 1e3:6.1f} "
                f"({row['per_row_ratio']:.2f}x)  union {union_ms * 1e3:6.1f} ({row['union_ratio']:.2f}x, density "
                f"{density:.2f}, err {err:.1e})  {label(best[band])}")
    for layer in layers:
        layer.free()
    del layers
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


# what the launcher can run at a point, as union_rows.py times it: name -> row keys of its time and config
CHOICES = {"committed": ("committed_us", "committed_config"), "per-row": ("per_row_us", "per_row_config"),
           "union": ("union_us", "union_config")}


def choice_us(row: dict, choice: str) -> float:
    """A point's time with one of CHOICES; runs before session 20 timed no committed config, which
    was per-row wherever they ran."""
    return row.get(CHOICES[choice][0], row["per_row_us"])


def choose(row: dict) -> str:
    """Which of CHOICES the launcher should run at this point (measured at its band's ranking
    sparsity): the committed config unless per-row or the union is ADOPT_MAX_RATIO faster (the union
    only if it agrees with per-row to bf16 rounding); the fastest of those that are. Per-row is a
    choice too: a union adopted at one ranking sparsity can lose to it in a later run."""
    now = choice_us(row, "committed")
    better = [(choice_us(row, name), name) for name in ("per-row", "union")
              if choice_us(row, name) < ADOPT_MAX_RATIO * now
              and (name == "per-row" or row["union_max_rel_err_vs_per_row"] < ADOPT_MAX_ERR)]
    return min(better)[1] if better else "committed"


def choice_config(row: dict, choice: str) -> dict:
    return row.get(CHOICES[choice][1], row["per_row_config"])


def choices_at_ranking(rows: list[dict]) -> dict:
    """(shape key, band, tokens) -> what `choose` takes there, from the rows at the band's ranking sparsity."""
    return {(launchers._shape_key(r["n"], r["k"]), r["band"], r["tokens"]): choose(r)
            for r in rows if r["sparsity"] == BAND_SPARSITY[r["band"]]}


def _one_token_from(path: str | None, gpu: str | None) -> dict | None:
    """--one-token-from: one_token_ratios of that committed_kernels.py file for `gpu`, or None without one."""
    return one_token_ratios(json.loads(Path(path).read_text()), gpu) if path else None


def one_token_ratios(record: dict, gpu: str) -> dict:
    """{shape key: {level: sparse / dense}} of a committed_kernels.py run's one-token teal rows at
    RATIO_LEVELS (the run must come from `gpu`: a ratio is a property of the GPU)."""
    if record.get("gpu") != gpu:
        raise SystemExit(f"union_rows.py --one-token-from: that run is from {record.get('gpu')}, "
                         f"this one from {gpu}; their ratios cannot share one GPU's table")
    out: dict = {}
    for r in record["results"]:
        if r["method"] == "teal" and r["tokens"] == 1 and r["sparsity"] in RATIO_LEVELS:
            out.setdefault(launchers._shape_key(r["n"], r["k"]), {})[f"{r['sparsity']:g}"] = (
                round(r["sparse_ms"] / r["dense_ms"], 4))
    if not out:
        raise SystemExit("union_rows.py --one-token-from: the run has no one-token teal rows at the levels "
                         f"{RATIO_LEVELS} (committed_kernels.py --methods teal --tokens 1 ...)")
    return out


def adopt(rows: list[dict], out_dir: str, source: str, gpu: str | None = None,
          one_token: dict | None = None) -> list[str]:
    """The installed config and dispatch tables with this run's choices (module docstring, choose).

    gpu: the device the rows were timed on (None: the tables' own). On another GPU the choices and the
    threshold ratios go under the tables' "by_gpu" entries for it; the "committed" config each row
    raced is already the one that GPU reads (launchers.config_table). one_token: one_token_ratios of
    the same GPU, written beside this run's 2-16 token ratios."""
    configs = json.loads(json.dumps(launchers._load_json(launchers._CONFIG_FILE)))
    dispatch = json.loads(json.dumps(launchers._load_json(launchers._DISPATCH_FILE)))
    config_target = launchers.entry_for_gpu(configs, gpu)
    entry = launchers.entry_for_gpu(dispatch, gpu)
    elsewhere = entry is not dispatch
    adopted, chosen = [], choices_at_ranking(rows)
    for row in rows:
        band = row["band"]
        key = launchers._shape_key(row["n"], row["k"])
        choice = chosen[key, band, row["tokens"]] if row["sparsity"] == BAND_SPARSITY[band] else "committed"
        if choice != "committed":
            cfg = choice_config(row, choice)
            config_target.setdefault(band, {}).setdefault(key, {})[str(row["tokens"])] = cfg
            was = choice_config(row, "committed")
            adopted.append(f"{band}/{key}/{row['tokens']}: {label(launchers.GemvConfig.from_dict(cfg))} "
                           f"{choice_us(row, choice):.1f} us vs {'per-row' if was['rows'] == 1 else 'committed union'} "
                           f"{choice_us(row, 'committed'):.1f} us")
    if elsewhere:
        # that GPU's entry replaces the selection's table whole (launchers.dispatch_table): it starts
        # as what the GPU reads now, so shapes and token counts this run did not time keep their ratios
        ratios = entry.setdefault("ratios", {}).setdefault(
            "threshold", json.loads(json.dumps(dispatch.get("ratios", {}).get("threshold", {}))))
    else:
        ratios = dispatch.setdefault("ratios", {}).setdefault("threshold", {})
    for row in rows:
        if row["sparsity"] not in RATIO_LEVELS:
            continue
        key = launchers._shape_key(row["n"], row["k"])
        choice = chosen.get((key, row["band"], row["tokens"]), "committed")
        ratio = choice_us(row, choice) / row["dense_us"]
        ratios.setdefault(key, {}).setdefault(f"{row['sparsity']:g}", {})[str(row["tokens"])] = round(ratio, 4)
    for key, by_level in (one_token or {}).items():
        for level, ratio in by_level.items():
            ratios.setdefault(key, {}).setdefault(level, {})["1"] = ratio
    commit = os.environ.get("RSPARSE_COMMIT", "unknown")
    where = "" if config_target is configs else f" on {gpu}"
    record = (f"configs of 2-16 tokens adopted by benchmarks/gpu/union_rows.py --adopt{where} ({commit}): "
              + "; ".join(adopted))
    note_so_far = config_target.get("note", "")
    if adopted and record not in note_so_far:
        # the same run adopted again (--adopt-from onto tables that already hold it) is recorded once
        config_target["note"] = f"{note_so_far}; {record}" if note_so_far else record
    note = (f"threshold ratios of 2-16 tokens at levels 0 / 0.5 / 0.9 from benchmarks/gpu/union_rows.py "
            f"({commit}, {source}): per token count the config the launcher "
            f"uses (union where adopted, else the committed per-row config)"
            + ("; one token from committed_kernels.py's teal rows on the same GPU" if one_token else ""))
    launchers.put_note(dispatch, entry, "threshold", note)
    os.makedirs(out_dir, exist_ok=True)
    Path(out_dir, launchers._CONFIG_FILE).write_text(json.dumps(configs, indent=1) + "\n")
    Path(out_dir, launchers._DISPATCH_FILE).write_text(json.dumps(dispatch, indent=1) + "\n")
    return adopted


def print_adopted(adopted: list[str]) -> None:
    print("adopted:" if adopted else "adopted: none", *adopted, sep="\n  ", flush=True)


def report(data: dict, walk: dict | None = None) -> str:
    """Markdown of a union_rows.py run (and the walk-only first run, for its column)."""
    rows = data["rows"]
    walk_us = {(r["shape"], r["tokens"], r["sparsity"]): r["union_us"] for r in (walk or {}).get("rows", [])}
    lines = [
        f"# Decode steps of 2-16 tokens: per-row vs union programs ({data['gpu']})",
        "",
        f"`benchmarks/gpu/union_rows.py`, commit `{data['commit']}`, versions {json.dumps(data['versions'])}. "
        f"{data['selection']}; {data['dtype']}; CUDA-graph timing over rotating weight copies (as the one-token "
        "sweep). Per shape and token count, in one process: dense cuBLAS, the committed per-row config of the "
        "sparsity's band (what the launcher ran before), and the fastest union config of the band (walk or compact "
        "union kernel, ranked at s = 0.5 / 0.9). 'union density' = the share of weight rows some token selected "
        "(1 - s^M for independent tokens). Times in us, ratio to dense in brackets; bold = the launcher's choice "
        "now (union where it beat per-row by 3% at the band's ranking sparsity), 'sparse' = at or below "
        f"{launchers.DISPATCH_MAX_RATIO:g}x dense, where the dispatch runs the kernels.",
    ]
    if walk:
        lines += ["", f"'walk only' = the first run (`{walk['commit']}`), whose union candidates were the walk "
                  "kernel's alone (sparse_gemv_kernel, ROWS = 16: predicated row loads over every K step)."]
    adopted = {tuple(a.split(":")[0].split("/")) for a in data.get("adopted", [])}
    head = "| shape | tokens | s | union density | dense | per-row | union | union config |" + (
        " walk only |" if walk else "")
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        key = launchers._shape_key(r["n"], r["k"])
        union_now = (r["band"], key, str(r["tokens"])) in adopted
        cells = []
        for name, us, ratio in (("per-row", r["per_row_us"], r["per_row_ratio"]), ("union", r["union_us"], r["union_ratio"])):
            text = f"{us:.1f} ({ratio:.2f}x)" + (" sparse" if ratio <= launchers.DISPATCH_MAX_RATIO else "")
            cells.append(f"**{text}**" if (name == "union") == union_now else text)
        cfg = launchers.GemvConfig.from_dict(r["union_config"])
        line = (f"| {r['shape']} | {r['tokens']} | {r['sparsity']:g} | {r['union_density']:.2f} | {r['dense_us']:.1f} | "
                f"{cells[0]} | {cells[1]} | {label(cfg)} |")
        if walk:
            w = walk_us.get((r["shape"], r["tokens"], r["sparsity"]))
            line += f" {w / r['dense_us']:.2f}x |" if w else " |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def report_choices(data: dict) -> str:
    """Markdown of a run that also timed each point's committed config (session 20 on): the three
    choices side by side and, in bold, the one --adopt takes (choose, at the band's ranking sparsity)."""
    rows = data["rows"]
    chosen = choices_at_ranking(rows)
    lines = [
        f"# Decode steps of 2-16 tokens: committed vs per-row vs {'/'.join(data.get('union_kernels', ['union']))} "
        f"union ({data['gpu']})",
        "",
        f"`benchmarks/gpu/union_rows.py --kernels {' '.join(data.get('union_kernels', []))}`, commit `{data['commit']}`, "
        f"versions {json.dumps(data['versions'])}. {data['selection']}; {data['dtype']}; CUDA-graph timing over "
        "rotating weight copies. Per shape and token count, in one process: dense cuBLAS, the config the launcher "
        "ran before this run ('committed': per-row, or a 16-row union an earlier run adopted), per-row (the band's "
        "one-token config, one program per row), and the fastest union candidate of the band (ranked at s = 0.5 / "
        "0.9 at every token count). Times in us, ratio to dense in brackets; bold = the launcher's choice after "
        f"`--adopt` (union_rows.choose at the band's ranking sparsity: the committed config unless another is "
        f"{1 - ADOPT_MAX_RATIO:.0%} faster), 'sparse' = at or below {launchers.DISPATCH_MAX_RATIO:g}x dense, where "
        "the dispatch runs the kernels.",
        "",
        "| shape | tokens | s | union density | dense | committed | per-row | union | union config |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        choice = chosen.get((launchers._shape_key(r["n"], r["k"]), r["band"], r["tokens"]), "committed")
        cells = []
        for name in ("committed", "per-row", "union"):
            us = choice_us(r, name)
            ratio = us / r["dense_us"]
            text = f"{us:.1f} ({ratio:.2f}x)" + (" sparse" if ratio <= launchers.DISPATCH_MAX_RATIO else "")
            cells.append(f"**{text}**" if name == choice else text)
        cfg = launchers.GemvConfig.from_dict(r["union_config"])
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['sparsity']:g} | {r['union_density']:.2f} | "
                     f"{r['dense_us']:.1f} | {' | '.join(cells)} | {label(cfg)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--adopt", default="", help="write sparse_gemv.json and dispatch.json with the union choices here")
    ap.add_argument("--shapes", nargs="*", default=[], help="names from SHAPES (default: all)")
    ap.add_argument("--kernels", nargs="+", choices=KINDS, default=list(KINDS[:2]),
                    help="union candidate families (default: walk compact, the 16-row programs)")
    ap.add_argument("--list-ahead", action="store_true",
                    help="rank with launchers.UNION_LIST_AHEAD on, and time each chosen compact union with it off too")
    ap.add_argument("--fma-stages", nargs="+", type=int, choices=launchers.FMA_AHEAD_STEPS, default=FMA_STAGES,
                    help="the FMA loop's pipeline depths to rank (FMA_STAGES)")
    ap.add_argument("--adopt-from", metavar="JSON",
                    help="no run: --adopt's tables from a run's JSON (the installed tables as the base)")
    ap.add_argument("--one-token-from", metavar="JSON",
                    help="with --adopt: the one-token threshold ratios from this committed_kernels.py run's teal "
                         "rows (the same GPU)")
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="no run: the markdown of a run's JSON (and the walk-only run's) to --out")
    args = ap.parse_args()
    if args.adopt_from:
        data = json.loads(Path(args.adopt_from).read_text())
        os.environ.setdefault("RSPARSE_COMMIT", data["commit"])
        # a dry run's rows (the CPU check) stand for the tables' own GPU
        gpu = None if data["gpu"] == bk.DRY_RUN_GPU else data["gpu"]
        one_token = _one_token_from(args.one_token_from, data["gpu"])
        print_adopted(adopt(data["rows"], args.adopt, os.path.basename(args.adopt_from), gpu, one_token))
        return
    if args.report:
        data = [json.loads(Path(p).read_text()) for p in args.report]
        if "committed_us" in data[0]["rows"][0]:
            Path(args.out).write_text(report_choices(data[0]))
        else:
            Path(args.out).write_text(report(data[0], data[1] if len(data) > 1 else None))
        return
    gen = torch.Generator(device=bk.DEVICE).manual_seed(0)
    launchers.COMPACT_ROWS_ENABLED = False
    sms = 4 if bk.DRY_RUN else torch.cuda.get_device_properties(0).multi_processor_count
    shapes = [s for s in SHAPES if not args.shapes or s[0] in args.shapes]
    if bk.DRY_RUN:
        shapes = [("tiny/o", 256, 320)]
    rows = []

    def log(msg):
        print(msg, flush=True)

    meta = {**bk.run_header("benchmarks/gpu/union_rows.py"),
            "timing": "cuda_graph", "dtype": "bf16", "selection": "teal threshold, random x (independent tokens)"}
    launchers.UNION_LIST_AHEAD = args.list_ahead
    meta["union_list_ahead"] = args.list_ahead
    FMA_STAGES[:] = args.fma_stages  # union_candidates reads it
    meta["fma_stages"] = args.fma_stages
    meta["union_kernels"] = args.kernels
    for name, n, k in shapes:
        rows += measure_shape(name, n, k, gen, sms, log, list_ahead_ab=args.list_ahead, kinds=args.kernels)
        # what is measured so far survives a time limit
        Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))
    if args.adopt:
        gpu = None if bk.DRY_RUN else torch.cuda.get_device_name()
        adopted = adopt(rows, args.adopt, os.path.basename(args.out), gpu, _one_token_from(args.one_token_from, gpu))
        meta["adopted"] = adopted
        print_adopted(adopted)
    Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
