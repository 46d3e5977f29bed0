"""Time the exact top-k select kernels (radix 16-way passes vs the one-block histogram, the latter
at each digit size of launchers.HIST_DIGIT_BITS_CHOICES and block width of HIST_WARPS_CHOICES) on a
GPU, 1..16 rows, the LaRoSA input widths, inside CUDA graphs (as in vLLM's decode graphs); every
variant's (threshold, tie cut) compared with the radix kernel's. Each select with its passes over
all 32 score bits (the names of session 27's run) and, suffix "_span", over the bits a bf16 score
can have set (launchers.score_bit_span, session 28: 15), at every block width.

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


def variant_name(bits: int | None, warps: int, span: bool) -> str:
    """"radix16" (bits None) or "histogram{bits}", "_w{warps}" unless 8 warps, "_span" when the passes
    cover only the score bits that can be set."""
    name = "radix16" if bits is None else f"histogram{bits}" + ("" if warps == 8 else f"_w{warps}")
    return name + ("_span" if span else "")


def variants() -> list[tuple[str, int | None, int, bool]]:
    """(name, digit bits, warps, span) of each select timed: the radix select and the histogram select at
    every digit size over all 32 bits at 8 warps (session 27's set), then the same over the bits that can
    be set, the histogram at every block width too."""
    out = [(variant_name(bits, 8, False), bits, 8, False) for bits in (None, *launchers.HIST_DIGIT_BITS_CHOICES)]
    out.append((variant_name(None, 8, True), None, 8, True))
    for warps in launchers.HIST_WARPS_CHOICES:
        out += [(variant_name(bits, warps, True), bits, warps, True) for bits in launchers.HIST_DIGIT_BITS_CHOICES]
    return out


def has_span_variants(record_row: dict) -> bool:
    """Whether a run timed the "_span" variants (runs before session 28 did not)."""
    return any(key.endswith("_span_us") for key in record_row)


def launcher_choice(record_row: dict) -> tuple[str, list[str]]:
    """The variant the launcher runs at this row's width (its digit size and warps, the span switch) and
    the variants of the row it competes with (the other digit sizes at the same warps and span)."""
    block_k = launchers.triton_next_power_of_2(record_row["k"])
    bits, warps = launchers.hist_digit_bits(block_k), launchers.hist_warps(block_k)
    span = launchers.TOPK_SCORE_SPAN_ENABLED and has_span_variants(record_row)
    rivals = [variant_name(b, warps, span) for b in launchers.HIST_DIGIT_BITS_CHOICES]
    return variant_name(bits, warps, span), [r for r in rivals if f"{r}_us" in record_row]


def report_markdown(record: dict) -> str:
    """The run's table: microseconds per select call, each variant's ratio to the radix select of the
    same run, and whether every variant gave the radix select's (threshold, tie cut)."""
    names = [key.removesuffix("_us") for key in record["rows"][0] if key.endswith("_us")]
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    lines = ["# Exact top-k select kernels (LaRoSA), one CUDA graph of 50 calls", "",
             f"`benchmarks/gpu/topk_select_time.py`, commit `{record['commit']}`, {record['gpu']}, {versions}. "
             f"Command: `{record['command']}`. bf16 rows, keep = K / 2; us per call (ratio to radix16 in the "
             "same run). histogramN: one block per row, passes over N-bit digits." +
             (" _wN: N warps (else 8); _span: passes over the 15 bits a bf16 score can have set instead of "
              "all 32 (launchers.score_bit_span)." if has_span_variants(record["rows"][0]) else ""),
             "",
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
            switches = ("TOPK_HISTOGRAM_ENABLED", "HIST_DIGIT_BITS", "HIST_WARPS", "TOPK_SCORE_SPAN_ENABLED")
            defaults = [getattr(launchers, name) for name in switches]
            for select, bits, warps, span in variants():
                for name, value in zip(switches, (bits is not None, bits, warps, span)):
                    setattr(launchers, name, value)
                try:
                    thr, jcut = launchers.topk_thresholds(x, keep, None)
                    got = (thr.clone(), jcut.clone())
                    row[f"{select}_us"] = graph_us(lambda: launchers.topk_thresholds(x, keep, None))
                finally:
                    for name, value in zip(switches, defaults):
                        setattr(launchers, name, value)
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
