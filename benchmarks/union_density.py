"""Union density of real decode batches: the share of a projection's input channels that ANY token
of a decode step selects, for M tokens of M different documents (a batch of M requests), against
what M independent tokens with the same per-token densities would select.

    python benchmarks/union_density.py CKPT [CKPT ...] -o benchmarks/results/union_density_smollm2.json

Why: the union kernels of 2-16 tokens (issue 4 (d)) read a weight row once if any token of the step
selected its channel, so their time follows this union. The GPU benchmarks time them on random
tokens, which select independently (benchmarks/gpu/union_rows.py: density 1 - s^M); real
activations share large channels across tokens, so their union is smaller. This measures by how
much, on a real model and held-out text, with the checkpoint's own thresholds and the reference
masks (fp32 transformers, as benchmarks/threshold_drift.py).

Per checkpoint: windows of T tokens, one from each of the 16 held-out articles per round (a round
starts OFFSET_STEP tokens further into each article), are run as one batch; at every position
t >= SKIP (the first tokens of a window carry the attention-sink activations decode never sees)
the windows of a round are split into groups of M, so each group is M different documents and its
mask union is one decode step of M requests. Reported
per projection kind and over the model (weighted by each group's weight bytes): the mean per-token
density, the mean union density, and the independent prediction 1 - prod_i (1 - d_i) from the same
tokens' densities d_i.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SKIP = 16  # positions of each window left out (attention-sink tokens)
ARTICLES = 16  # windows per round, each from its own held-out article: M divides it
OFFSET_STEP = 1024  # tokens between a round's window and the next round's in the same article


def request_windows(tokenizer, rounds: int, seq_len: int) -> torch.Tensor:
    """[rounds x ARTICLES, seq_len] token ids: round r holds tokens [r x OFFSET_STEP, + seq_len) of
    each of the first ARTICLES held-out articles long enough for every round."""
    from vllm_rsparse.calibration import data

    need = (rounds - 1) * OFFSET_STEP + seq_len
    ids = [t for t in (tokenizer(a)["input_ids"] for a in data.split_articles(data.wiki_articles())[1])
           if len(t) >= need][:ARTICLES]
    if len(ids) < ARTICLES:
        raise SystemExit(f"union_density.py: {len(ids)} held-out articles have {need} tokens, {ARTICLES} needed; "
                         "use fewer --rounds or a shorter --seq-len")
    return torch.tensor([t[r * OFFSET_STEP: r * OFFSET_STEP + seq_len] for r in range(rounds) for t in ids])


def union_stats(mask: torch.Tensor, tokens: int) -> tuple[float, float, float, int]:
    """mask [W, T, K] bool (W windows) -> sums over the decode steps of M = tokens requests (groups of
    `tokens` windows at one position): (per-token density, union density, independent prediction,
    steps). Windows past the last whole group are left out."""
    w, t, k = mask.shape
    groups = w // tokens
    m = mask[: groups * tokens].reshape(groups, tokens, t, k)
    per_token = m.float().mean(-1)  # [G, M, T]
    union = m.any(1).float().mean(-1)  # [G, T]
    independent = 1.0 - (1.0 - per_token).prod(1)  # [G, T]
    return float(per_token.mean(1).sum()), float(union.sum()), float(independent.sum()), groups * t


@torch.no_grad()
def measure(checkpoint: str, windows: torch.Tensor, token_counts: list[int]) -> dict:
    from vllm_rsparse.calibration.stats import run_calibration_forward
    from vllm_rsparse.evaluation.sparsity import load_for_masks

    ckpt = Path(checkpoint)
    qcfg, shapes, groups, model, group_mask = load_for_masks(ckpt)
    n_windows, seq = windows.shape
    sums = {name: {m: [0.0, 0.0, 0.0, 0] for m in token_counts} for name in groups}

    def observe(name: str, x: torch.Tensor) -> None:
        spec = qcfg.modules[name]
        if spec.selection != "threshold":
            raise SystemExit(f"union_density.py: {name} uses {spec.selection!r} selection; this measures "
                             "threshold checkpoints (teal, rsparse, larosa --selection threshold)")
        mask = group_mask(name, x).reshape(n_windows, seq, -1)[:, SKIP:]
        for m in token_counts:
            for i, v in enumerate(union_stats(mask, m)):
                sums[name][m][i] += v

    run_calibration_forward(model, windows, shapes, observe, desc=f"union density {ckpt.name}",
                            batch_size=n_windows)
    rows = []
    for m in token_counts:
        per_kind, weights = {}, {}
        for name, group in groups.items():
            d_out, d_in = shapes.group_shape(group)
            per_token, union, independent, steps = sums[name][m]
            acc = per_kind.setdefault(group.kind, [0.0, 0.0, 0.0])
            for i, v in enumerate((per_token, union, independent)):
                acc[i] += v / steps * d_out * d_in
            weights[group.kind] = weights.get(group.kind, 0) + d_out * d_in
        total = sum(weights.values())
        model_level = [sum(per_kind[k][i] for k in per_kind) / total for i in range(3)]
        rows.append({"checkpoint": ckpt.name, "method": qcfg.method, "target_sparsity": qcfg.target_sparsity,
                     "tokens": m,
                     "model": dict(zip(("per_token", "union", "independent"), map(lambda v: round(v, 4), model_level))),
                     "per_kind": {k: dict(zip(("per_token", "union", "independent"),
                                              (round(v / weights[k], 4) for v in per_kind[k]))) for k in per_kind}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(data: dict) -> str:
    lines = ["# Union density of real decode batches (M requests, one token each)", "",
             f"`{data['command']}`, commit `{data['commit']}`, {data['machine']}, {data['versions']}.", "",
             data["protocol"], "",
             "Density = share of input channels read (1 - sparsity). 'union' = channels any of the M tokens "
             "selected (what a union program reads); 'independent' = 1 - prod(1 - d_i) from the same tokens' "
             "densities (what random tokens, as in the GPU benchmarks, select); 'per token' = what one token reads.", "",
             "| checkpoint | M | per token | union | independent | union / independent | per kind: union (independent) |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        mdl = r["model"]
        kinds = ", ".join(f"{k} {v['union']:.2f} ({v['independent']:.2f})" for k, v in r["per_kind"].items())
        lines.append(f"| {r['checkpoint']} | {r['tokens']} | {mdl['per_token']:.3f} | {mdl['union']:.3f} | "
                     f"{mdl['independent']:.3f} | {mdl['union'] / mdl['independent']:.2f} | {kinds} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--rounds", type=int, default=2, help=f"windows per held-out article ({ARTICLES} articles)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--tokens", type=int, nargs="+", default=[2, 4, 8, 16], choices=[1, 2, 4, 8, 16])
    p.add_argument("--report", action="store_true", help="no run: the markdown of --output's JSON next to it")
    args = p.parse_args()
    out = Path(args.output)
    if args.report:
        out.with_suffix(".md").write_text(markdown(json.loads(out.read_text())))
        return
    if not args.checkpoints:
        p.error("give checkpoints (or --report)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from transformers import AutoTokenizer

    rows = []
    for ck in args.checkpoints:
        windows = request_windows(AutoTokenizer.from_pretrained(ck), args.rounds, args.seq_len)
        rows += measure(ck, windows, args.tokens)
    import importlib.metadata as md

    result = {
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                 text=True).stdout.strip(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "versions": {"python": platform.python_version(), **{k: md.version(k) for k in ("torch", "transformers")}},
        "command": "python benchmarks/union_density.py " + " ".join(f"<workdir>/{Path(c).name}" for c in args.checkpoints)
                   + f" --rounds {args.rounds} --seq-len {args.seq_len} --tokens "
                   + " ".join(map(str, args.tokens)) + f" -o {args.output}",
        "protocol": (f"{args.rounds} x {ARTICLES} held-out windows of {args.seq_len} tokens (one per article and "
                     f"round, rounds {OFFSET_STEP} tokens apart) in one fp32 transformers batch, the checkpoint's "
                     f"thresholds and score weights through vllm_rsparse.reference.threshold_mask; positions >= "
                     f"{SKIP}; a decode step = M windows of different articles at one position"),
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
