"""Probe (issue 4): Nsight Compute counters of the one-token sparse GEMV against cuBLAS.

fixed_cost.py splits the graph-timed one-token time into fixed cost and bytes; it cannot say what
the fixed part is made of. This probe runs each case once under `ncu` (caches flushed before every
replay, so the weights come from DRAM as in decode) and reports, per kernel, the duration on the
GPU, the DRAM bytes and throughput, the grid, and where the warps stall. Cases: the committed
config of each named shape at the given sparsities (the band launchers.pick_config picks for that
sparsity; 1.0 = no channel selected) and dense cuBLAS of the same shape.

    # on the GPU: profile (each case's launches between cudaProfilerStart/Stop, after a marker
    # launch that tells the report where the case begins), then the report
    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section LaunchStats \
        --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
        --section SchedulerStats --section SourceCounters -o $RES/ncu python3 -P benchmarks/gpu/ncu_profile.py --cases $RES/ncu_cases.json
    ncu --import $RES/ncu.ncu-rep --csv --page raw > $RES/ncu_raw.csv
    ncu --import $RES/ncu.ncu-rep --csv --page source --print-source sass > $RES/ncu_source.csv  # with SourceCounters
    python3 -P benchmarks/gpu/ncu_profile.py --report $RES/ncu_raw.csv $RES/ncu_cases.json \
        [--source $RES/ncu_source.csv] --out $RES/ncu_h200.md
    RSPARSE_BENCH_DRY=1 python benchmarks/gpu/ncu_profile.py --cases /tmp/c.json   # CPU: script check only
"""

import argparse
import csv
import gzip
import importlib.util
import itertools
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_rsparse import launchers

_spec = importlib.util.spec_from_file_location("fixed_cost", Path(__file__).resolve().parent / "fixed_cost.py")
fixed_cost = importlib.util.module_from_spec(_spec)
sys.modules["fixed_cost"] = fixed_cost
_spec.loader.exec_module(fixed_cost)
bk = fixed_cost.bk

DEFAULT_SHAPES = ["llama2-7b/o", "llama3-8b/qkv", "llama3-8b/gate_up", "llama2-7b/down"]
DEFAULT_SPARSITIES = [0.5, 0.9, 1.0]
WARMUP_CALLS = 3  # compile and first-touch outside the profiled range
# torch.cuda._sleep launches ATen's one-thread spin_kernel: a name neither cuBLAS nor our kernels use
CASE_MARKER = "spin_kernel"
CASE_MARKER_CYCLES = 1

# raw metric -> column of the report (ncu --page raw names; a missing one prints as "-"); the stall
# reasons are every raw column of the WarpStateStats section's per-issue stall ratios, the largest shown
REPORT_METRICS = {
    "gpu__time_duration.sum": "duration",
    "dram__bytes.sum.per_second": "DRAM TB/s",
    "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed": "DRAM % peak",
    "launch__grid_size": "programs",
    "launch__block_size": "threads",
    "launch__registers_per_thread": "regs",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy %",
    "sm__cycles_active.avg": "SM active cycles (avg)",
    "sm__cycles_active.max": "(max)",
    "gpc__cycles_elapsed.max": "elapsed cycles",
    "smsp__average_warp_latency_per_inst_issued.ratio": "cycles per issue",
}
STALL_PATTERN = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
TOP_STALLS = 4


def top_stalls(kern: dict) -> list[tuple[str, float]]:
    """The largest stall reasons of one kernel: warps stalled per issued instruction, by reason."""
    found = []
    for col, text in kern.items():
        m = STALL_PATTERN.match(col) if isinstance(text, str) else None
        value = _number(text) if m else None
        if value:
            found.append((m.group(1), value))
    return sorted(found, key=lambda t: -t[1])[:TOP_STALLS]


# one sparse case per sparsity and variant; a variant = the token count and the config: given, or the
# committed table's (launchers.pick_config), or with union_rows "off" the committed per-row config
DEFAULT_VARIANTS = [{"tokens": 1}]


def cases(shape_names: list[str], sparsities: list[float], variants: list[dict] = DEFAULT_VARIANTS) -> list[dict]:
    shapes = {name: (n, k) for name, n, k in fixed_cost.SHAPES}
    unknown = [s for s in shape_names if s not in shapes]
    if unknown:
        raise SystemExit(f"ncu_profile.py: unknown shape(s) {unknown}; known: {sorted(shapes)}")
    out = []
    for name in shape_names:
        n, k = shapes[name]
        for tokens in sorted({v.get("tokens", 1) for v in variants}):
            out.append({"shape": name, "n": n, "k": k, "kind": "dense", "tokens": tokens})
        out += [{"shape": name, "n": n, "k": k, "kind": "sparse", "sparsity": s, **v}
                for s in sparsities for v in variants]
    return out


def variant_config(case: dict, n: int, k: int) -> launchers.GemvConfig:
    """The config a sparse case runs: its own, or what the launcher picks at its token count
    (per-row with union_rows "off")."""
    if "config" in case:
        return launchers.GemvConfig.from_dict(case["config"])
    return bk.config_with_union_rows(case.get("union_rows"), n, k, case.get("tokens", 1), case["sparsity"])


def profile(args) -> None:
    gen = torch.Generator(device=bk.DEVICE).manual_seed(0)
    todo = cases(args.shapes, args.sparsities, json.loads(args.variants) if args.variants else DEFAULT_VARIANTS)
    cudart = torch.cuda.cudart() if torch.cuda.is_available() else None
    for case in todo:
        n, k = (1024, 512) if bk.DRY_RUN else (case["n"], case["k"])
        tokens = case.get("tokens", 1)
        layer = bk.Layer(n, k, gen)
        if case["kind"] == "dense":
            x = torch.randn(tokens, k, device=bk.DEVICE, generator=gen).to(bk.DTYPE)
            call = lambda: F.linear(x, layer.w_dense)  # noqa: E731
            case["bytes"] = n * k * 2 + (n + k) * 2 * tokens
        else:
            s = case["sparsity"]
            if tokens == 1:
                inputs, nbytes = fixed_cost.teal_inputs([layer], s, gen)
            else:
                # independent tokens, as union_rows.py times them; the bytes of their union of channels
                inputs = [bk.make_inputs(layer, bk.Case("teal", tokens, s), gen)]
                nbytes = inputs[0][2]
            cfg = variant_config(case, n, k)
            call = bk.one_token_calls(inputs, cfg)[0]
            case["bytes"], case["gemv_config"] = nbytes, vars(cfg)
            case["finish"] = fixed_cost.split_finish_run(k, cfg)
        for _ in range(WARMUP_CALLS):
            call()
        if cudart is not None:
            torch.cuda.synchronize()
            cudart.cudaProfilerStart()
            # one marker launch opens each case's kernels in the profile: the report then pairs every
            # launch with its case, however many cuBLAS (or sparse) kernels each case runs
            torch.cuda._sleep(CASE_MARKER_CYCLES)
        call()  # the profiled launch(es) of this case
        if cudart is not None:
            torch.cuda.synchronize()
            cudart.cudaProfilerStop()
        print(f"{case['shape']:18s} {case['kind']:6s} M={tokens} s={case.get('sparsity', '-')} "
              f"{case.get('gemv_config', '')}",
              flush=True)
        layer.free()
    header = fixed_cost.bk.run_header("benchmarks/gpu/ncu_profile.py")
    Path(args.cases).write_text(json.dumps({**header, "cases": todo}, indent=1))


def _number(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read_raw(path: str) -> list[dict]:
    """Rows of `ncu --csv --page raw`: a header row, a units row, one row per profiled kernel."""
    with open(path, newline="") as f:
        rows = list(csv.reader(line for line in f if not line.startswith("==")))
    header, units, data = rows[0], rows[1], rows[2:]
    out = []
    for values in data:
        rec = dict(zip(header, values))
        rec["_units"] = dict(zip(header, units))
        out.append(rec)
    return out


def is_case_marker(kern: dict) -> bool:
    return CASE_MARKER in kern.get("Kernel Name", "")


def is_sparse_gemv(kern: dict) -> bool:
    return kern.get("Kernel Name", "").startswith("sparse_gemv")


def match_cases(cases_run: list[dict], kernels: list[dict]) -> list[tuple[dict, dict]]:
    """Pair the profiled kernels (launch order) with the cases they belong to.

    Profiles since session 24 open each case with a marker launch (CASE_MARKER): every kernel
    between a case's marker and the next is that case's, whatever and however many it launched.
    Older profiles have no markers; then a TEAL sparse case is its one sparse_gemv kernel, a dense
    case whatever cuBLAS launched up to the next sparse kernel, and adjacent dense cases (one per
    token count) share that run in equal parts, in case order: nothing in their counters tells one
    torch.matmul of the shape from the next (until session 23 the first case took them all)."""
    if any(is_case_marker(kern) for kern in kernels):
        return _match_by_markers(cases_run, kernels)

    def sparse_at(i: int) -> bool:
        return i < len(kernels) and is_sparse_gemv(kernels[i])

    pairs, i = [], 0
    for sparse, group in itertools.groupby(cases_run, key=lambda case: case["kind"] == "sparse"):
        group = list(group)
        if sparse:
            for case in group:
                if not sparse_at(i):
                    raise SystemExit(f"ncu_profile.py: kernel {i} is not the sparse GEMV of case {case}")
                pairs.append((case, kernels[i]))
                i += 1
            continue
        start = i
        while i < len(kernels) and not sparse_at(i):
            i += 1
        if (i - start) % len(group):
            raise SystemExit(f"ncu_profile.py: {i - start} cuBLAS kernels (from kernel {start}) cannot be shared "
                             f"evenly by {len(group)} adjacent dense cases of {group[0]['shape']}")
        per_case = (i - start) // len(group)
        for j, case in enumerate(group):
            pairs += [(case, kern) for kern in kernels[start + j * per_case:start + (j + 1) * per_case]]
    return pairs


def _match_by_markers(cases_run: list[dict], kernels: list[dict]) -> list[tuple[dict, dict]]:
    """match_cases for a profile whose cases each begin with one marker launch; a profile that does
    not fit its case list (a kernel before the first marker, a marker count unlike the case count, a
    case without kernels, a sparse kernel in a dense case or none in a sparse one) stops the report."""
    if not is_case_marker(kernels[0]):
        raise SystemExit(f"ncu_profile.py: kernel 0 ({kernels[0].get('Kernel Name', '?')}) comes before the first "
                         "case marker")
    runs = []
    for kern in kernels:
        if is_case_marker(kern):
            runs.append([])
        else:
            runs[-1].append(kern)
    if len(runs) != len(cases_run):
        raise SystemExit(f"ncu_profile.py: the profile has {len(runs)} case markers and the case list "
                         f"{len(cases_run)} cases")
    pairs = []
    for case, run in zip(cases_run, runs):
        if not run or any(map(is_sparse_gemv, run)) != (case["kind"] == "sparse"):
            names = [kern.get("Kernel Name", "?") for kern in run]
            raise SystemExit(f"ncu_profile.py: the kernels {names} do not fit the {case['kind']} case {case}")
        pairs += [(case, kern) for kern in run]
    return pairs


def read_source(path: str) -> list[dict]:
    """`ncu --csv --page source --print-source sass`: per profiled function (launch order) its SASS
    rows with the warp-stall samples per instruction."""
    blocks = []
    with (gzip.open(path, "rt", newline="") if path.endswith(".gz") else open(path, newline="")) as f:
        for line in f:
            if line.startswith('"Kernel Name"'):
                blocks.append({"name": next(csv.reader([line]))[1], "header": None, "rows": []})
            elif blocks:
                row = next(csv.reader([line]))
                if row and row[0] == "Address":
                    blocks[-1]["header"] = row
                elif row and blocks[-1]["header"]:
                    blocks[-1]["rows"].append(dict(zip(blocks[-1]["header"], row)))
    return blocks


SOURCE_SHARE = 0.03  # instructions with at least this share of a kernel's stall samples


def source_lines(blocks: list[dict], run: dict) -> list[str]:
    """Where the sparse kernels' warps wait: the SASS instructions holding >= SOURCE_SHARE of the
    stall samples, with their two largest reasons. The page lists the profiled kernels in launch order
    as the raw page does, so match_cases pairs its blocks with the cases (markers included)."""
    pairs = match_cases(run["cases"], [{"Kernel Name": b["name"], "block": b} for b in blocks])
    lines = ["", "## Where the sparse kernels' warps wait (stall samples per SASS instruction)", "",
             f"Instructions with >= {SOURCE_SHARE:.0%} of the kernel's samples; `#` = position in the kernel's SASS.", ""]
    for case, kern in pairs:
        if not is_sparse_gemv(kern):  # match_cases pairs a sparse kernel with a sparse case only
            continue
        block = kern["block"]
        total = sum(_number(r.get("Warp Stall Sampling (All Samples)", "")) or 0 for r in block["rows"]) or 1
        lines += [f"**{case['shape']} s = {case['sparsity']}** ({case.get('finish')}, "
                  f"{len(block['rows'])} instructions, {total:.0f} samples)", "",
                  "| # | share | instruction | largest stall reasons (samples) |", "|---|---|---|---|"]
        for i, r in enumerate(block["rows"]):
            v = _number(r.get("Warp Stall Sampling (All Samples)", "")) or 0
            if v / total >= SOURCE_SHARE:
                reasons = sorted(((_number(x) or 0, c[len("stall_"):]) for c, x in r.items()
                                  if c.startswith("stall_") and "Not Issued" not in c), reverse=True)[:2]
                text = " ".join(r.get("Source", "").split())
                lines.append(f"| {i} | {100 * v / total:.1f}% | `{text}` | "
                             + ", ".join(f"{name} {n:.0f}" for n, name in reasons if n) + " |")
        lines.append("")
    return lines


def write_report(raw_path: str, cases_path: str, out: str, source_path: str | None = None) -> None:
    """Markdown table: the profiled kernels in launch order, matched to the cases (the sparse op
    may launch more than one kernel per case: the rows keep every kernel's name)."""
    run = json.loads(Path(cases_path).read_text())
    kernels = read_raw(raw_path)
    tokens = sorted({c.get("tokens", 1) for c in run["cases"]})
    several = tokens != [1]  # rows then name their token count and config
    title = f"sparse GEMV at {' / '.join(map(str, tokens))} tokens" if several else "one-token GEMV"
    lines = [f"# Nsight Compute, {title} (commit {run['commit']}, {run['gpu']})", "",
             f"`{run['command']}`; caches flushed before each replay (weights from DRAM), clocks not locked.", "",
             "| shape | case | kernel | " + " | ".join(REPORT_METRICS.values()) + " | top stalls (warps per issue) |",
             "|---|---|---|" + "---|" * (len(REPORT_METRICS) + 1)]
    records = []
    for case, kern in match_cases(run["cases"], kernels):
        label = "dense cuBLAS" if case["kind"] == "dense" else f"s = {case['sparsity']} ({case.get('finish')})"
        if several:
            cfg = case.get("gemv_config") or {}
            label = f"M = {case.get('tokens', 1)}, {label}" + (
                f", r{cfg['rows']} bn{cfg['block_n']} bk{cfg['block_k']} st{cfg['num_stages']}" if cfg else "")
        values = {col: _number(kern.get(metric, "")) for metric, col in REPORT_METRICS.items()}
        units = {col: kern["_units"].get(metric, "") for metric, col in REPORT_METRICS.items()}
        stalls = top_stalls(kern)
        records.append({"shape": case["shape"], "case": label, "kernel": kern.get("Kernel Name", "?"),
                        "values": values, "units": units, "stalls": stalls})
        cells = [("-" if v is None else f"{v:.4g}") + (f" {units[c]}" if v is not None and c == "duration" else "")
                 for c, v in values.items()]
        lines.append(f"| {case['shape']} | {label} | {kern.get('Kernel Name', '?')[:40]} | " + " | ".join(cells)
                     + " | " + ", ".join(f"{r} {v:.2f}" for r, v in stalls) + " |")
    if source_path:
        lines += source_lines(read_source(source_path), run)
    Path(out).write_text("\n".join(lines) + "\n")
    Path(out).with_suffix(".json").write_text(json.dumps({**{k: v for k, v in run.items() if k != "cases"},
                                                          "cases": run["cases"], "kernels": records}, indent=1))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", help="profile: run the cases (under ncu) and write their list here")
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    ap.add_argument("--sparsities", nargs="+", type=float, default=DEFAULT_SPARSITIES)
    ap.add_argument("--variants", help='JSON list of sparse variants per sparsity, e.g. [{"tokens": 2, "config": '
                    '{GemvConfig fields}}, {"tokens": 2, "union_rows": "off"}] (default: one token, committed config)')
    ap.add_argument("--report", nargs=2, metavar=("RAW_CSV", "CASES_JSON"),
                    help="instead: the markdown table (+ .json) of an earlier profile to --out")
    ap.add_argument("--source", metavar="SOURCE_CSV",
                    help="with --report: `ncu --csv --page source --print-source sass` of the same profile")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.report:
        if not args.out:
            ap.error("--report needs --out")
        return write_report(*args.report, args.out, args.source)
    if not args.cases:
        ap.error("give --cases (profile) or --report")
    profile(args)


if __name__ == "__main__":
    main()
