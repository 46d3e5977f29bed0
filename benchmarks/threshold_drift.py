"""Achieved sparsity of threshold checkpoints on calibration, unseen calibration-split and
held-out windows, per input kind; plus how many groups sit near the greedy cap.

    python benchmarks/threshold_drift.py CKPT [CKPT ...] -o benchmarks/results/threshold_drift.json

Why: thresholds on the rotated stream undershoot their target on held-out text (0.469 at
0.5); comparing the three window sets separates "the PCA fits its own sample" (unseen
calibration-split windows would drift too) from "the articles differ" (only held-out drifts).
fp32 transformers with the reference masks (``evaluation.sparsity``), 2 x 512 tokens each.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--calib-windows", type=int, default=8, help="windows the checkpoints were calibrated on")
    args = p.parse_args()
    torch.set_num_threads(1)
    from vllm_rsparse.calibration import data
    from vllm_rsparse.evaluation.sparsity import load_checkpoint_in_transformers, measure_achieved_sparsity

    rows = []
    for ck in args.checkpoints:
        _, tok = load_checkpoint_in_transformers(ck)
        calib = data.token_windows(tok, data.calibration_text(), args.calib_windows + 2, 512)
        sets = {"calibration (first 2 of the calibrated windows)": calib[:2],
                "calibration split, unseen (next 2 windows)": calib[args.calib_windows:],
                "held-out": data.token_windows(tok, data.heldout_text(), 2, 512, source="held-out text")}
        row = {"checkpoint": Path(ck).name}
        for name, w in sets.items():
            r = measure_achieved_sparsity(ck, w)
            row[name] = {"model": round(r["model_sparsity"], 4),
                         "per_kind": {k: round(v, 4) for k, v in r["per_kind"].items()}}
        mods = json.loads((Path(ck) / "config.json").read_text())["quantization_config"]["modules"]
        row["groups_at_or_above_0.9"] = f"{sum(m['sparsity'] >= 0.9 for m in mods.values())}/{len(mods)}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    import importlib.metadata as md

    out = {
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores (shared), {platform.platform()}",
        "versions": {"python": platform.python_version(), **{k: md.version(k) for k in ("torch", "transformers")}},
        "command": "OMP_NUM_THREADS=1 python benchmarks/threshold_drift.py " + " ".join(
            f"<workdir>/ckpt/{Path(c).name}" for c in args.checkpoints) + f" -o {args.output}",
        "protocol": "achieved = fraction of linear weight bytes not read, fp32 transformers, reference masks, "
                    "2 x 512 tokens per window set; checkpoints from benchmarks/eval_quality.py (workdir ckpt/)",
        "rows": rows,
    }
    Path(args.output).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
