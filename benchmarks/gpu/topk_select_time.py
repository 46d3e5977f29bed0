"""Time the two exact top-k select kernels (radix 16-way passes vs one-block histogram) on a
GPU, 1..16 rows, the LaRoSA input widths, inside CUDA graphs (as in vLLM's decode graphs).

    python3 -P benchmarks/gpu/topk_select_time.py --out $OUT/topk_select_h100.json
"""

import argparse
import json

import torch

from vllm_rsparse import launchers
from vllm_rsparse.cuda_timing import graph_replay_ms


def graph_us(fn, calls: int = 50) -> float:
    """Per-call microseconds of `fn`, `calls` times in one CUDA graph."""
    def rounds():
        for _ in range(calls):
            fn()

    return graph_replay_ms(rounds) * 1e3 / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for k in (4096, 11008, 14336):
        for m in (1, 4, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            keep = k // 2
            ref = None
            row = {"k": k, "rows": m, "keep": keep}
            for select in ("radix16", "histogram"):
                launchers.TOPK_HISTOGRAM_ENABLED = select == "histogram"
                try:
                    thr, jcut = launchers.topk_thresholds(x, keep, None)
                    got = (thr.clone(), jcut.clone())
                    row[f"{select}_us"] = graph_us(lambda: launchers.topk_thresholds(x, keep, None))
                finally:
                    launchers.TOPK_HISTOGRAM_ENABLED = False
                if ref is None:
                    ref = got
                else:
                    row["same_result"] = bool(torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1]))
            rows.append(row)
            print(row, flush=True)
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
