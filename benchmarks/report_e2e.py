"""Merge bench_e2e.py runs and render them as a markdown table and a PNG.

    python benchmarks/report_e2e.py run1.json [run2.json ...] --out benchmarks/results/e2e_h100.json

Each input is one bench_e2e.py process (dense and its sparse engines measured side by side in
it); every speedup compares engines of the same run. The merged JSON keeps each run's command,
engines and calibration under "runs" and tags every result row with its run. A hand-written
analysis in <out>.notes.md is appended to the markdown.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def merge(paths: list[str]) -> dict:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    first = runs[0]
    for r in runs[1:]:
        if (r["gpu"], r["versions"]) != (first["gpu"], first["versions"]):
            raise SystemExit(f"runs from different machines or versions: {first['gpu']} {first['versions']} "
                             f"vs {r['gpu']} {r['versions']}")
    merged = {"commit": ", ".join(dict.fromkeys(r["commit"] for r in runs)), "gpu": first["gpu"],
              "versions": first["versions"], "command": " ; ".join(r["command"] for r in runs),
              "protocol": first["protocol"], "dispatch": first.get("dispatch"), "runs": [], "results": []}
    for i, r in enumerate(runs):
        merged["runs"].append({"run": i, "source": Path(paths[i]).name, "commit": r["commit"],
                               "command": r["command"], "engines": r["engines"],
                               "calibration": r.get("calibration", [])})
        merged["results"] += [{**row, "run": i} for row in r["results"]]
    return merged


def markdown(data: dict, notes: Path) -> str:
    lines = [
        f"# End-to-end decode in vLLM on {data['gpu']}",
        "",
        f"commit {data['commit']}, " + ", ".join(f"{k} {v}" for k, v in data["versions"].items()) + ".",
        "",
        data["protocol"],
        "",
        "Each run is one process: dense and the sparse configurations, one engine after the other "
        "(torch.compile + CUDA graphs, bf16, dummy weights, 256 generated tokens); a speedup compares "
        "engines of the same run.",
        "",
        "| run | command |",
        "|---|---|",
    ]
    lines += [f"| {r['run']} | `{r['command']}` |" for r in data["runs"]]
    lines += [
        "",
        "| model | method | sparsity | achieved | batch | prompt | dense tok/s | sparse tok/s | speedup | ideal | of ideal | run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(data["results"], key=lambda r: (r["model"], r["method"], r["sparsity"], r["prompt_len"], r["batch"])):
        frac = "" if r["fraction_of_ideal"] is None else f"{r['fraction_of_ideal']:.0%}"
        ach = "" if r.get("achieved_sparsity") is None else f"{r['achieved_sparsity']:.3f}"
        ideal = "" if not r.get("ideal_speedup") else f"{r['ideal_speedup']:.2f}x"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['sparsity']:.2f} | {ach} | {r['batch']} | {r['prompt_len']} | "
            f"{r['dense_tok_s']:.0f} | {r['sparse_tok_s']:.0f} | {r['speedup']:.2f}x | {ideal} | {frac} | {r['run']} |")
    lines += ["", "| run | model | config | build s | prefill tok/s | vs dense | rsparse tensor bytes | vs weights | "
              "kernels per 8-token decode (profiler) |", "|---|---|---|---|---|---|---|---|---|"]
    for run in data["runs"]:
        dense = {e["model"]: e for e in run["engines"] if e["config"].startswith("dense")}
        for e in run["engines"]:
            ratio = e["prefill"]["tok_s"] / dense[e["model"]]["prefill"]["tok_s"]
            extra = e["bytes"]["rsparse"]
            lines.append(f"| {run['run']} | {e['model']} | {e['config']} | {e['build_s']} | {e['prefill']['tok_s']:.0f} | "
                         f"{ratio:.2f}x | {extra / 1e6:.0f} MB | {extra / e['bytes']['weights']:.2%} | "
                         f"{e.get('kernel_events', '')} |")
    if notes.is_file():
        lines += ["", notes.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if r["prompt_len"] == 128]
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        for method, batch in sorted({(r["method"], r["batch"]) for r in mine}):
            if method != "teal" and batch != 1:
                continue  # R-Sparse / LaRoSA: batch 1 only, to keep the plot readable
            pts = sorted((r["sparsity"], r["speedup"]) for r in mine if r["method"] == method and r["batch"] == batch)
            style = "-o" if method == "teal" else "s"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{method}, batch {batch}")
        ideal = sorted({(r["sparsity"], r["ideal_speedup"]) for r in mine if r["batch"] == 1 and r["ideal_speedup"]})
        if ideal:
            ax.plot([0] + [p[0] for p in ideal], [1] + [p[1] for p in ideal], "k--", label="ideal, batch 1")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("model-level sparsity")
        ax.set_ylabel("decode tokens/s vs vLLM dense")
        ax.set_title(f"{model}, prompt 128, {data['gpu']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="bench_e2e.py output files (or one merged file to re-render)")
    ap.add_argument("--out", help="merged JSON to write (default: re-render the one input in place)")
    args = ap.parse_args()
    if args.out is None:
        if len(args.runs) != 1:
            ap.error("several runs need --out")
        out = Path(args.runs[0])
        data = json.loads(out.read_text())
        if "runs" not in data:
            data = merge(args.runs)
    else:
        out = Path(args.out)
        data = merge(args.runs)
    out.write_text(json.dumps(data, indent=1))
    out.with_suffix(".md").write_text(markdown(data, out.with_suffix(".notes.md")))
    plot(data, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.md')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
