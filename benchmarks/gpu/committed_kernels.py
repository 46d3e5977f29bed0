"""Issue 4's microbenchmark, run on what is committed: every method through the launcher with the
committed tables, the results in the issue's format.

The tuning scripts (bench_kernels.py --graph-sweep, wide_tiles.py, fixed_cost.py, union_rows.py) each
time a slice: one method, one token count, candidate configs. This one times the product as it stands,
the way the LinearMethod calls it: launchers.sparse_linear with the module's sparsity (which picks the
config band, launchers.pick_config), the committed config of that band and token count (per-row or
union, as the table says), and for R-Sparse's low-rank term the committed low-rank layout and epilogue.
use_crossover=False, so the kernels run even where the op would send the call to dense; each row says
which of the two the op does there ('op', from the committed dispatch table at the module's sparsity).

Per distinct Llama-2-7B / Llama-3-8B projection shape (Llama-3's o_proj is Llama-2's), tokens
1 / 2 / 4 / 8 / 16, sparsity 0 / 0.3 / 0.5 / 0.7 / 0.9, methods:
  teal             threshold on |x|                                  (1 launch)
  rsparse          threshold on |x| * column norm, no low-rank term  (1 launch)
  rsparse_lowrank  the same + rank-64 term U V ((1 - m) x)           (2 launches: the epilogue)
  larosa           exact top-k per token (select kernel + GEMV); LaRoSA's threshold variant runs
                   the teal kernel on the rotated weights, so it is the teal row
Dense = cuBLAS F.linear on vLLM's [N, K] layout, same dtype (bf16). Timing as the sweeps
(bench_kernels.graph_time_ms: one CUDA graph over >= 160 MB of weight copies, so no call finds its
weights in L2; no CPU launch cost, as in vLLM's decode graphs). x random, the tokens independent
(the least a union of their selections can save).

    RSPARSE_COMMIT=<sha> python3 -P benchmarks/gpu/committed_kernels.py --out $RES/kernels_committed_h200.json
    python benchmarks/gpu/committed_kernels.py --report benchmarks/results/kernels_committed_h200.json \
        --out benchmarks/results/kernels_committed_h200.md        # + one PNG per shape next to it
    RSPARSE_BENCH_DRY=1 TRITON_INTERPRET=1 python benchmarks/gpu/committed_kernels.py --out /tmp/k.json  # CPU check
    python benchmarks/gpu/committed_kernels.py --merge-topk RUN.json --out kernels/configs/dispatch.json
        # exact top-k's dispatch entries from a run's larosa rows (--methods larosa)
    python benchmarks/gpu/committed_kernels.py --merge-topk A.json B.json:llama2-7b/down,llama3-8b/down --out ...
        # the down shapes from run B (e.g. another select), every other shape from run A
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

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("fixed_cost", _HERE / "fixed_cost.py")
fixed_cost = importlib.util.module_from_spec(_spec)
sys.modules["fixed_cost"] = fixed_cost
_spec.loader.exec_module(fixed_cost)
bk = fixed_cost.bk  # benchmarks/bench_kernels.py: layers, inputs, graph timing

METHODS = ["teal", "rsparse", "rsparse_lowrank", "larosa"]
SELECTION = {"teal": "threshold", "rsparse": "threshold", "rsparse_lowrank": "threshold", "larosa": "topk"}
TOKENS = bk.TOKENS
SPARSITIES = bk.SPARSITIES
TARGET_RATIO = fixed_cost.TARGET_RATIO  # {0.5: 0.58, 0.9: 0.2}
TARGET_SHARE_OF_COPY = fixed_cost.TARGET_SHARE_OF_COPY


def op_choice(n: int, k: int, method: str, tokens: int, sparsity: float) -> str:
    """What torch.ops.rsparse.sparse_linear does with this call: the kernels up to the committed
    crossover at the module's sparsity, dense above it (launchers.sparse_linear)."""
    if method == "larosa":
        keep = round((1 - sparsity) * k)
        sparsity = 1.0 - keep / k
    limit = launchers.crossover_tokens(n, k, SELECTION[method], sparsity, lowrank=method == "rsparse_lowrank")
    return "sparse" if limit is None or tokens <= limit else "dense"


def measure_shape(name: str, n: int, k: int, gen: torch.Generator, log, methods=tuple(METHODS),
                  tokens_list=tuple(TOKENS), ab_lowrank_chunks: bool = False) -> list[dict]:
    dev = torch.device(bk.DEVICE)
    copies = 1 if bk.DRY_RUN else max(3, math.ceil(bk.L2_ROTATION_BYTES / (n * k * 2)))
    layers = [bk.Layer(n, k, gen) for _ in range(copies)]
    rows = []
    for tokens in tokens_list[:2] if bk.DRY_RUN else tokens_list:
        xs = [torch.randn(tokens, k, device=dev, generator=gen).to(bk.DTYPE) for _ in layers]
        dense_ms = bk.graph_time_ms([(lambda l=l, x=x: F.linear(x, l.w_dense)) for l, x in zip(layers, xs)])
        for method in methods:
            for s in SPARSITIES:
                inputs = [bk.make_inputs(layer, bk.Case(method, tokens, s), gen) for layer in layers]
                calls = [lambda x=xs_[0], a=args: launchers.sparse_linear(x, **a, use_crossover=False, sparsity=s)
                         for xs_, args, _, _ in inputs]
                ms = bk.graph_time_ms(calls)
                extra = {}
                if ab_lowrank_chunks and method == "rsparse_lowrank" and s > 0.5:
                    # the same calls with the v_t chunks of the design sparsity, in the same process
                    launchers.LOWRANK_CHUNKS_FOLLOW_SPARSITY = False
                    try:
                        extra["design_chunks_ms"] = bk.graph_time_ms(calls)
                    finally:
                        launchers.LOWRANK_CHUNKS_FOLLOW_SPARSITY = True
                nbytes = sum(nb for _, _, nb, _ in inputs) / len(inputs)
                rank = bk.LOWRANK_RANK if method == "rsparse_lowrank" else 0
                # the band a top-k call uses is its own sparsity (1 - keep / K), as in sparse_linear
                band_s = 1.0 - round((1 - s) * k) / k if method == "larosa" else s
                row = {"shape": name, "n": n, "k": k, "method": method, "tokens": tokens, "sparsity": s,
                       "dense_ms": dense_ms, "sparse_ms": ms, "gbs": nbytes / ms / 1e6, "ratio": ms / dense_ms,
                       "ideal_ms": dense_ms * (1 - s), "bytes_read": nbytes,
                       "union_density": sum(u for *_, u in inputs) / len(inputs),
                       "config": launchers.describe_config(n, k, tokens, rank, bk.DEVICE, band_s),
                       "op": op_choice(n, k, method, tokens, s), **extra}
                rows.append(row)
            log(f"{name:18s} M={tokens:2d} {method:16s} dense {dense_ms * 1e3:6.1f} us  " + "  ".join(
                f"s={r['sparsity']:g} {r['ratio']:.2f}x" for r in rows[-len(SPARSITIES):]))
    for layer in layers:
        layer.free()
    del layers
    if not bk.DRY_RUN:
        torch.cuda.empty_cache()
    return rows


def _cell(r: dict) -> str:
    return f"{r['ratio']:.2f}x" + ("" if r["op"] == "sparse" else "<sup>d</sup>")


def report(data: dict) -> str:
    rows, copy = data["results"], data["copy_bandwidth_gbs"]
    by = {(r["shape"], r["method"], r["tokens"], r["sparsity"]): r for r in rows}
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    tokens = sorted({r["tokens"] for r in rows})
    levels = sorted({r["sparsity"] for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    share = f"{TARGET_SHARE_OF_COPY:.0%}"
    lines = [
        f"# Decode kernels as committed: every method against cuBLAS ({data['gpu']})", "",
        f"`benchmarks/gpu/committed_kernels.py`, commit `{data['commit']}`, versions {json.dumps(data['versions'])}, "
        f"copy bandwidth {copy:.0f} GB/s (read + write). Command: `{data['command']}`.", "",
        "Each call goes through `launchers.sparse_linear` with the module's sparsity, as the LinearMethod makes it: "
        "the committed config of that sparsity's band and token count (per-row or union programs, as the table "
        "says), R-Sparse's term with the committed low-rank layout and epilogue launch. CUDA-graph timing over "
        "rotating weight copies (no call finds its weights in L2, no CPU launch cost); bf16; random x, tokens "
        "independent. ratio = sparse / dense (cuBLAS F.linear, vLLM's [N, K] layout); GB/s = the bytes the "
        "sparse call reads (weight rows some token selected, low-rank factors, x, output) / its time. "
        "<sup>d</sup> = above the committed crossover at that sparsity: the op runs dense there (the kernels "
        "were timed anyway). Llama-3-8B's o_proj is Llama-2-7B's shape.",
        "", f"## Issue 4's one-token targets (teal): <= {TARGET_RATIO[0.5]}x dense and >= {share} of copy bandwidth "
        f"at s = 0.5, <= {TARGET_RATIO[0.9]}x at 0.9", "",
        "| shape | dense us | s=0.5 | GB/s @0.5 (% copy) | s=0.9 | met |", "|---|---|---|---|---|---|"]
    for shape in shapes:
        half, high = by.get((shape, "teal", 1, 0.5)), by.get((shape, "teal", 1, 0.9))
        if not half or not high:
            continue
        met = [f"0.5 ratio {'yes' if half['ratio'] <= TARGET_RATIO[0.5] else 'no'}",
               f"0.5 bandwidth {'yes' if half['gbs'] >= TARGET_SHARE_OF_COPY * copy else 'no'}",
               f"0.9 {'yes' if high['ratio'] <= TARGET_RATIO[0.9] else 'no'}"]
        lines.append(f"| {shape} | {half['dense_ms'] * 1e3:.1f} | {half['ratio']:.2f}x | {half['gbs']:.0f} "
                     f"({100 * half['gbs'] / copy:.0f}%) | {high['ratio']:.2f}x | {', '.join(met)} |")
    lines += ["", "## One token, every method (ratio to dense)", "",
              "| shape | method | " + " | ".join(f"s={s:g}" for s in levels) + " | GB/s @0.5 | config @0.5 |",
              "|---|---|" + "---|" * (len(levels) + 2)]
    for shape in shapes:
        for method in methods:
            one = [by.get((shape, method, 1, s)) for s in levels]
            if not any(one):
                continue
            half = by.get((shape, method, 1, 0.5))
            cfg = launchers.GemvConfig.from_dict(half["config"]) if half else None
            label = (f"{cfg.kernel} bn{cfg.block_n} bk{cfg.block_k} split{cfg.split_k} w{cfg.num_warps}"
                     + (" evict" if cfg.evict else "")) if cfg else ""
            lines.append(f"| {shape} | {method} | " + " | ".join(_cell(r) if r else "" for r in one)
                         + (f" | {half['gbs']:.0f} | {label} |" if half else " | | |"))
    ab = [r for r in rows if "design_chunks_ms" in r]
    if ab:
        lines += ["", "## R-Sparse's v_t chunks at the module's sparsity (launchers.dropped_per_kept) against the "
                  "design sparsity's, timed in the same process (ratio to dense, us in brackets)", "",
                  "| shape | tokens | s | design chunks | chunks at s | change |", "|---|---|---|---|---|---|"]
        for r in ab:
            before, after = r["design_chunks_ms"], r["sparse_ms"]
            lines.append(f"| {r['shape']} | {r['tokens']} | {r['sparsity']:g} | {before / r['dense_ms']:.2f}x "
                         f"({before * 1e3:.1f}) | {r['ratio']:.2f}x ({after * 1e3:.1f}) | {after / before - 1:+.0%} |")
    for method in methods:
        lines += ["", f"## {method} by token count (ratio to dense; programs per the committed table)", "",
                  "| shape | s | " + " | ".join(f"M={t}" for t in tokens) + " |", "|---|---|" + "---|" * len(tokens)]
        for shape in shapes:
            for s in levels:
                cells = [by.get((shape, method, t, s)) for t in tokens]
                if any(cells):
                    lines.append(f"| {shape} | {s:g} | " + " | ".join(
                        (_cell(r) + (" u" if r["config"]["rows"] > 1 else "")) if r else "" for r in cells) + " |")
        if method == "teal":
            lines += ["", "(u = union programs: all tokens in one program; otherwise one program per token.)"]
    lines += ["", "## Measured crossover (largest token count up to which every smaller count ran at or below "
              f"{launchers.DISPATCH_MAX_RATIO:g}x dense, teal) against the committed dispatch at that sparsity", "",
              "| shape | " + " | ".join(f"s={s:g}" for s in levels) + " |", "|---|" + "---|" * len(levels)]
    for shape in shapes:
        cells = []
        for s in levels:
            limit = 0
            for t in tokens:
                r = by.get((shape, "teal", t, s))
                if r is None or r["ratio"] > launchers.DISPATCH_MAX_RATIO:
                    break
                limit = t
            table = max([t for t in tokens if by.get((shape, "teal", t, s), {}).get("op") == "sparse"], default=0)
            cells.append(f"{limit} (table {table})")
        lines.append(f"| {shape} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(data: dict, prefix: str) -> list[str]:
    """One PNG per shape: time against sparsity at 1 / 4 / 16 tokens, every method, dense and the
    ideal dense * (1 - s) line."""
    paths = []
    for shape in dict.fromkeys(r["shape"] for r in data["results"]):
        paths.append(f"{prefix}_{shape.replace('/', '_')}.png")
        bk.plot_shape(paths[-1], shape, data["results"], METHODS)
    return paths


def combine_runs(records: list[dict], shapes_per_run: list[list[str]] | None = None) -> dict:
    """One record of several runs' larosa rows on one GPU: a later run's rows of a shape replace the
    earlier runs' rows of that shape (shapes_per_run[i]: the shapes run i contributes; empty or None:
    all it has). The commit, command and hist_select of every contributing run are kept."""
    if len({r["gpu"] for r in records}) != 1:
        raise SystemExit(f"committed_kernels.py --merge-topk: runs from different GPUs: {[r['gpu'] for r in records]}")
    by_shape: dict[str, tuple[int, list[dict]]] = {}
    for i, record in enumerate(records):
        wanted = set(shapes_per_run[i]) if shapes_per_run and shapes_per_run[i] else None
        rows = [r for r in record["results"] if r["method"] == "larosa" and (wanted is None or r["shape"] in wanted)]
        for shape in dict.fromkeys(r["shape"] for r in rows):
            by_shape[shape] = (i, [r for r in rows if r["shape"] == shape])
    used = sorted({i for i, _ in by_shape.values()})
    first = records[used[0]] if used else records[0]
    sources = [f"{records[i]['commit']} [{', '.join(s for s, (j, _) in by_shape.items() if j == i)}]"
               + (f" hist_select {records[i]['hist_select']}" if records[i].get("hist_select") else "") for i in used]
    return {**first, "commit": "; ".join(sources), "command": " ; ".join(str(records[i]["command"]) for i in used),
            "results": [r for _, rows in by_shape.values() for r in rows]}


def merge_topk(record: dict, dispatch: dict) -> dict:
    """The dispatch table with exact top-k's (LaRoSA's) crossover counts and ratios replaced by those of
    a run's larosa rows, the sparsities and token counts it measured (the topk select changed in
    session 27; the committed topk entries were measured with the earlier select at one token)."""
    rows = [r for r in record["results"] if r["method"] == "larosa"]
    if not rows:
        raise SystemExit("committed_kernels.py --merge-topk: the run has no larosa rows (--methods larosa)")
    out = json.loads(json.dumps(dispatch))
    note = (f"topk from benchmarks/gpu/committed_kernels.py --methods larosa at {record['commit']} "
            f"({record['gpu']}): tokens {sorted({r['tokens'] for r in rows})}, sparsities "
            f"{sorted({r['sparsity'] for r in rows})}")
    crossover, ratios = bk.crossover_table(rows)["topk"], bk.ratio_table(rows)["topk"]
    entry = launchers.entry_for_gpu(out, record["gpu"])
    if entry is not out:
        # another GPU's measurement: beside the table, read on that GPU only (launchers.dispatch_table)
        entry.setdefault("crossover", {})["topk"] = crossover
        entry.setdefault("ratios", {})["topk"] = ratios
    else:
        out["crossover"]["topk"], out["ratios"]["topk"] = crossover, ratios
    launchers.put_note(out, entry, "topk", note)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the result JSON (with --report: the markdown)")
    ap.add_argument("--shapes", nargs="*", default=[], help="names of bench_kernels.distinct_shapes() (default: all)")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    ap.add_argument("--ab-lowrank-chunks", action="store_true",
                    help="rsparse_lowrank above s = 0.5 also with launchers.LOWRANK_CHUNKS_FOLLOW_SPARSITY off")
    ap.add_argument("--hist-select", nargs=2, type=int, metavar=("DIGIT_BITS", "WARPS"), default=None,
                    help="exact top-k's histogram select with these digits and warps at every row width "
                         "(launchers.HIST_DIGIT_BITS / HIST_WARPS; default: the launcher's choice)")
    ap.add_argument("--report", default="", help="no run: the markdown and PNGs of a run's JSON")
    ap.add_argument("--merge-topk", nargs="+", default=[], metavar="JSON[:SHAPE,...]",
                    help="no run: --out = the installed dispatch.json with the topk entries of these runs' larosa "
                         "rows (one GPU; a later run's rows of a shape replace an earlier one's; JSON:SHAPE,... "
                         "takes only those shapes from that run)")
    args = ap.parse_args()
    if args.merge_topk:
        paths, shapes = zip(*((spec.partition(":")[0], [s for s in spec.partition(":")[2].split(",") if s])
                              for spec in args.merge_topk))
        record = combine_runs([json.loads(Path(p).read_text()) for p in paths], list(shapes))
        merged = merge_topk(record, launchers._load_json(launchers._DISPATCH_FILE))
        Path(args.out).write_text(json.dumps(merged, indent=1) + "\n")
        return
    if args.report:
        data = json.loads(Path(args.report).read_text())
        Path(args.out).write_text(report(data))
        try:
            plot(data, str(Path(args.out).with_suffix("")))
        except ImportError:  # the table is the result; the plots are the optional [bench] extra
            print("matplotlib is not installed (pip install -e '.[bench]'): the markdown only, no PNGs")
        return
    if args.hist_select:
        bits, warps = args.hist_select
        if bits not in launchers.HIST_DIGIT_BITS_CHOICES or warps not in launchers.HIST_WARPS_CHOICES:
            ap.error(f"--hist-select: digits in {launchers.HIST_DIGIT_BITS_CHOICES}, warps in "
                     f"{launchers.HIST_WARPS_CHOICES}; got {bits} {warps}")
        launchers.HIST_DIGIT_BITS, launchers.HIST_WARPS = bits, warps
    gen = torch.Generator(device=bk.DEVICE).manual_seed(0)
    shapes = [s for s in bk.distinct_shapes() if not args.shapes or s[0] in args.shapes]
    if bk.DRY_RUN:
        shapes = [("tiny/o", 256, 320)]

    def log(msg):
        print(msg, flush=True)

    meta = {**bk.run_header("benchmarks/gpu/committed_kernels.py"),
            "timing": "cuda_graph", "dtype": "bf16", "lowrank_rank": bk.LOWRANK_RANK,
            "hist_select": {"digit_bits": launchers.HIST_DIGIT_BITS, "warps": launchers.HIST_WARPS},
            "copy_bandwidth_gbs": bk.copy_bandwidth_gbs(), "results": []}
    for name, n, k in shapes:
        meta["results"] += measure_shape(name, n, k, gen, log, args.methods, args.tokens, args.ab_lowrank_chunks)
        # what is measured so far survives a time limit
        Path(args.out).write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
