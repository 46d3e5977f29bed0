"""Time the exact top-k select kernels (radix 16-way passes vs the one-block histogram, the latter
at each digit size of launchers.HIST_DIGIT_BITS_CHOICES and block width of HIST_WARPS_CHOICES) on a
GPU, 1..16 rows, the LaRoSA input widths, inside CUDA graphs (as in vLLM's decode graphs); every
variant's (threshold, tie cut) compared with the radix kernel's.

    python3 -P benchmarks/gpu/topk_select_time.py --out $OUT/topk_select_h100.json
    python benchmarks/gpu/topk_select_time.py --out benchmarks/results/topk_select_h200.json \
        --report benchmarks/results/topk_select_h200.md    # its table (no GPU)
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from vllm_rsparse import launchers
from vllm_rsparse.cuda_timing import graph_replay_ms


def run_header() -> dict:
    """bench_kernels.run_header: commit ($RSPARSE_COMMIT), GPU, versions, command."""
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).resolve().parent.parent /
                                                  "bench_kernels.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    return bench.run_header("benchmarks/gpu/topk_select_time.py")


def graph_us(fn, calls: int = 50) -> float:
    """Per-call microseconds of `fn`, `calls` times in one CUDA graph."""
    def rounds():
        for _ in range(calls):
            fn()

    return graph_replay_ms(rounds) * 1e3 / calls


def variants() -> list[tuple[str, int | None, int]]:
    """(name, digit bits, warps) of each select timed: the radix select, then the histogram select at
    every digit size and block width ("histogram4", "histogram4_w32", ...; no suffix: 8 warps)."""
    out = [("radix16", None, launchers.HIST_WARPS)]
    for warps in launchers.HIST_WARPS_CHOICES:
        suffix = "" if warps == 8 else f"_w{warps}"
        out += [(f"histogram{bits}{suffix}", bits, warps) for bits in launchers.HIST_DIGIT_BITS_CHOICES]
    return out


def report_markdown(record: dict) -> str:
    """The run's table: microseconds per select call, each variant's ratio to the radix select of the
    same run, and whether every variant gave the radix select's (threshold, tie cut)."""
    names = [key.removesuffix("_us") for key in record["rows"][0] if key.endswith("_us")]
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    lines = ["# Exact top-k select kernels (LaRoSA), one CUDA graph of 50 calls", "",
             f"`benchmarks/gpu/topk_select_time.py`, commit `{record['commit']}`, {record['gpu']}, {versions}. "
             f"Command: `{record['command']}`. bf16 rows, keep = K / 2; us per call (ratio to radix16 in the "
             "same run). histogramN: one block per row, passes over N-bit digits.", "",
             "| K | rows | " + " | ".join(names) + " | same (thr, jcut) |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for row in record["rows"]:
        radix = row["radix16_us"]
        cells = [f"{row[v + '_us']:.1f}" + ("" if v == "radix16" else f" ({row[v + '_us'] / radix:.2f})")
                 for v in names]
        same = all(value for key, value in row.items() if key.endswith("same_result"))
        lines.append(f"| {row['k']} | {row['rows']} | " + " | ".join(cells) + f" | {'yes' if same else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", default="", metavar="MD", help="no run: the markdown of the JSON in --out, here")
    args = ap.parse_args()
    if args.report:
        Path(args.report).write_text(report_markdown(json.loads(Path(args.out).read_text())))
        return
    rows = []
    for k in (4096, 11008, 14336):
        for m in (1, 4, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            keep = k // 2
            ref = None
            row = {"k": k, "rows": m, "keep": keep}
            defaults = launchers.TOPK_HISTOGRAM_ENABLED, launchers.HIST_DIGIT_BITS, launchers.HIST_WARPS
            for select, bits, warps in variants():
                launchers.TOPK_HISTOGRAM_ENABLED = select != "radix16"
                launchers.HIST_DIGIT_BITS, launchers.HIST_WARPS = bits, warps
                try:
                    thr, jcut = launchers.topk_thresholds(x, keep, None)
                    got = (thr.clone(), jcut.clone())
                    row[f"{select}_us"] = graph_us(lambda: launchers.topk_thresholds(x, keep, None))
                finally:
                    launchers.TOPK_HISTOGRAM_ENABLED, launchers.HIST_DIGIT_BITS, launchers.HIST_WARPS = defaults
                if ref is None:
                    ref = got
                else:
                    row[f"{select}_same_result"] = bool(torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1]))
            rows.append(row)
            print(row, flush=True)
    out = {**run_header(), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
