"""Probe (issue 4): how much of the one-token sparse GEMV time is fixed cost, how much is bytes?

The speed targets of issue 4 ask for <= 0.58x dense at s = 0.5 and >= 80% of the copy bandwidth
on the bytes read. A kernel whose time is `fixed + bytes / bandwidth` can miss both targets with
a bandwidth term at copy speed, if the fixed term is large against a ~10-50 us dense GEMV. This
probe separates the two, per shape and per committed config band: it times the committed config
of each band ("configs", ranked at 0.5; "configs_high", ranked at 0.9) over sparsities 0..1 at one
token and fits time = fixed + bytes / marginal bandwidth by least squares on the points inside the
band's use (0.3-0.9). s = 1.0 (no row selected: the launch, the selection, the split-K tail, no
weight bytes) is the fixed cost measured directly. Also timed: a one-token cuBLAS GEMV of a tiny
matrix (the floor of one kernel in a CUDA graph) and dense cuBLAS of the shape.
Timing as the sweep (bench_kernels.graph_time_ms: CUDA graphs over >= 160 MB of weight copies).

    python3 -P benchmarks/gpu/fixed_cost.py --out $OUT/fixed_cost_h200.json
    python3 -P benchmarks/gpu/fixed_cost.py --finishes fixed counter --out ...   # both split-K finishes,
        alternating at every point (rows and fits carry "finish"; the band table reads the launcher's)
    python3 -P benchmarks/gpu/fixed_cost.py --finishes fixed fixed+pdl --out ...   # without and with
        programmatic dependent launch (calls back to back in one graph: the most PDL can hide)
    RSPARSE_BENCH_DRY=1 python benchmarks/gpu/fixed_cost.py --out /tmp/f.json   # CPU: script check only
"""

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_rsparse import launchers

# the wide-tile probe's module: its shape list and its handle on bench_kernels (loaded by path:
# `python3 -P` puts no script folder on sys.path)
_spec = importlib.util.spec_from_file_location("wide_tiles", Path(__file__).resolve().parent / "wide_tiles.py")
wide_tiles = importlib.util.module_from_spec(_spec)
sys.modules["wide_tiles"] = wide_tiles
_spec.loader.exec_module(wide_tiles)
bk = wide_tiles.bk
SHAPES = wide_tiles.SHAPES
SPARSITIES = [0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0]
FIT_RANGE = (0.3, 0.9)
# the band a config is ranked for, as launchers.pick_config chooses it
BAND_SPARSITY = {"configs": 0.5, "configs_high": 0.9}


# a "finish" names the split-K finish, and the launcher switches timed against it after "+"s
# (e.g. "fixed+pdl+evict"): "+pdl" programmatic dependent launch (launchers.PDL_ENABLED),
# "+evict" the evict-first hint on every config's weight rows (launchers.WEIGHT_EVICT_FIRST).
# Rows of removed variants stay readable: "+reglist" (fixed_cost_reglist_h200.json) the compact
# kernel's register list of 0d0a496, "+head" (fixed_cost_head_evict_h200.json) the list's first
# step computed in registers of ab44d69, "+wide" (fixed_cost_wide_word_h200.json) the wide fixed-point
# word for 64-255 programs along K of 59295b4
FINISH_KINDS = ("fixed", "counter")
SWITCHES = {"pdl": "PDL_ENABLED", "evict": "WEIGHT_EVICT_FIRST"}
AB_SWITCHES = {"pdl": "Programmatic dependent launch (`+pdl`: each call may start while the previous one finishes)",
               "reglist": "Compact kernel's channel list, scratch vs registers (`+reglist`, 0d0a496, not kept)",
               "head": "Compact kernel's first list step in registers (`+head`, ab44d69, not kept: no list round trip "
                       "before the first rows)",
               "evict": "Evict-first hint on the weight rows (`+evict`: x, lists and split-K words stay in L2)",
               "wide": "Wide fixed-point word (`+wide`, 59295b4, not kept: 64-255 programs along K finish with "
                       "one returning atomic instead of the counter)"}


def finish_name(value: str) -> str:
    """argparse type of --finishes: a split-K finish, then launcher switches, '+'-separated."""
    kind, *switches = value.split("+")
    if kind not in FINISH_KINDS or any(sw not in SWITCHES for sw in switches):
        raise argparse.ArgumentTypeError(f"{value!r}: expected one of {FINISH_KINDS}, then any of "
                                         f"{', '.join('+' + sw for sw in SWITCHES)}")
    return value


def default_finish() -> str:
    """The split-K finish (and switches) the launcher uses (launchers.FIXED_POINT_SPLIT_ENABLED,
    launchers.use_pdl, WEIGHT_EVICT_FIRST)."""
    finish = "fixed" if launchers.FIXED_POINT_SPLIT_ENABLED else "counter"
    on = {"pdl": launchers.use_pdl(torch.device(bk.DEVICE)), "evict": launchers.WEIGHT_EVICT_FIRST}
    return "+".join([finish] + [sw for sw in SWITCHES if on[sw]])


def set_finish(finish: str) -> None:
    kind, *switches = finish.split("+")
    launchers.FIXED_POINT_SPLIT_ENABLED = kind == "fixed"
    for sw, attr in SWITCHES.items():
        setattr(launchers, attr, sw in switches)


def split_finish_run(k: int, cfg: launchers.GemvConfig) -> str:
    """The split-K finish the launcher really runs for this config under the current switches:
    'none' (one program along K), 'fixed' (the fixed-point word) or 'counter'."""
    along_k = launchers.k_split(k, cfg)[1]
    if along_k == 1:
        return "none"
    return "fixed" if launchers.fixed_point_finish(along_k) else "counter"


def row_finish(row: dict) -> str:
    """Rows written before the fixed-point finish existed were all timed with the counter."""
    return row.get("finish", "counter")


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y on x."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


def teal_inputs(layers, sparsity: float, gen) -> tuple[list, float]:
    """One token's TEAL inputs per weight copy at `sparsity`, and the bytes one call reads;
    at 1.0 the threshold is above every score, so no channel (no weight row) is selected."""
    inputs = [bk.make_inputs(layer, bk.Case("teal", 1, min(sparsity, 0.999)), gen) for layer in layers]
    if sparsity < 1.0:
        return inputs, sum(nb for _, _, nb, _ in inputs) / len(inputs)  # weight rows + x + output
    for _, args, _, _ in inputs:
        args["threshold"] = torch.full((1,), float("inf"), device=bk.DEVICE)
    n, k = layers[0].n, layers[0].k
    return inputs, (n + k) * 2  # x and the output only


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--finishes", nargs="+", type=finish_name, default=[default_finish()],
                    help="split-K finishes to time at every point, alternating (launchers.FIXED_POINT_SPLIT_ENABLED)")
    ap.add_argument("--chunks", action="store_true",
                    help="instead: the compact kernel at the committed tile with K chunks 256..K (split-K depth), "
                         "s = 0.5 and 1.0, to see what the split-K tail costs")
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="instead: write the markdown tables of earlier runs' JSON files to --out: FIXED_JSON "
                         "CHUNKS_JSON [AB_JSON ... (runs of two --finishes, e.g. fixed counter or fixed fixed+pdl: A/B tables)]")
    ap.add_argument("--band-table", metavar="FIXED_JSON",
                    help="instead: write the installed sparse_gemv.json with each shape's measured band boundary "
                         "('high_from', from an earlier run's JSON) to --out")
    args = ap.parse_args()
    if args.band_table:
        return write_band_table(args.out, args.band_table)
    if args.report:
        if len(args.report) < 2:
            ap.error("--report takes FIXED_JSON CHUNKS_JSON [AB_JSON ...]")
        return write_report(args.out, *args.report)
    if args.chunks:
        return chunk_probe(args)
    gen = torch.Generator(device=bk.DEVICE).manual_seed(0)
    copy_gbs = None if bk.DRY_RUN else bk.copy_bandwidth_gbs()
    # one kernel's floor in a CUDA graph: a one-token cuBLAS GEMV of 64 x 64 (no bytes to speak of)
    tiny = [torch.randn(64, 64, device=bk.DEVICE, generator=gen).to(bk.DTYPE) for _ in range(4)]
    tiny_x = torch.randn(1, 64, device=bk.DEVICE, generator=gen).to(bk.DTYPE)
    floor_us = bk.graph_time_ms([(lambda w=w: F.linear(tiny_x, w)) for w in tiny]) * 1e3
    print(f"copy bandwidth {copy_gbs} GB/s; one tiny cuBLAS GEMV in a graph {floor_us:.2f} us", flush=True)
    rows, fits = [], []
    launcher_finish = default_finish()
    shapes = SHAPES[1:2] if bk.DRY_RUN else SHAPES
    for name, n, k in shapes:
        if bk.DRY_RUN:
            n, k = 1024, 512
        layers, _, dense_ms = bk.one_token_layers(n, k, gen)
        dense_us = dense_ms * 1e3
        dense_bytes = n * k * 2 + (n + k) * 2
        for band, band_s in BAND_SPARSITY.items():
            cfg = launchers.pick_config(n, k, 1, 0, torch.device(bk.DEVICE), band_s)
            points = {finish: [] for finish in args.finishes}
            for i_s, s in enumerate(SPARSITIES):
                inputs, nbytes = teal_inputs(layers, s, gen)
                # alternate which finish goes first, so drift does not favour one
                order = args.finishes if i_s % 2 == 0 else args.finishes[::-1]
                for finish in order:
                    set_finish(finish)
                    us = bk.graph_time_ms(bk.one_token_calls(inputs, cfg)) * 1e3
                    row = {"shape": name, "n": n, "k": k, "band": band, "finish": finish,
                           "finish_run": split_finish_run(k, cfg), "gemv_config": vars(cfg),
                           "sparsity": s, "bytes": nbytes, "sparse_us": us, "dense_us": dense_us,
                           "ratio": us / dense_us, "gbs": nbytes / (us * 1e-6) / 1e9}
                    rows.append(row)
                    if FIT_RANGE[0] <= s <= FIT_RANGE[1]:
                        points[finish].append((nbytes, us))
                    print(f"{name:18s} {band:12s} {finish:7s} s={s:<5} {us:7.2f} us  {us / dense_us:.3f}x dense "
                          f"({dense_us:.1f} us)  {row['gbs']:6.0f} GB/s", flush=True)
            set_finish(launcher_finish)
            for finish in args.finishes:
                fixed_us, us_per_byte = fit_line(points[finish])
                marginal_gbs = 1e-3 / us_per_byte if us_per_byte > 0 else None
                empty_us = next(r["sparse_us"] for r in rows if r["shape"] == name and r["band"] == band
                                and r["finish"] == finish and r["sparsity"] >= 1.0)
                fit = {"shape": name, "band": band, "finish": finish, "dense_us": dense_us,
                       "dense_gbs": dense_bytes / (dense_us * 1e-6) / 1e9,
                       "fit_fixed_us": fixed_us, "fit_marginal_gbs": marginal_gbs,
                       "fit_marginal_pct_copy": (100 * marginal_gbs / copy_gbs) if marginal_gbs and copy_gbs else None,
                       "empty_us": empty_us,
                       # what s = 0.5 would take with this fixed cost at the target bandwidth (80% of copy)
                       "s05_at_80pct_copy_us": (fixed_us + (0.5 * n * k * 2) / (0.8 * copy_gbs * 1e9) * 1e6) if copy_gbs else None}
                fits.append(fit)
                print(f"  fit {name} {band} {finish}: fixed {fixed_us:.2f} us, marginal "
                      f"{marginal_gbs and round(marginal_gbs)} GB/s, empty launch {empty_us:.2f} us", flush=True)
        del layers
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    Path(args.out).write_text(json.dumps({
        **bk.run_header("benchmarks/gpu/fixed_cost.py"), "copy_bandwidth_gbs": copy_gbs, "tiny_gemv_in_graph_us": floor_us,
        "fit_range": FIT_RANGE, "fits": fits, "rows": rows}, indent=1))


# a band's config counts as slower only beyond this relative margin (replay-to-replay noise)
BAND_TOLERANCE = 0.02


def band_boundaries(rows: list[dict], default: float) -> dict[str, float]:
    """Per shape key, the sparsity from which the 0.9-ranked config is not slower than the
    0.5-ranked one: above the highest measured point where it is slower by more than
    BAND_TOLERANCE, at the interpolated crossing of the two times (at most the next point).
    Only boundaries above `default` are returned (below it the default already picks the high
    band), and none for a shape whose two bands hold the same config. Points above FIT_RANGE
    (0.95, the empty launch at 1.0) do not count. Rows of one split-K finish:
    the launcher's where it was measured (else the one that was)."""
    by_shape: dict[tuple[int, int], dict[float, dict[str, dict]]] = {}
    measured = {row_finish(r) for r in rows}
    finish = default_finish() if default_finish() in measured or not measured else measured.pop()
    for r in rows:
        if row_finish(r) != finish:
            continue
        by_shape.setdefault((r["n"], r["k"]), {}).setdefault(r["sparsity"], {})[r["band"]] = r
    out = {}
    for (n, k), points in by_shape.items():
        # only the band's use (FIT_RANGE, up to 0.9): s = 1.0 is the empty launch (nothing
        # selected), which no calibrated module runs, and one slower point at 0.95 (Llama-2
        # gate_up, session 8: 4% there, 14% faster at 0.9) would otherwise switch the band off
        grid = sorted(s for s, bands in points.items()
                      if {"configs", "configs_high"} <= bands.keys() and s <= FIT_RANGE[1])
        if not grid or points[grid[0]]["configs"]["gemv_config"] == points[grid[0]]["configs_high"]["gemv_config"]:
            continue
        excess = [points[s]["configs_high"]["sparse_us"] / points[s]["configs"]["sparse_us"] - 1 for s in grid]
        slower = [i for i, e in enumerate(excess) if e > BAND_TOLERANCE]
        if not slower:
            continue
        i = slower[-1]
        if i == len(grid) - 1:
            boundary = 1.01  # the high band never wins: never use it
        else:
            e0, e1 = excess[i], excess[i + 1]
            boundary = grid[i] + (grid[i + 1] - grid[i]) * (e0 / (e0 - e1) if e1 < 0 else 1.0)
            boundary = math.ceil(boundary * 100 - 1e-9) / 100
        if boundary > default:
            out[launchers._shape_key(n, k)] = boundary
    return out


def write_band_table(out: str, fixed_path: str) -> None:
    fixed = json.loads(Path(fixed_path).read_text())
    table = json.loads(json.dumps(launchers._load_json(launchers._CONFIG_FILE)))
    rows = fixed["rows"]
    if len({row_finish(r) for r in rows}) > 1:
        # an A/B run: the boundaries of what the launcher runs now
        rows = [r for r in rows if row_finish(r) == default_finish()]
        if not rows:
            raise SystemExit(f"{fixed_path}: no rows timed with the launcher's finish {default_finish()!r}")
    table["high_from"] = band_boundaries(rows, launchers.HIGH_SPARSITY_FROM)
    table["high_from_note"] = (
        f"module sparsity from which a shape runs configs_high (default {launchers.HIGH_SPARSITY_FROM}): "
        f"both bands' one-token configs timed at s = 0..1 on {fixed['gpu']} at {fixed['commit'][:7]} "
        "(benchmarks/results/fixed_cost_h200.json), written by benchmarks/gpu/fixed_cost.py --band-table")
    Path(out).write_text(json.dumps(table, indent=1) + "\n")
    print("high_from:", table["high_from"])


def write_report(out: str, fixed_path: str, chunks_path: str, *ab_paths: str) -> None:
    fixed, chunks = json.loads(Path(fixed_path).read_text()), json.loads(Path(chunks_path).read_text())
    copy = fixed["copy_bandwidth_gbs"]
    at = {(r["shape"], r["band"], row_finish(r), r["sparsity"]): r for r in fixed["rows"]}
    lines = [
        f"# One-token sparse GEMV: fixed cost vs bytes ({fixed['gpu']})", "",
        f"`benchmarks/gpu/fixed_cost.py`, commit `{fixed['commit'][:7]}` (chunks: `{chunks['commit'][:7]}`), "
        f"versions {json.dumps(fixed['versions'])}. CUDA-graph timing over rotating weight copies (as the sweep), "
        f"bf16, TEAL threshold selection, the committed config of each band (`configs`: ranked at s = 0.5, used "
        f"below the shape's `high_from` boundary, default {launchers.HIGH_SPARSITY_FROM}; `configs_high`: ranked at "
        f"0.9). Copy bandwidth {copy:.0f} GB/s; "
        f"one tiny cuBLAS GEMV in a graph (the floor of any kernel) {fixed['tiny_gemv_in_graph_us']:.2f} us. "
        f"Fit: time = fixed + bytes / marginal bandwidth over s = {fixed['fit_range'][0]}-{fixed['fit_range'][1]}; "
        "'empty' = s = 1.0 (threshold above every score: launch, selection, split-K tail, no weight rows). "
        "Finish: the split-K finish (`fixed`: one fixed-point atomic per element; `counter`: f32 atomics, "
        "a per-tile arrival counter and the last program's reload; timed alternately at every point).", "",
        "| shape | band | config | finish | dense us (GB/s) | s=0.5 us (x dense, GB/s) | s=0.9 us (x dense) | empty us | fit fixed us | marginal GB/s (% copy) |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for f in fixed["fits"]:
        finish = row_finish(f)
        r5, r9 = at[(f["shape"], f["band"], finish, 0.5)], at[(f["shape"], f["band"], finish, 0.9)]
        c = r5["gemv_config"]
        per = (f"chunk{launchers.compact_chunk(r5['k'], c['split_k'])}" if c.get("kernel") == "compact"
               else f"split{c['split_k']}")
        marg = f"{f['fit_marginal_gbs']:.0f} ({f['fit_marginal_pct_copy']:.0f}%)" if f["fit_marginal_gbs"] else "-"
        along_k = launchers.k_split(r5["k"], launchers.GemvConfig.from_dict(c))[1]
        # the finish the launcher really took: recorded since session 10; in earlier runs the
        # counter beyond the fixed-point word's 63 arrivals
        kind, plus, switches = finish.partition("+")
        ran = r5.get("finish_run", "counter" if kind == "fixed" and along_k > launchers.FX_MAX_SPLIT else kind)
        if ran != kind:
            finish = f"{ran} ({along_k} along K){plus}{switches}"
        evict = " evict" if c.get("evict") else ""
        lines.append(f"| {f['shape']} | {f['band']} | {c.get('kernel', 'walk')} bn{c['block_n']} bk{c['block_k']} w{c['num_warps']} {per}{evict} | {finish} | "
                     f"{f['dense_us']:.1f} ({f['dense_gbs']:.0f}) | {r5['sparse_us']:.1f} ({r5['ratio']:.2f}x, {r5['gbs']:.0f}) | "
                     f"{r9['sparse_us']:.1f} ({r9['ratio']:.2f}x) | {f['empty_us']:.1f} | {f['fit_fixed_us']:.1f} | {marg} |")
    lines += ["", "Split-K depth of the compact kernel (committed tile of the 0.5 band, K chunk varied; a chunk is "
              f"at most {launchers.MAX_CHUNK} channels, so larger requests repeat the {launchers.MAX_CHUNK} row):", "",
              "| shape | K chunk | programs along K | finish | s=0.5 us | empty us |", "|---|---|---|---|---|---|"]
    by = {}
    for r in chunks["rows"]:
        k = next(f["k"] for f in fixed["rows"] if f["shape"] == r["shape"])
        chunk = launchers.compact_chunk(k, r["split_k"])
        by.setdefault((r["shape"], chunk, -(-k // chunk), row_finish(r)), {})[r["sparsity"]] = r["sparse_us"]
    for (shape, chunk, along_k, finish), t in by.items():
        lines.append(f"| {shape} | {chunk} | {along_k} | {finish if along_k > 1 else '-'} | {t[0.5]:.1f} | {t[1.0]:.1f} |")
    lines += target_budget_table(fixed)
    for ab_path in ab_paths:
        lines += finish_table(json.loads(Path(ab_path).read_text()), Path(ab_path).name)
    Path(out).write_text("\n".join(lines) + "\n")


# issue 4's one-token targets: time <= this share of dense at each sparsity, and at s = 0.5 also
# the bytes read at >= TARGET_SHARE_OF_COPY of the device copy bandwidth
TARGET_RATIO = {0.5: 0.58, 0.9: 0.2}
TARGET_SHARE_OF_COPY = 0.8
BANDWIDTH_TARGET_SPARSITY = 0.5


def target_budget(dense_us: float, nbytes: float, s: float, copy_gbs: float, floor_us: float) -> dict:
    """What issue 4's targets leave for the fixed cost at sparsity s. Both targets bound the total
    time: <= TARGET_RATIO[s] x dense, and (at s = 0.5) bytes / time >= TARGET_SHARE_OF_COPY x copy
    bandwidth, i.e. time <= the bytes at that bandwidth. With time = fixed + bytes / bandwidth and the bytes
    streaming at full copy speed (the best a kernel's marginal cost can be), the fixed cost may
    be at most the stricter bound less the bytes at copy speed."""
    ratio_us = TARGET_RATIO[s] * dense_us
    bytes_us = nbytes / (copy_gbs * 1e9) * 1e6
    bandwidth_us = bytes_us / TARGET_SHARE_OF_COPY if s == BANDWIDTH_TARGET_SPARSITY else None
    return {
        "ratio_target_us": ratio_us, "bandwidth_target_us": bandwidth_us,
        "fixed_allowed_us": min(ratio_us, bandwidth_us or ratio_us) - bytes_us,
        # a kernel with cuBLAS's floor reading the selected share of the bytes exactly as fast as
        # cuBLAS reads them all (the dense time less its floor, scaled): what sparsity alone buys
        "cublas_like_ratio": (floor_us + (1 - s) * (dense_us - floor_us)) / dense_us,
    }


def target_budget_table(fixed: dict) -> list[str]:
    """Markdown lines: per shape and target sparsity, the band in force (launchers.pick_config's
    choice), its measured time against both targets, and the fixed cost the targets leave."""
    copy, floor = fixed["copy_bandwidth_gbs"], fixed["tiny_gemv_in_graph_us"]
    empty = {(f["shape"], f["band"]): f["empty_us"] for f in fixed["fits"]}
    share = f"{TARGET_SHARE_OF_COPY:.0%}"
    lines = ["", "What issue 4's one-token targets leave for the fixed cost. Targets: time <= "
             f"{TARGET_RATIO[0.5]}x dense and the bytes read at >= {share} of copy bandwidth at s = 0.5 "
             f"(time <= 'bytes at {share}'), time <= {TARGET_RATIO[0.9]}x dense at 0.9; the band the launcher "
             "uses at that sparsity, default finish. 'fixed allowed' = the stricter time bound less the selected "
             "bytes at full copy bandwidth: the most fixed cost (launch, selection, list, split-K finish) with "
             f"which both targets can hold; one kernel's floor is {floor:.2f} us. 'empty' = this config's measured "
             "fixed cost (s = 1.0). 'cuBLAS-like' = a kernel with cuBLAS's floor reading the selected bytes as "
             "fast as cuBLAS reads all of them.", "",
             f"| shape | s | band | dense us (% copy) | ratio target us | bytes at {share} us | "
             "measured us (x dense, % copy) | fixed allowed us | empty us | cuBLAS-like x dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    default = default_finish()
    dense_gbs = {f["shape"]: f["dense_gbs"] for f in fixed["fits"]}
    for shape in dict.fromkeys(r["shape"] for r in fixed["rows"]):
        n, k = next((r["n"], r["k"]) for r in fixed["rows"] if r["shape"] == shape)
        for s in TARGET_RATIO:
            band = "configs" if s < launchers.high_sparsity_from(n, k) else "configs_high"
            row = next(r for r in fixed["rows"] if r["shape"] == shape and r["band"] == band
                       and r["sparsity"] == s and row_finish(r) == default)
            b = target_budget(row["dense_us"], row["bytes"], s, copy, floor)
            lines.append(f"| {shape} | {s} | {band} | {row['dense_us']:.1f} ({100 * dense_gbs[shape] / copy:.0f}%) | "
                         f"{b['ratio_target_us']:.1f} | "
                         + (f"{b['bandwidth_target_us']:.1f}" if b["bandwidth_target_us"] else "-") + " | "
                         f"{row['sparse_us']:.1f} ({row['ratio']:.2f}x, {100 * row['gbs'] / copy:.0f}%) | "
                         f"{b['fixed_allowed_us']:.1f} | {empty[(shape, band)]:.1f} | {b['cublas_like_ratio']:.2f} |")
    return lines


def ab_variants(run: dict) -> list[tuple[str, str]]:
    """(before, after) pairs of a run of several --finishes: counter -> fixed point, or a
    finish without switches -> each variant with launcher switches (AB_SWITCHES: "fixed" ->
    "fixed+pdl", "fixed" -> "fixed+head", ...)."""
    found = list(dict.fromkeys(row_finish(r) for r in run["rows"]))
    if len(found) < 2:
        raise SystemExit(f"{run['command']}: an A/B table needs a run of two or more --finishes, found {found}")
    if set(found) == {"counter", "fixed"}:
        return [("counter", "fixed")]
    base = [v for v in found if "+" not in v]
    if len(base) != 1:
        raise SystemExit(f"{run['command']}: an A/B run needs one finish without switches, found {found}")
    return [(base[0], v) for v in found if v != base[0]]


def finish_table(run: dict, name: str) -> list[str]:
    """Markdown lines: one table per variant of a --finishes run against its base (ab_variants:
    the split-K finishes, or a finish without and with launcher switches), per shape and band."""
    return [line for before, after in ab_variants(run) for line in _variant_table(run, name, before, after)]


def _variant_table(run: dict, name: str, before: str, after: str) -> list[str]:
    at = {(r["shape"], r["band"], row_finish(r), r["sparsity"]): r["sparse_us"] for r in run["rows"]}
    what = ("Split-K finish" if {before, after} == {"counter", "fixed"}
            else "; ".join(AB_SWITCHES[sw] for sw in after.split("+")[1:]))
    lines = ["", f"{what}, the same configs timed alternately with each (`{name}`, "
             f"commit `{run['commit'][:7]}`): us, {before} -> {after} (change).", "",
             "| shape | band | config | s=0.5 | s=0.7 | s=0.9 | empty |", "|---|---|---|---|---|---|---|"]
    for shape, band in dict.fromkeys((r["shape"], r["band"]) for r in run["rows"]):
        cfg = next(r["gemv_config"] for r in run["rows"] if r["shape"] == shape and r["band"] == band)
        cells = []
        for s in (0.5, 0.7, 0.9, 1.0):
            t0, t1 = at[(shape, band, before, s)], at[(shape, band, after, s)]
            cells.append(f"{t0:.1f} -> {t1:.1f} ({100 * (t1 / t0 - 1):+.0f}%)")
        lines.append(f"| {shape} | {band} | {cfg.get('kernel', 'walk')} | " + " | ".join(cells) + " |")
    return lines


def chunk_probe(args) -> None:
    gen = torch.Generator(device=bk.DEVICE).manual_seed(0)
    launcher_finish = default_finish()
    rows = []
    for name, n, k in (SHAPES[1:2] if bk.DRY_RUN else [SHAPES[1], SHAPES[5], SHAPES[6]]):
        if bk.DRY_RUN:
            n, k = 1024, 512
        layers, _, _ = bk.one_token_layers(n, k, gen)
        base = launchers.pick_config(n, k, 1, 0, torch.device(bk.DEVICE), 0.5)
        for s in (0.5, 1.0):
            inputs, _ = teal_inputs(layers, s, gen)
            for chunk in (256, 512, 1024, 2048, 4096, 8192, 16384):
                if chunk > k * 2 or chunk < base.block_k:
                    continue
                cfg = bk.one_row_config("compact", base.block_n, base.block_k, base.num_warps, chunk, k)
                along_k = launchers.k_split(k, cfg)[1]
                # one program along K has no split-K finish: timed once
                for i, finish in enumerate(args.finishes if along_k > 1 else args.finishes[:1]):
                    set_finish(finish)
                    us = bk.graph_time_ms(bk.one_token_calls(inputs, cfg)) * 1e3
                    rows.append({"shape": name, "sparsity": s, "chunk": chunk, "split_k": cfg.split_k, "finish": finish,
                                 "gemv_config": vars(cfg), "sparse_us": us})
                    print(f"{name:18s} s={s} chunk {chunk:5d} split_k {cfg.split_k:3d} bn{cfg.block_n} {finish:7s} "
                          f"{us:7.2f} us", flush=True)
                set_finish(launcher_finish)
        del layers
    Path(args.out).write_text(json.dumps({**bk.run_header("benchmarks/gpu/fixed_cost.py"), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
