"""Render benchmarks/results/e2e_h100.json as a markdown table and a PNG.

    python benchmarks/report_e2e.py benchmarks/results/e2e_h100.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str) -> None:
    src = Path(path)
    data = json.loads(src.read_text())
    rows = data["results"]
    engines = {e["config"]: e for e in data["engines"]}
    dense = next(e for e in data["engines"] if e["config"].startswith("dense"))
    lines = [
        f"# End-to-end decode in vLLM on {data['gpu']}",
        "",
        f"commit {data['commit']}, " + ", ".join(f"{k} {v}" for k, v in data["versions"].items())
        + f". Command: `{data['command']}`.",
        "",
        data["protocol"],
        "",
        "Dense and every sparse configuration ran in one process, one engine after the other "
        "(torch.compile + CUDA graphs, bf16, dummy weights, 256 generated tokens).",
        "",
        "| model | method | sparsity | batch | prompt | dense tok/s | sparse tok/s | speedup | ideal | of ideal |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        frac = "" if r["fraction_of_ideal"] is None else f"{r['fraction_of_ideal']:.0%}"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['sparsity']:.2f} | {r['batch']} | {r['prompt_len']} | "
            f"{r['dense_tok_s']:.0f} | {r['sparse_tok_s']:.0f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {frac} |")
    lines += ["", "| config | prefill tok/s | vs dense | rsparse tensor bytes | vs weights | kernels per 8-token decode (profiler) |",
              "|---|---|---|---|---|---|"]
    for name, e in engines.items():
        ratio = e["prefill"]["tok_s"] / dense["prefill"]["tok_s"]
        extra = e["bytes"]["rsparse"]
        lines.append(f"| {name} | {e['prefill']['tok_s']:.0f} | {ratio:.2f}x | {extra / 1e6:.0f} MB | "
                     f"{extra / e['bytes']['weights']:.1%} | {e.get('kernel_events', '')} |")
    notes = src.with_suffix(".notes.md")  # hand-written analysis of the run, kept beside it
    if notes.is_file():
        lines += ["", notes.read_text().rstrip()]
    src.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (method, batch) in sorted({(r["method"], r["batch"]) for r in rows if r["prompt_len"] == 128}):
        pts = sorted((r["sparsity"], r["speedup"]) for r in rows
                     if r["method"] == method and r["batch"] == batch and r["prompt_len"] == 128)
        ax.plot([0] + [p[0] for p in pts], [1] + [p[1] for p in pts], marker="o", label=f"{method}, batch {batch}")
    ideal = sorted({(r["sparsity"], r["ideal_speedup"]) for r in rows if r["batch"] == 1 and r["prompt_len"] == 128})
    ax.plot([0] + [p[0] for p in ideal], [1] + [p[1] for p in ideal], "k--", label="ideal, batch 1")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("model-level sparsity (weight bytes not read)")
    ax.set_ylabel("decode speedup vs dense vLLM")
    ax.set_title(f"{rows[0]['model']} shape, {data['gpu']}, prompt 128")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(src.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/e2e_h100.json")
