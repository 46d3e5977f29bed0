"""The R-Sparse low-rank term's cost at one token (first: why R-Sparse's threshold path was
slower than dense end to end on the H100), CUDA graphs, weights rotated through >= 160 MB of
copies (never in L2), per projection shape, at the split the calibration exports
(calibration.allocation.aligned_budget: rank a multiple of 16, the rest in kept channels):
  dense          F.linear on vLLM's [N, K] layout
  teal           the threshold kernel alone at R-Sparse's input sparsity
  variants_us    the same plus the low-rank term, for each v_t program layout of TILE_VARIANTS,
                 timed alternately
  lowrank16      of those, the layout the shape's committed config runs (the dispatch table's
                 number; the committed cc85ed8 files timed it once more with the launcher
                 defaults of then, wide_chunks everywhere)
                 (lowrank_wtiles_us: the w_t tile shape and chunk, the layout before session 11)
  up_only        the lowrank_up epilogue launch alone
With --epilogues (session 12) the shape's committed layout only, under each way of adding the
u^T term (EPILOGUE_VARIANTS), timed alternately: epilogues_us, and lowrank16_us = the launcher's
default. Sessions 12-14 also timed fused, fused_serial and claim (REPORTED_EPILOGUES), ways removed
in session 25 after those measurements (their code is at b21387c).

    python3 -P benchmarks/gpu/lowrank_time.py --sparsity 0.5 --out $OUT/lowrank_h200_s0.5.json
    # the lowrank16 timings become the dispatch table of modules with a low-rank term
    python benchmarks/gpu/lowrank_time.py --merge benchmarks/results/lowrank_h200_s0.4.json \
        benchmarks/results/lowrank_h200_s0.5.json --into kernels/configs/dispatch.json
    # files from a GPU other than the table's own ("gpu") go under its by_gpu entry for that GPU
    python benchmarks/gpu/lowrank_time.py --merge $RES/lowrank_h100_s*.json --variant config
    # the same table for a GPU it was not measured on, from that GPU's kernel sweep:
    python benchmarks/gpu/lowrank_time.py --merge benchmarks/results/lowrank_h100.json \
        --transfer-to benchmarks/results/kernels_h200.json --into kernels/configs/dispatch.json
With --tokens T... (session 33) decode steps of T > 1 tokens as well, one row each (x [T, K], the module's one
threshold): dense, the threshold kernel alone (teal_us), and with the term (paths_us): "tokens_config" = the
shape's committed config for T tokens (a union config falls back to one-row programs with the shape's one-token
config, launchers.union_lowrank_config; files before session 34 call it "launcher", which it then was) and,
where the picked config is a union one, "union_walk" = the 16-row union walk it fell back to before
(launchers.union_walk_lowrank_config), else "one_token_config" = the shape's one-token config at T rows (the
T-token configs were ranked without the term). lowrank16_us = tokens_config's. --merge files tokens_config under
ratios["threshold_lowrank"] and one_token_config under ratios["threshold_lowrank_one_token"], by token count;
from session 34 the launcher runs the faster of the two at the module's sparsity
(launchers.lowrank_rows_one_token).
    python3 -P benchmarks/gpu/lowrank_time.py --sparsity 0.5 --tokens 2 --out $RES/lowrank_h100_t2_s0.5.json
Files before session 11 (lowrank_h100.json, lowrank_h200_s0.*_653bfda.json) used the unaligned
budget rank and timed it unpadded ("lowrank"), padded to 16 and to 64.
"""

import argparse
import dataclasses
import json
import math
import os

import torch

from vllm_rsparse import launchers
from vllm_rsparse.cuda_timing import graph_replay_ms

SHAPES = {"llama2-7b/qkv": (12288, 4096), "llama2-7b/o": (4096, 4096), "llama2-7b/gate_up": (22016, 4096),
          "llama2-7b/down": (4096, 11008), "llama3-8b/qkv": (6144, 4096), "llama3-8b/gate_up": (28672, 4096),
          "llama3-8b/down": (4096, 14336)}


# v_t program layouts timed side by side (launchers.LOWRANK_LAYOUT, LOWRANK_MAX_BLOCK_KV): the
# w_t shape and chunk (before session 11), own tiles on the w_t chunk, own tiles on longer chunks
# (the default) with up to 64 and 32 rows a list step
TILE_VARIANTS = {"wtiles": ("w_tiles", 64), "own_chunk": ("own_tiles", 64), "wide_chunks": ("wide_chunks", 64),
                 "wide_chunks_kv32": ("wide_chunks", 32)}
_TILE_KNOBS = ("LOWRANK_LAYOUT", "LOWRANK_MAX_BLOCK_KV")
# the variant each layout of a committed config (GemvConfig.lowrank) runs: the one at the launcher's row bound
_LAYOUT_VARIANT = {layout: name for name, (layout, max_kv) in TILE_VARIANTS.items()
                   if max_kv == launchers.LOWRANK_MAX_BLOCK_KV}


# the u^T term's ways (launchers.LOWRANK_UP_PDL): the epilogue launch after one grid of v_t and w_t
# programs, plainly or with PDL
EPILOGUE_VARIANTS = {"launch": (False,), "launch_pdl": (True,)}
_EPILOGUE_KNOBS = ("LOWRANK_UP_PDL",)
# the report's columns, in order: the committed files of sessions 12-14 also timed u^T rows in the
# w_t programs after a z launch, overlapped with it by PDL (fused) or not (fused_serial), and in one
# launch whose v_t items any program may claim (claim); removed in session 25
REPORTED_EPILOGUES = (*EPILOGUE_VARIANTS, "fused", "fused_serial", "claim")


def default_epilogue_variant() -> str:
    """The EPILOGUE_VARIANTS entry a launch with the launcher's current settings runs."""
    current = (launchers.lowrank_up_pdl_requested(),)
    return next(name for name, values in EPILOGUE_VARIANTS.items() if values == current)


def timed_alternately(calls, variants: dict, knobs: tuple, rounds: int = 2) -> tuple[dict, dict]:
    """{variant: best per-call us} and {variant: first call's output} of `calls` under each
    variant's launcher settings (values for `knobs`), the variants alternating round by round so
    that all see the same clocks and neighbours."""
    times = {name: [] for name in variants}
    outs = {}
    for _ in range(rounds):
        for name, values in variants.items():
            saved = [getattr(launchers, knob) for knob in knobs]
            for knob, value in zip(knobs, values):
                setattr(launchers, knob, value)
            try:
                times[name].append(graph_us(calls))
                outs[name] = calls[0]().float()
            finally:
                for knob, value in zip(knobs, saved):
                    setattr(launchers, knob, value)
    return {name: min(t) for name, t in times.items()}, outs


def config_variant(n: int, k: int, sparsity: float | None = None, gpu: str | None = None) -> str:
    """The TILE_VARIANTS entry that shape (N, K) runs at one token with the committed configs at
    input sparsity `sparsity` (its band; None: the design band) on `gpu` (default: this process's;
    a file merged or reported on the CPU names the GPU that measured it, whose configs it ran)."""
    cfg = launchers.pick_config(n, k, 1, 16, torch.device("cuda"), sparsity, gpu)
    return _LAYOUT_VARIANT[launchers.lowrank_layout(cfg)]


def compiled_resources() -> list[dict]:
    """Registers, spills and shared memory of every kernel of kernels.sparse_gemv compiled so far
    in this process (one entry per specialization): session 13's offline sm_90 build of a kernel
    (claim, since removed) used calls and a stack, which a timing alone would not show."""
    import triton

    from vllm_rsparse.kernels import sparse_gemv

    found = []
    for name, fn in vars(sparse_gemv).items():
        if not isinstance(fn, triton.runtime.JITFunction):
            continue
        for caches in getattr(fn, "device_caches", {}).values():
            # (kernel_cache, kernel_key_cache, target, backend, binder) in Triton 3.x
            kernel_cache = caches[0] if isinstance(caches, tuple) else caches
            for compiled in list(kernel_cache.values()):
                try:
                    compiled._init_handles()
                    found.append({"kernel": name, "num_warps": compiled.metadata.num_warps,
                                  "n_regs": compiled.n_regs, "n_spills": compiled.n_spills,
                                  "shared_bytes": compiled.metadata.shared})
                except Exception as exc:  # a Triton whose internals differ: say so, keep the timings
                    found.append({"kernel": name, "error": repr(exc)[:200]})
    return found


def _row_sparsity(row: dict) -> float | None:
    """The sparsity a file's row was measured at as far as the launcher saw it: files before session
    17 did not pass the module's sparsity to sparse_linear (the design band, the v_t chunks of 0.5)."""
    return row["input_sparsity"] if row.get("sparsity_passed") else None


def graph_us(calls, reps: int = 4) -> float:
    """Per-call microseconds of `calls` (one per weight copy), `reps` rounds in one CUDA graph."""
    def rounds():
        for _ in range(reps):
            for c in calls:
                c()

    return graph_replay_ms(rounds) * 1e3 / (reps * len(calls))


def _variant_words(variant: str) -> str:
    if variant == "config":
        return ", each shape's v_t layout from its committed config (GemvConfig.lowrank, lowrank_time.TILE_VARIANTS)"
    return f", v_t layout {variant!r} (lowrank_time.TILE_VARIANTS)" if variant else ""


def _token_words(counts: list[int]) -> str:
    if counts == [1]:
        return "one token"
    return f"{', '.join(map(str, counts[:-1]))} and {counts[-1]} tokens (more than one: the shape's config for that token count)"


def merge_dispatch(result_paths: list[str], dispatch_path: str, variant: str = "") -> None:
    """ratios["threshold_lowrank"][shape][input sparsity][tokens] = padded low-rank time /
    dense time (the runtime pads the rank: launchers.prepare_lowrank), one level per measured
    file (one-token rows and --tokens rows of a level may come in separate files); --tokens rows
    that timed the shape's one-token config also fill ratios["threshold_lowrank_one_token"] (the
    launcher runs the faster: launchers.lowrank_rows_one_token). The tables are rebuilt from these
    files alone: levels of an earlier table (an estimate
    for another GPU, or another GPU's measurement) must not mix with this GPU's measurement.
    Files from a GPU other than the dispatch table's own ("gpu") go under its "by_gpu" entry for
    that GPU (launchers.dispatch_table), the table's own entries staying those of its GPU."""
    results = [json.load(open(path)) for path in result_paths]
    gpus = {result["gpu"] for result in results}
    if len(gpus) != 1:
        raise SystemExit(f"--merge: the files were measured on different GPUs {sorted(gpus)}; merge one GPU's")
    dispatch = json.load(open(dispatch_path))
    table, one_token_table = {}, {}
    for result in results:
        for row in result["rows"]:
            key, level = launchers._shape_key(row["n"], row["k"]), f"{round(row['input_sparsity'], 4):g}"
            tokens = row.get("tokens", 1)
            if tokens > 1:  # --tokens rows: the shape's T-token config, and its one-token config where timed
                lowrank_us = tokens_config_us(row)
                # where the picked config is a union one (union_walk timed beside it), tokens_config already
                # is the one-token config: the second table gets that level too, so that neither table is
                # clamped across a level the other has (interpolated_ratio)
                one_token_us = row["paths_us"].get("one_token_config",
                                                   lowrank_us if "union_walk" in row["paths_us"] else None)
                if one_token_us is not None:
                    one_token_table.setdefault(key, {}).setdefault(level, {})[str(tokens)] = (
                        round(one_token_us / row["dense_us"], 4))
            else:
                name = (config_variant(row["n"], row["k"], _row_sparsity(row), result["gpu"]) if variant == "config"
                        else variant)
                lowrank_us = row["variants_us"][name] if name else row["lowrank16_us"]
            per_level = table.setdefault(key, {}).setdefault(level, {})
            per_level[str(tokens)] = round(lowrank_us / row["dense_us"], 4)
    counts = sorted({row.get("tokens", 1) for result in results for row in result["rows"]})
    gpu = gpus.pop()
    described = ", ".join(
        f"{os.path.basename(path)} (model sparsity {result['sparsity']}, sparse share {result['share']}, "
        f"{result.get('commit', '?')})" for path, result in zip(result_paths, results))
    note = (
        f"threshold_lowrank: R-Sparse (threshold + low-rank term, rank a multiple of 16) at "
        f"{_token_words(counts)}, measured on "
        f"{gpu}: {described}{_variant_words(variant)}; sparsities between the measured levels are interpolated, outside them "
        "clamped (launchers.interpolated_ratio); more tokens are not measured (dense)."
        + (" threshold_lowrank_one_token: the same steps with the shape's one-token config, one program per row; "
           "the launcher runs the faster of the two (launchers.lowrank_rows_one_token)." if one_token_table else ""))
    entry = launchers.entry_for_gpu(dispatch, gpu)
    ratios, one_token_key = entry.setdefault("ratios", {}), "threshold" + launchers.LOWRANK_ONE_TOKEN_SUFFIX
    ratios["threshold_lowrank"] = table
    ratios.pop(one_token_key, None)  # rebuilt from these files alone, too
    if one_token_table:
        ratios[one_token_key] = one_token_table
    launchers.put_note(dispatch, entry, "threshold_lowrank", note)
    with open(dispatch_path, "w") as f:
        json.dump(dispatch, f, indent=1)
        f.write("\n")


def transferred_ratios(lowrank_rows: list[dict], sweep_rows: list[dict]) -> dict:
    """threshold_lowrank ratios for the GPU of a --graph-sweep (sweep_rows) from low-rank
    timings made on another GPU (lowrank_rows): {shape_key: {level: {"1": ratio}}}.

    Model: the low-rank term adds a fixed time per module (its second launch, the f32 partial
    round trip, the factor reads), measured there as lowrank16_us - teal_us, and taken over
    unchanged in microseconds -- not as a share of dense, which on a GPU with faster memory is
    smaller while the fixed cost is not. ratio(s) = (threshold ratio of this GPU at s) +
    overhead_us / (dense_us of this GPU), at every sparsity level the sweep measured (plus the
    low-rank run's own input sparsity), one token. Checked against e2e_h200_2fd2efc (R-Sparse steps
    predicted 4.14 / 5.13 ms from the kernels, 4.21 / 5.15 ms measured on Llama-2 0.5 / Llama-3 0.4)."""
    from vllm_rsparse.launchers import _shape_key, interpolated_ratio

    # this GPU's one-token threshold ratios per shape, in the dispatch table's form, and its dense time
    ratios, dense_us = {}, {}
    for r in sweep_rows:
        if r["method"] == "teal" and r["tokens"] == 1:
            key = _shape_key(r["n"], r["k"])
            ratios.setdefault(key, {})[f"{float(r['sparsity']):g}"] = {"1": r["sparse_ms"] / r["dense_ms"]}
            dense_us.setdefault(key, r["dense_ms"] * 1e3)  # the same dense call for every level

    table = {}
    for row in lowrank_rows:
        key = _shape_key(row["n"], row["k"])
        if key not in ratios:
            continue
        overhead_us = max(row["lowrank16_us"] - row["teal_us"], 0.0)
        levels = sorted({*(float(s) for s in ratios[key]), round(row["input_sparsity"], 4)})
        table[key] = {f"{s:g}": {"1": round(interpolated_ratio(ratios[key], s, 1) + overhead_us / dense_us[key], 4)}
                      for s in levels}
    return table


def transfer_dispatch(result_path: str, sweep_path: str, dispatch_path: str) -> None:
    """merge_dispatch for a GPU the low-rank timings were not made on (transferred_ratios)."""
    result = json.load(open(result_path))
    sweep = json.load(open(sweep_path))
    dispatch = json.load(open(dispatch_path))
    dispatch.setdefault("ratios", {})["threshold_lowrank"] = transferred_ratios(result["rows"], sweep["results"])
    dispatch["lowrank_note"] = (
        f"threshold_lowrank: R-Sparse (threshold + low-rank term, rank padded to 16) at one token, ESTIMATED "
        f"for {sweep['gpu']}: the threshold ratios of {os.path.basename(sweep_path)} ({sweep['commit']}) plus the "
        f"low-rank term's extra time per module measured on {result['gpu']} ({os.path.basename(result_path)}, "
        f"model sparsity {result['sparsity']}, sparse share {result['share']}), kept in microseconds "
        "(benchmarks/gpu/lowrank_time.py transferred_ratios); more tokens are not measured (dense). "
        f"Replace by a measurement on {sweep['gpu']}: lowrank_time.py --out, then --merge.")
    with open(dispatch_path, "w") as f:
        json.dump(dispatch, f, indent=1)
        f.write("\n")


def report(result_paths: list[str]) -> str:
    """Markdown table of lowrank_time.py files (one per R-Sparse level): per shape, the ratio to
    dense of the threshold kernel alone and of each v_t layout with the term, the epilogue alone."""
    results = [json.load(open(path)) for path in result_paths]
    if all("epilogues_us" in row for result in results for row in result["rows"]):
        return report_epilogues(results)
    names = list(TILE_VARIANTS)
    lines = _table_head(
        f"R-Sparse's low-rank term at one token, {results[0]['gpu']}",
        "`python3 -P benchmarks/gpu/lowrank_time.py --sparsity S --out ...` per level (CUDA graphs, weights "
        "rotated through >= 160 MB of copies, bf16, ranks as the calibration exports them); v_t layouts timed "
        "alternately in one process, each the best of two rounds. Ratio to dense F.linear (us in brackets); "
        "`*` = the layout the committed config runs (`GemvConfig.lowrank`).",
        ["level", "commit", "shape", "rank", "input sparsity", "dense us", "teal", *names, "epilogue us"])
    for result in results:
        for row in result["rows"]:
            if row.get("tokens", 1) > 1:
                continue
            dense = row["dense_us"]
            chosen = config_variant(row["n"], row["k"], _row_sparsity(row), result["gpu"])
            cells = [f"{row['variants_us'][v] / dense:.2f}{'*' if v == chosen else ''} ({row['variants_us'][v]:.1f})"
                     for v in names]
            lines.append(f"| {result['sparsity']} | {result.get('commit', '?')} | {row['shape']} | {row['rank']} | "
                         f"{row['input_sparsity']:.3f} | {dense:.1f} | {row['teal_us'] / dense:.2f} | "
                         + " | ".join(cells) + f" | {row['up_only_us']:.1f} |")
    if any(row.get("tokens", 1) > 1 for result in results for row in result["rows"]):
        lines += ["", *report_tokens(results)]
    return "\n".join(lines) + "\n"


def tokens_config_us(row: dict) -> float:
    """A --tokens row's time with the shape's committed config for its token count (the union fallback
    where that is a union one): "tokens_config", called "launcher" in files before session 34."""
    paths = row["paths_us"]
    return paths["tokens_config"] if "tokens_config" in paths else paths["launcher"]


def report_tokens(results: list[dict]) -> list[str]:
    """Markdown lines of the --tokens rows: per shape and token count, the ratio to dense of the threshold
    kernel alone and of each way of running the term, `*` on the one the launcher runs now."""
    lines = ["Decode steps of more than one token (`--tokens`, one row each, the module's one threshold): ratio to "
             "dense (us in brackets). tokens_config = the shape's committed config for the token count (a union "
             "config falls back to one-row programs with the shape's one-token config; \"launcher\" in files "
             "before session 34, what it ran then); union_walk = the 16-row union walk it fell back to before "
             "session 33 (only where the picked config is a union one); one_token_config = the shape's one-token "
             "config at these rows where the picked config is a per-row one (files from 03f047f on). `*` = what "
             "the launcher runs at this sparsity with the committed table (the faster of tokens_config and "
             "one_token_config where both were merged: launchers.lowrank_rows_one_token). config = "
             "tokens_config's.", "",
             "| level | shape | tokens | rank | input sparsity | dense us | teal | tokens_config | union_walk | "
             "one_token_config | config |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for row in result["rows"]:
            if row.get("tokens", 1) == 1:
                continue
            dense = row["dense_us"]
            paths = {"tokens_config": tokens_config_us(row), **{p: row["paths_us"][p] for p in
                                                                 ("union_walk", "one_token_config") if p in row["paths_us"]}}
            runs = "one_token_config" if launchers.lowrank_rows_one_token(
                row["n"], row["k"], row["tokens"], row["input_sparsity"], gpu=result["gpu"]) else "tokens_config"
            cells = [f"{paths[p] / dense:.2f}{'*' if p == runs else ''} ({paths[p]:.1f})" if p in paths else "-"
                     for p in ("tokens_config", "union_walk", "one_token_config")]
            config = row["config"]
            lines.append(f"| {result['sparsity']} | {row['shape']} | {row['tokens']} | {row['rank']} | "
                         f"{row['input_sparsity']:.3f} | {dense:.1f} | {row['teal_us'] / dense:.2f} | "
                         + " | ".join(cells) + f" | rows {config['rows']}, {config['kernel']}, block_n "
                         f"{config['block_n']}, split_k {config['split_k']} |")
    return lines


def _table_head(title: str, intro: str, columns: list[str]) -> list[str]:
    """The first lines of a report: title, how it was measured, the table's header."""
    return [f"# {title}", "", intro, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def report_epilogues(results: list[dict]) -> str:
    """Markdown table of --epilogues files: per shape, the ratio to dense of the threshold kernel
    alone and of the committed layout with each way of adding the u^T term."""
    # the ways the files timed (session 12's had no launch_pdl)
    names = [v for v in REPORTED_EPILOGUES if all(v in row["epilogues_us"] for r in results for row in r["rows"])]
    lines = _table_head(
        f"R-Sparse's u^T term at one token, {results[0]['gpu']}",
        "`python3 -P benchmarks/gpu/lowrank_time.py --epilogues --sparsity S --out ...` per level (CUDA graphs, "
        "weights rotated through >= 160 MB of copies, bf16, ranks as the calibration exports them, each shape's "
        "committed v_t layout unless the table says otherwise); the ways of adding z u^T that the files timed "
        "(`EPILOGUE_VARIANTS`: launch = the epilogue launch, launch_pdl = the same launched with PDL, fused = u^T "
        "rows in the w_t programs after a z launch overlapped with it by PDL, fused_serial = the same without "
        "overlap) timed alternately in one process, each the best of two rounds. Ratio to dense F.linear (us in "
        "brackets)." + (" claim = one launch: the u^T rows in the w_t programs, which compute any v_t item nobody "
                        "has claimed when z is not complete (sparse_gemv_claim_kernel)." if "claim" in names else ""),
        ["level", "commit", "v_t layout", "shape", "rank", "input sparsity", "dense us", "teal", *names,
         "max diff vs launch"])
    for result in results:
        layout = result.get("lowrank_layout_forced") or "committed"
        for row in result["rows"]:
            dense = row["dense_us"]
            cells = [f"{row['epilogues_us'][v] / dense:.2f} ({row['epilogues_us'][v]:.1f})" for v in names]
            diff = max(row["epilogues_max_diff"].values())
            lines.append(f"| {result['sparsity']} | {result.get('commit', '?')} | {layout} | {row['shape']} | "
                         f"{row['rank']} | "
                         f"{row['input_sparsity']:.3f} | {dense:.1f} | {row['teal_us'] / dense:.2f} | "
                         + " | ".join(cells) + f" | {diff:.3g} |")
    for result in results:
        if result.get("kernel_resources"):
            lines += ["", *resources_table(result)]
    return "\n".join(lines) + "\n"


def resources_table(result: dict) -> list[str]:
    """Markdown lines: the registers and spills of the kernels a file's run compiled, grouped
    by kernel and warps (compiled_resources; a specialization is not tied to one shape)."""
    groups = {}
    for entry in result["kernel_resources"]:
        if "error" not in entry:
            groups.setdefault((entry["kernel"], entry["num_warps"]), []).append(entry)
    lines = [f"Kernels compiled by the s = {result['sparsity']} run (`kernel_resources`), per kernel and warps: "
             "specializations, registers per thread, spilled registers (min-max).", "",
             "| kernel | warps | specializations | registers | spills |", "|---|---|---|---|---|"]
    for (kernel, warps), entries in sorted(groups.items()):
        regs = sorted(e["n_regs"] for e in entries)
        spills = sorted(e["n_spills"] for e in entries)
        lines.append(f"| {kernel} | {warps} | {len(entries)} | {regs[0]}-{regs[-1]} | {spills[0]}-{spills[-1]} |")
    return lines


def time_tokens(name: str, n: int, k: int, rank: int, keep: int, tokens: int, layers: list, gen) -> dict:
    """One --tokens row: a decode step of `tokens` rows (random x, the module's one threshold, taken so that
    `keep` of each row's K channels pass on average) through dense, the threshold kernel alone, and the
    term's paths (module docstring), the paths alternating round by round."""
    device = layers[0][0].device  # the GPU (a CPU test runs it under the Triton interpreter)
    x = torch.randn(tokens, k, device=device, generator=gen).to(torch.bfloat16)
    thr = torch.quantile(x.float().abs().flatten(), 1 - keep / k).reshape(1)
    s_in = 1 - keep / k
    row = {"shape": name, "n": n, "k": k, "rank": rank, "tokens": tokens, "input_sparsity": s_in,
           "sparsity_passed": True}
    row["dense_us"] = graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w, _, _, _ in layers])
    row["teal_us"] = graph_us([lambda wp=wp: launchers.sparse_linear(x, wp, None, thr, -1, None, None, None,
                                                                     use_crossover=False, sparsity=s_in)
                               for _, wp, _, _ in layers])
    picked = launchers.pick_config(n, k, tokens, rank, device, s_in)
    # explicit configs, so that the table in force (lowrank_rows_one_token) does not choose for the script
    paths = {"tokens_config": launchers.lowrank_launch_config(picked, n, k, rank, device, s_in)}
    if launchers.uses_union_compact_kernel(picked):
        paths["union_walk"] = launchers.union_walk_lowrank_config(picked)
    else:
        # the shape's one-token config, one program per row (what a union config falls back to): the
        # T-token configs were ranked without the term, whose v_t programs follow their split
        paths["one_token_config"] = launchers.union_lowrank_config(n, k, rank, device, s_in)
    times, outs = {p: [] for p in paths}, {}
    for _ in range(2):
        for path, config in paths.items():
            calls = [lambda wp=wp, up=up, vp=vp, config=config: launchers.sparse_linear(
                         x, wp, None, thr, -1, None, up, vp, config=config, use_crossover=False, sparsity=s_in)
                     for _, wp, up, vp in layers]
            times[path].append(graph_us(calls))
            outs[path] = calls[0]().float()
    row["paths_us"] = {p: min(t) for p, t in times.items()}
    row["paths_max_diff"] = {p: float((out - outs["tokens_config"]).abs().max()) for p, out in outs.items()}
    row["lowrank16_us"] = row["paths_us"]["tokens_config"]
    row["config"] = dataclasses.asdict(paths["tokens_config"])
    row["picked_config"] = dataclasses.asdict(picked)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--merge", nargs="+",
                    help="lowrank_<gpu>.json files of one GPU (one per sparsity) -> the table in --into (no GPU needed)")
    ap.add_argument("--into", default="kernels/configs/dispatch.json")
    ap.add_argument("--variant", default="", choices=["", "config", *TILE_VARIANTS],
                    help="with --merge: take this v_t layout's timings (files with variants_us) instead of "
                         "lowrank16_us, the launcher defaults of the measuring run; config: each shape's "
                         "layout in the committed configs (GemvConfig.lowrank)")
    ap.add_argument("--transfer-to", default="",
                    help="with --merge: a --graph-sweep JSON of another GPU; estimate the table for that GPU")
    ap.add_argument("--report", nargs="+", help="lowrank_<gpu>_s*.json files -> a markdown table on stdout")
    ap.add_argument("--epilogues", action="store_true",
                    help="time the u^T term's ways (EPILOGUE_VARIANTS) on each shape's committed layout instead of "
                         "the v_t layouts")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--share", type=float, default=0.9)
    ap.add_argument("--tokens", nargs="+", type=int, default=[1],
                    help="decode step sizes to time (1: the v_t layouts; more: the shape's config for that token "
                         "count beside the union walk or the one-token config, one row each)")
    args = ap.parse_args()
    if args.report:
        print(report(args.report), end="")
        return
    if args.merge and args.transfer_to:
        if len(args.merge) != 1:
            ap.error("--transfer-to takes one --merge file")
        transfer_dispatch(args.merge[0], args.transfer_to, args.into)
        return
    if args.merge:
        merge_dispatch(args.merge, args.into, args.variant)
        return
    if not args.out:
        ap.error("--out is required to measure")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    from vllm_rsparse.calibration.allocation import aligned_budget

    for name, (n, k) in SHAPES.items():
        keep_fraction, rank = aligned_budget(n, k, args.sparsity, (1 - args.sparsity) * args.share)
        keep = round(keep_fraction * k)
        copies = max(2, math.ceil(160e6 / (n * k * 2)))
        layers = []
        for _ in range(copies):
            w = (torch.randn(n, k, device="cuda", generator=gen) * k**-0.5).to(torch.bfloat16)
            u = (torch.randn(n, rank, device="cuda", generator=gen) * rank**-0.5).to(torch.bfloat16)
            v = (torch.randn(rank, k, device="cuda", generator=gen) * k**-0.5).to(torch.bfloat16)
            layers.append((w, launchers.prepare_weight(w), *launchers.prepare_lowrank(u, v)))
        x = torch.randn(1, k, device="cuda", generator=gen).to(torch.bfloat16)
        thr = torch.quantile(x.float().abs().flatten(), 1 - keep / k).reshape(1)
        for tokens in sorted(t for t in args.tokens if t > 1):
            rows.append(time_tokens(name, n, k, rank, keep, tokens, layers, gen))
            print({key: (round(val, 2) if isinstance(val, float) else val) for key, val in rows[-1].items()}, flush=True)
        if 1 not in args.tokens:
            del layers
            torch.cuda.empty_cache()
            continue
        row = {"shape": name, "n": n, "k": k, "rank": rank, "input_sparsity": 1 - keep / k}
        row["dense_us"] = graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w, _, _, _ in layers])
        # the module's input sparsity, as the LinearMethod passes it: the config band and the v_t chunks
        s_in = row["input_sparsity"]
        row["sparsity_passed"] = True
        row["teal_us"] = graph_us([lambda wp=wp: launchers.sparse_linear(x, wp, None, thr, -1, None, None, None,
                                                                         use_crossover=False, sparsity=s_in)
                                   for _, wp, _, _ in layers])
        calls = [lambda wp=wp, up=up, vp=vp: launchers.sparse_linear(
                     x, wp, None, thr, -1, None, up, vp, use_crossover=False, sparsity=s_in)
                 for _, wp, up, vp in layers]
        if args.epilogues:
            # the committed layout under each way of adding the u^T term
            row["epilogues_us"], outs = timed_alternately(calls, EPILOGUE_VARIANTS, _EPILOGUE_KNOBS)
            row["epilogues_max_diff"] = {name: float((out - outs["launch"]).abs().max()) for name, out in outs.items()}
            default = default_epilogue_variant()
            row["lowrank16_us"] = row["epilogues_us"][default]
        else:
            # every v_t tile shape alternately, so that all see the same clocks and neighbours
            row["variants_us"], outs = timed_alternately(calls, TILE_VARIANTS, _TILE_KNOBS)
            row["variants_max_diff"] = {name: float((out - outs["wtiles"]).abs().max()) for name, out in outs.items()}
            # the layout the shape's committed config runs: the dispatch table's number
            row["lowrank16_us"] = row["variants_us"][config_variant(n, k, s_in)]
            row["lowrank_wtiles_us"] = row["variants_us"]["wtiles"]
        # the epilogue alone: y32 + z u^T
        y32 = torch.zeros(1, n, device="cuda")
        z = torch.randn(1, rank, device="cuda")
        outb = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        row["up_only_us"] = graph_us([lambda up=up: launchers.launch_lowrank_up(y32, z, up, outb)
                                      for _, _, up, _ in layers])
        row["config"] = launchers.describe_config(n, k, 1, rank, sparsity=s_in)
        rows.append(row)
        print({key: (round(val, 2) if isinstance(val, float) else val) for key, val in row.items()}, flush=True)
        del layers
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"commit": os.environ.get("RSPARSE_COMMIT", "unknown"), "gpu": torch.cuda.get_device_name(),
                   "torch": torch.__version__, "sparsity": args.sparsity,
                   "lowrank_up_pdl": launchers.lowrank_up_pdl_requested(),
                   "lowrank_layout_forced": launchers.LOWRANK_LAYOUT,
                   "share": args.share, "rows": rows, "kernel_resources": compiled_resources()}, f, indent=1)


if __name__ == "__main__":
    main()
