"""Merge load_test.py runs into benchmarks/results/load_cpu.json + load_cpu.md.

The first run is the headline (its keys are the issue's schema: commit, machine,
versions, command, clients, requests, errors, mismatches, rss_start_mb, rss_end_mb,
p50_ms, p99_ms); the others are controls of the same workload on the same machine,
run one after another. The analysis text is given by whoever ran them (--analysis-file).

    python benchmarks/load_report.py MAIN.json CONTROL.json ... --label "..." --label "..." \
        --analysis-file analysis.md --out benchmarks/results/load_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # load_test's rss_verdict

ROW_KEYS = ("requests", "rounds", "errors", "mismatches", "rss_start_mb", "rss_end_mb", "p50_ms", "p99_ms")


def row(label: str, r: dict) -> str:
    flat = r.get("rss_flat") or {}
    growth, spread = flat.get("growth_pct"), flat.get("range_pct")
    verdict = ("" if growth is None else
               f"{growth:+.2f}% (range {spread:.2f}%: {'flat' if flat.get('flat') else 'not flat'})")
    return (f"| {label} | {r['requests']} | {r['errors']} | {r['mismatches']} | {r['rss_start_mb']:.0f} -> "
            f"{r['rss_end_mb']:.0f} | {verdict} | {r['p50_ms']} | {r['p99_ms']} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--label", action="append", required=True, help="one per run, in order")
    p.add_argument("--analysis-file", required=True)
    p.add_argument("--out", default="benchmarks/results/load_cpu.json")
    p.add_argument("--rss-warmup-rounds", type=int, default=3)
    p.add_argument("--rss-flat-pct", type=float, default=1.0)
    args = p.parse_args()
    if len(args.label) != len(args.runs):
        raise SystemExit(f"{len(args.runs)} runs but {len(args.label)} labels")
    runs = [json.loads(Path(f).read_text()) for f in args.runs]
    from load_test import rss_verdict

    for r in runs:  # one definition for every run, also those taken before it changed
        flat = r.get("rss_flat") or {}
        r["rss_flat"] = rss_verdict(r["rss_per_round_mb"][2:], args.rss_warmup_rounds,
                                    flat.get("limit_pct", args.rss_flat_pct))
    analysis = Path(args.analysis_file).read_text().strip()
    main_run = dict(runs[0])
    main_run["label"] = args.label[0]
    main_run["controls"] = [
        {"label": label, **{k: r[k] for k in ("command", "commit", "server_env", "server_args", "allocator",
                                               "rss_per_round_mb", "rss_flat", *ROW_KEYS) if k in r}}
        for label, r in zip(args.label[1:], runs[1:])
    ]
    main_run["analysis"] = analysis
    Path(args.out).write_text(json.dumps(main_run, indent=1))

    header = ("| run | requests | errors | mismatches vs alone | RSS start -> end (MB) | RSS last vs first "
              "after warm-up (range: flat?) | p50 ms | p99 ms |\n|---|---|---|---|---|---|---|---|")
    lines = [
        f"# Load test: {main_run['checkpoint']}",
        "",
        f"commit {main_run['commit']}, {main_run['machine']}, "
        + ", ".join(f"{k} {v}" for k, v in main_run["versions"].items()) + ".",
        "",
        f"Headline: **{args.label[0]}**. Command: `{main_run['command']}`. Server env "
        f"{main_run['server_env']}, args `{' '.join(main_run['server_args'])}`. {main_run['clients']} concurrent "
        f"clients, temperature 0, every answer compared with the same request sent alone first.",
        "",
        header,
        row(args.label[0], main_run),
        *[row(label, r) for label, r in zip(args.label[1:], runs[1:])],
        "",
        "RSS of the server process tree (MB) at start, after the solo pass and after each round:",
        "",
        *[f"- {label}: {r['rss_per_round_mb']}" for label, r in zip(args.label, runs)],
        "",
        "Commands of the controls:",
        "",
        *[f"- {label}: `{r['command']}`" for label, r in zip(args.label[1:], runs[1:])],
        "",
        "## Analysis",
        "",
        analysis,
        "",
    ]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
