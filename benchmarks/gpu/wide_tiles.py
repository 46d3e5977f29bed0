"""Probe (issue 4): do wider output tiles read the selected rows faster?

Every config of the committed sweep (bench_kernels SWEEP_TILES / WALK_TILES) reads at most 256
outputs (512 bytes) of each selected weight row per program; a row of w_t is N * 2 = 8-56 KB
contiguous. Wider tiles (512-2048 outputs, fewer rows per K step, so the register tile stays the
same size) read 1-4 KB contiguous segments of each row, at the same bytes in flight per step.
Hypothesis: the 512 B segments cost DRAM efficiency at s = 0.5 (the kernels reach 54-66% of copy
bandwidth on the bytes they read, dense cuBLAS ~87% on all of them); if so a wide tile is
measurably faster. Timed like the sweep (bench_kernels.graph_time_ms: CUDA graphs over >= 160 MB
of weight copies), 1 token, s = 0.5 and 0.9, against the committed config and dense cuBLAS.

With `--set split_depth` (session 7) the same comparison re-ranks the compact kernel's split-K
depth after the fixed-point split-K finish (launchers.FIXED_POINT_SPLIT_ENABLED) made a program
along K cheaper: narrow and wide tiles at K chunks of 256-4096 (4096 = no split for K = 4096).

    python3 -P benchmarks/gpu/wide_tiles.py --out $OUT/wide_tiles_h200.json
    python3 -P benchmarks/gpu/wide_tiles.py --set split_depth --adopt $OUT/sparse_gemv.json --out $OUT/split_depth_h200.json
    python3 -P benchmarks/gpu/wide_tiles.py --set warps --adopt $OUT/sparse_gemv.json --out $OUT/warps_h200.json
    python3 -P benchmarks/gpu/wide_tiles.py --set short_chunks --adopt $OUT/sparse_gemv.json --out $OUT/short_chunks_h200.json
    python3 -P benchmarks/gpu/wide_tiles.py --set spill_free --adopt $OUT/sparse_gemv.json --out $OUT/spill_free_h200.json
    python3 -P benchmarks/gpu/wide_tiles.py --set pipelined --adopt $OUT/sparse_gemv.json --out $OUT/pipelined_h200.json
    python3 -P benchmarks/gpu/wide_tiles.py --set split_depth spill_free --shapes llama3-8b/down \
        --sparsities 0.5 --adopt $OUT/sparse_gemv.json --out $OUT/down_configs_h100.json
        # on a GPU other than the table's own, the winners go under "by_gpu" (launchers.config_table)
    python benchmarks/gpu/wide_tiles.py --out pipelined_h200.json --report pipelined_h200.md   # its table (no GPU)
    RSPARSE_BENCH_DRY=1 python benchmarks/gpu/wide_tiles.py --out /tmp/w.json   # CPU: script check only
"""

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import torch

from vllm_rsparse import launchers

_spec = importlib.util.spec_from_file_location(
    "bench_kernels", Path(__file__).resolve().parent.parent / "bench_kernels.py")
bk = importlib.util.module_from_spec(_spec)
sys.modules["bench_kernels"] = bk  # its dataclasses look their module up
_spec.loader.exec_module(bk)

SHAPES = [("llama2-7b/qkv", 12288, 4096), ("llama2-7b/o", 4096, 4096), ("llama2-7b/gate_up", 22016, 4096),
          ("llama2-7b/down", 4096, 11008), ("llama3-8b/qkv", 6144, 4096), ("llama3-8b/gate_up", 28672, 4096),
          ("llama3-8b/down", 4096, 14336)]
# --adopt: a wide config replaces the committed one-token config of its band (0.5 -> "configs",
# 0.9 -> "configs_high") only if it is this much faster and agrees with it to bf16 rounding
ADOPT_MAX_RATIO = 0.97
ADOPT_MAX_ERR = 1e-2
# (kernel, block_n, block_k, num_warps, K chunk (compact) or K steps per program (walk))
WIDE = [("compact", 512, 16, 4, 512), ("compact", 512, 16, 4, 1024), ("compact", 1024, 8, 4, 512),
        ("compact", 1024, 8, 4, 1024), ("compact", 1024, 16, 8, 1024), ("compact", 2048, 8, 8, 1024),
        ("walk", 512, 16, 4, 16), ("walk", 1024, 8, 4, 32), ("walk", 1024, 16, 8, 16)]
# compact tiles x K chunks: the split-K depth, re-ranked with the fixed-point finish
SPLIT_DEPTH = [("compact", bn, bkk, 4, chunk)
               for bn, bkk in [(128, 64), (256, 32), (512, 16), (1024, 8)]
               for chunk in (256, 512, 1024, 2048, 4096)]
# threads per program (session 8): the same register tile over 2 or 8 warps, and tiles of twice
# the rows per step over 8 warps (more weight bytes in flight per program)
WARPS = [("compact", bn, bkk, w, chunk)
         for bn, bkk, w in [(128, 64, 2), (128, 64, 8), (256, 32, 2), (256, 32, 8), (512, 16, 2), (512, 16, 8),
                            (1024, 8, 8), (128, 128, 8), (256, 64, 8), (512, 32, 8), (1024, 16, 8)]
         for chunk in (256, 512, 1024)]
# short K chunks on wide tiles (session 9): o_proj and Llama-3 qkv stream their selected bytes
# at 50-70% of copy bandwidth with 64-256 B row segments or 8 list steps per program; wide
# segments with 2-4 list steps per program were not in the split-depth set (chunks >= 256).
# Each with and without the evict-first hint on the weight rows (GemvConfig.evict; the
# committed config with the hint is a candidate of this set too).
SHORT_CHUNKS = [("compact", bn, bkk, w, chunk, evict)
                for bn, bkk in [(256, 32), (512, 16), (1024, 8)] for w in (2, 4) for chunk in (64, 128)
                for evict in (False, True)]
# shorter still (session 9, after short_chunks adopted bn1024 bk8 chunk64 for Llama-3 qkv, 0.82x ->
# 0.70x dense): 1-4 list steps per program on 1-4 KB row segments, 4 or 8 warps
TINY_CHUNKS = [("compact", bn, bkk, w, chunk, evict)
               for bn, bkk in [(512, 16), (1024, 8), (2048, 4)] for w in (4, 8) for chunk in (16, 32, 64)
               for evict in (False, True)]
# register tiles that fit at 2 warps (session 14): the committed Llama-3 down config (512 x 16 over 2
# warps, 128 f32 accumulators a thread) builds to 255 registers and spills 14-30 on the H200
# (lowrank_epilogue_claim_h200.md, kernel_resources); half the tile (4096 elements, 64 a thread)
# does not spill. Every 2-warp tile of the earlier sets had 8192 elements.
SPILL_FREE = [("compact", bn, bkk, 2, chunk, evict)
              for bn, bkk in [(256, 16), (512, 8), (1024, 4)] for chunk in (128, 256, 512)
              for evict in (False, True)]
# the list steps through Triton's cp.async pipeline (session 27; launchers.compact_stages): the
# committed loops are pipelined by hand, one step ahead in registers, which caps the bytes in
# flight per program at two steps' tiles; with n stages n - 1 steps are in flight in shared memory,
# so fewer, longer programs (less split-K finish) might keep the same bytes in flight
PIPELINED = [("compact", bn, bkk, w, chunk, False, stages)
             for bn, bkk, w in [(512, 16, 4), (1024, 8, 4), (2048, 4, 4), (2048, 8, 8)]
             for chunk in (32, 64, 128, 256, 512) for stages in (2, 4)]
CANDIDATE_SETS = {"wide": WIDE, "split_depth": SPLIT_DEPTH, "warps": WARPS, "short_chunks": SHORT_CHUNKS,
                  "tiny_chunks": TINY_CHUNKS, "spill_free": SPILL_FREE, "pipelined": PIPELINED}


def candidate(spec: tuple, k: int) -> tuple[str, launchers.GemvConfig]:
    """(label, config) of a candidate (kernel, block_n, block_k, num_warps, per[, evict[, stages]]);
    stages: the compact loop's pipeline (launchers.compact_stages), 1 = by hand."""
    kern, bn, bkk, w, per, *rest = spec
    evict = bool(rest and rest[0])
    cfg = dataclasses.replace(bk.one_row_config(kern, bn, bkk, w, per, k), evict=evict)
    label = f"{kern} bn{bn} bk{bkk} w{w} {'chunk' if kern == 'compact' else 'steps'}{per}"
    if len(rest) > 1 and rest[1] > 1:
        cfg = dataclasses.replace(cfg, num_stages=rest[1])
        label += f" st{rest[1]}"
    return (label + " evict" if evict else label), cfg


def programs(cfg: launchers.GemvConfig, n: int, k: int) -> int:
    """Programs of a one-token launch: output tiles x programs along K."""
    return launchers.triton_cdiv(n, cfg.block_n) * launchers.k_split(k, cfg)[1]


def adopt(rows: list[dict], path: str, candidate_set: str = "wide", gpu: str | None = None) -> None:
    """The installed config table with each shape's one-token config replaced by the fastest
    wide config of its band where that wins by ADOPT_MAX_RATIO (rows: this run's timings).
    gpu: the device the rows were timed on; a device other than the table's own ("gpu") gets its
    configs under "by_gpu" (launchers.config_table), and the committed config they race is the one
    that device reads, so the table's own entries stay those of the GPU that swept them."""
    table = json.loads(json.dumps(launchers._load_json(launchers._CONFIG_FILE)))
    target = launchers.entry_for_gpu(table, gpu)
    read_as = launchers.config_table(gpu) if gpu is not None else table
    bands = {0.5: "configs", 0.9: "configs_high"}
    adopted = []
    for row in rows:
        if row.get("config") != "committed" or row["sparsity"] not in bands:
            continue
        rivals = [r for r in rows if r.get("shape") == row["shape"] and r.get("sparsity") == row["sparsity"]
                  and r.get("config") != "committed" and "ratio" in r and r["max_rel_err_vs_committed"] < ADOPT_MAX_ERR]
        best = min(rivals, key=lambda r: r["sparse_us"], default=None)
        if best and best["sparse_us"] < ADOPT_MAX_RATIO * row["sparse_us"]:
            band = bands[row["sparsity"]]
            key = launchers._shape_key(row["n"], row["k"])
            adopted_config = dict(best["gemv_config"])
            replaced = read_as.get(band, {}).get(key, {}).get("1", {})
            if replaced.get("lowrank") and not adopted_config.get("lowrank"):
                # the R-Sparse v_t layout was chosen for this shape by lowrank_time.py, not by this
                # sweep: kept (re-time it with lowrank_time.py when a new config is adopted)
                adopted_config["lowrank"] = replaced["lowrank"]
            target.setdefault(band, {}).setdefault(key, {})["1"] = adopted_config
            adopted.append(f"{band}/{key}: {best['config']} {best['sparse_us']:.1f} us vs {row['sparse_us']:.1f} us")
    if adopted:
        target["note"] = (target.get("note", "") + ("; " if target.get("note") else "") +
                          f"one-token configs replaced by benchmarks/gpu/wide_tiles.py --set {candidate_set} "
                          f"--adopt{'' if target is table else f' on {gpu}'}: " + "; ".join(adopted))
    Path(path).write_text(json.dumps(table, indent=1) + "\n")
    print("adopted:" if adopted else "adopted: none", *adopted, sep="\n  ", flush=True)


def report_markdown(record: dict, title: str) -> str:
    """A run's table: per shape and sparsity the committed config against dense, and the fastest
    candidate of each compact loop pipeline (launchers.compact_stages; 1 = by hand) with its change."""
    rows = [r for r in record["rows"] if "sparse_us" in r]
    failed = [r for r in record["rows"] if "error" in r]

    def depth(row: dict) -> int:
        return launchers.compact_stages(launchers.GemvConfig.from_dict(row["gemv_config"]))

    depths = sorted({depth(r) for r in rows if r["config"] != "committed"})
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    lines = [f"# {title}", "",
             f"`benchmarks/gpu/wide_tiles.py`, commit `{record['commit']}`, {record['gpu']}, {versions}. "
             f"Command: `{record['command']}`. 1 token, TEAL thresholds, CUDA graphs over rotating weight copies "
             f"(bench_kernels.graph_time_ms); us, ratio to cuBLAS. Configs that failed: {len(failed)}.", "",
             "| shape | s | dense us | committed | " + " | ".join(
                 f"best {'hand-pipelined' if d == 1 else f'{d} stages'}" for d in depths) + " |",
             "|---|---|---|---|" + "---|" * len(depths)]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for sparsity in sorted({r["sparsity"] for r in rows if r["shape"] == shape}):
            here = [r for r in rows if r["shape"] == shape and r["sparsity"] == sparsity]
            committed = next(r for r in here if r["config"] == "committed")
            cells = []
            for stages in depths:
                rivals = [r for r in here if r["config"] != "committed" and depth(r) == stages]
                best = min(rivals, key=lambda r: r["sparse_us"], default=None)
                cells.append("-" if best is None else
                             f"{best['sparse_us']:.1f} ({best['sparse_us'] / committed['sparse_us'] - 1:+.0%}) "
                             f"{best['config']}")
            lines.append(f"| {shape} | {sparsity} | {committed['dense_us']:.1f} | {committed['sparse_us']:.1f} "
                         f"({committed['ratio']:.2f}x) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.9])
    ap.add_argument("--set", nargs="+", choices=sorted(CANDIDATE_SETS), default=["wide"],
                    help="the candidate configs (several sets: their union)")
    ap.add_argument("--shapes", nargs="+", default=[], help="names of SHAPES to time (default: all)")
    ap.add_argument("--adopt", default="",
                    help="write the installed sparse_gemv.json with the winning wide one-token configs here")
    ap.add_argument("--report", default="", metavar="MD",
                    help="write the markdown table of the run in --out (an existing JSON) here and stop")
    ap.add_argument("--title", default="One-token configs on the H200")
    args = ap.parse_args()
    if args.report:
        Path(args.report).write_text(report_markdown(json.loads(Path(args.out).read_text()), args.title))
        return
    gen = torch.Generator(device=bk.DEVICE).manual_seed(0)
    launchers.COMPACT_ROWS_ENABLED = False
    sms = 4 if bk.DRY_RUN else torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    header = {**bk.run_header("benchmarks/gpu/wide_tiles.py"), "fixed_point_split": launchers.FIXED_POINT_SPLIT_ENABLED}
    unknown = set(args.shapes) - {name for name, _, _ in SHAPES}
    if unknown:
        ap.error(f"--shapes: unknown {sorted(unknown)}; choose from {[name for name, _, _ in SHAPES]}")
    specs = list(dict.fromkeys(spec for name in args.set for spec in CANDIDATE_SETS[name]))
    shapes = SHAPES[1:2] if bk.DRY_RUN else [shape for shape in SHAPES if not args.shapes or shape[0] in args.shapes]
    for name, n, k in shapes:
        if bk.DRY_RUN:
            n, k = 1024, 512
        layers, _, dense_ms = bk.one_token_layers(n, k, gen)
        for s in args.sparsities:
            committed = launchers.pick_config(n, k, 1, 0, torch.device(bk.DEVICE), s)
            inputs = [bk.make_inputs(layer, bk.Case("teal", 1, s), gen) for layer in layers]
            nbytes = sum(nb for _, _, nb, _ in inputs) / len(inputs)
            reference = launchers.sparse_linear(inputs[0][0][0], **inputs[0][1], config=committed,
                                                use_crossover=False).float()
            candidates = [("committed", committed)] + [
                candidate(spec, k) for spec in specs
                if spec[0] == "walk" or spec[4] <= max(k, launchers.MIN_CHUNK)]
            # a set that times the evict-first hint also times it on the committed config
            if any(cfg.evict for _, cfg in candidates) and not committed.evict:
                candidates.append(("committed evict", dataclasses.replace(committed, evict=True)))
            # no rival: the committed config under another name, or fewer programs than SMs (the
            # sweep's rule: bandwidth left idle at one token; split-depth wide tiles without a split)
            candidates = candidates[:1] + [(label, cfg) for label, cfg in candidates[1:]
                                           if cfg != committed and programs(cfg, n, k) >= sms]
            for label, cfg in candidates:
                calls = bk.one_token_calls(inputs, cfg)
                try:
                    got = calls[0]().float()
                    err = float((got - reference).abs().max() / reference.abs().max())
                    ms = bk.graph_time_ms(calls)
                except Exception as exc:  # a config that does not compile is reported, not fatal
                    rows.append({"shape": name, "sparsity": s, "config": label, "error": f"{type(exc).__name__}: {exc}"[:300]})
                    print(name, s, label, "ERROR", exc, flush=True)
                    continue
                row = {"shape": name, "n": n, "k": k, "sparsity": s, "config": label,
                       "gemv_config": vars(cfg), "dense_us": dense_ms * 1e3, "sparse_us": ms * 1e3,
                       "ratio": ms / dense_ms, "gbs": nbytes / (ms * 1e-3) / 1e9, "max_rel_err_vs_committed": err}
                rows.append(row)
                print(f"{name:20s} s={s} {label:38s} {ms * 1e3:7.2f} us  {ms / dense_ms:.3f}x dense  "
                      f"{row['gbs']:6.0f} GB/s  err {err:.1e}", flush=True)
        del layers
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        # what is measured so far survives a time limit
        Path(args.out).write_text(json.dumps({**header, "rows": rows}, indent=1))
    if args.adopt:
        adopt(rows, args.adopt, "+".join(args.set), None if bk.DRY_RUN else torch.cuda.get_device_name())
    Path(args.out).write_text(json.dumps({**header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
