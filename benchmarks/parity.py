"""Same answers on the GPU as on the CPU (issue 5, item 5): one script for both machines.

    # CPU (here): fixed token inputs from the held-out text, then the CPU reference
    python benchmarks/parity.py prepare CKPT_DENSE --out parity_inputs.json
    python benchmarks/parity.py run CKPT --inputs parity_inputs.json --out cpu_<label>.json
    # GPU (vLLM 0.26, same checkpoint files): the same command, gpu_<label>.json
    python benchmarks/parity.py compare cpu_dense.json gpu_dense.json cpu_teal.json gpu_teal.json \
        --out benchmarks/results/parity_smollm2.json

The inputs are token ids, not text, so both machines score exactly the same tokens whatever
their tokenizer or text-data packages. `run` uses the evaluation harness's VllmScorer with the
strict protocol (sparse path on every token): held-out perplexity over the windows, and greedy
continuations of the prompts. `compare` checks: at sparsity 0 the GPU's greedy tokens equal the
CPU's; at 0.5 the GPU perplexity is within 1% of the CPU's.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PPL_WINDOWS = 4
PPL_SEQ_LEN = 512
PROMPTS = 8
PROMPT_LEN = 32
GEN_TOKENS = 32
PPL_TOLERANCE = 0.01


def provenance() -> dict:
    """commit, machine, versions and command of this measurement."""
    import os
    import subprocess

    import torch

    # RSPARSE_COMMIT first: the device machine gets a copy of the work tree whose .git may
    # not be the commit that was sent
    commit = os.environ.get("RSPARSE_COMMIT", "")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                          text=True).stdout.strip()
    except OSError:
        pass
    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = None
    return {"commit": commit or "unknown",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "versions": {"vllm": vllm_version, "torch": torch.__version__, "python": platform.python_version()},
            "command": "python benchmarks/parity.py " + " ".join(sys.argv[1:])}


def prepare(args) -> None:
    from transformers import AutoTokenizer

    from vllm_rsparse.calibration import data

    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    windows = data.token_windows(tok, data.heldout_text(), PPL_WINDOWS + PROMPTS, PPL_SEQ_LEN,
                                 source="held-out text")
    inputs = {**provenance(), "source": "held-out Wikipedia articles (gensim test data), tokenized by " + str(args.checkpoint),
              "windows": windows[:PPL_WINDOWS].tolist(),
              # prompts from windows the perplexity does not use
              "prompts": [w[:PROMPT_LEN].tolist() for w in windows[PPL_WINDOWS:]]}
    Path(args.out).write_text(json.dumps(inputs))
    print(f"wrote {args.out}: {PPL_WINDOWS} x {PPL_SEQ_LEN} windows, {PROMPTS} prompts of {PROMPT_LEN} tokens")


def run(args) -> None:
    import torch
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_rsparse.evaluation.harness import VllmScorer, perplexity
    from vllm_rsparse.serving import shutdown_llm

    inputs = json.loads(Path(args.inputs).read_text())
    scorer = VllmScorer(args.checkpoint, "strict", max_model_len=PPL_SEQ_LEN + GEN_TOKENS + 64)
    try:
        ppl = perplexity(scorer, torch.tensor(inputs["windows"]))
        params = SamplingParams(max_tokens=GEN_TOKENS, temperature=0.0, ignore_eos=True)
        outs = scorer.llm.generate([TokensPrompt(prompt_token_ids=p) for p in inputs["prompts"]], params,
                                   use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
    finally:
        shutdown_llm(scorer.llm)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()})"
    result = {**provenance(), "checkpoint": str(args.checkpoint), "device": device, "vllm": vllm.__version__,
              "torch": torch.__version__, "protocol": "strict (RSPARSE_MAX_SPARSE_TOKENS=all)",
              "ppl": ppl["ppl"], "ppl_tokens": ppl["tokens"], "greedy_tokens": tokens}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{args.checkpoint} on {device}: ppl {ppl['ppl']:.4f}")


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def compare(args) -> None:
    pairs = [json.loads(Path(p).read_text()) for p in args.results]
    if len(pairs) % 2:
        sys.exit("compare takes CPU/GPU result files in pairs")
    rows = []
    for cpu, gpu in zip(pairs[::2], pairs[1::2]):
        diffs = [first_difference(a, b) for a, b in zip(cpu["greedy_tokens"], gpu["greedy_tokens"])]
        rel = abs(gpu["ppl"] - cpu["ppl"]) / cpu["ppl"]
        rows.append({"checkpoint": cpu["checkpoint"], "cpu": cpu["device"], "gpu": gpu["device"],
                     "cpu_ppl": cpu["ppl"], "gpu_ppl": gpu["ppl"], "ppl_rel_diff": rel,
                     "ppl_within_1pct": rel <= PPL_TOLERANCE,
                     "prompts_identical": sum(d is None for d in diffs), "prompts": len(diffs),
                     "first_difference": diffs})
    out = {**provenance(), "rows": rows,
           "versions": {"cpu": pairs[0]["vllm"], "gpu": pairs[1]["vllm"]}}
    Path(args.out).write_text(json.dumps(out, indent=1))
    for r in rows:
        print(f"{r['checkpoint']}: ppl cpu {r['cpu_ppl']:.4f} gpu {r['gpu_ppl']:.4f} ({r['ppl_rel_diff'] * 100:.2f}%), "
              f"greedy identical {r['prompts_identical']}/{r['prompts']}")


def margins(args) -> None:
    """Where a GPU greedy continuation leaves the CPU's, how close the CPU's own choice was:
    the CPU model scores the common prefix and gives the log-probabilities of its token and
    of the GPU's token at the first differing position (a gap of a few hundredths of a nat is
    a near tie that bf16 rounding differences between two GEMM implementations can flip)."""
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_rsparse.evaluation.harness import VllmScorer
    from vllm_rsparse.serving import shutdown_llm

    inputs = json.loads(Path(args.inputs).read_text())
    cpu, gpu = (json.loads(Path(p).read_text()) for p in (args.cpu, args.gpu))
    cases = []
    for i, (a, b) in enumerate(zip(cpu["greedy_tokens"], gpu["greedy_tokens"])):
        at = first_difference(a, b)
        if at is not None and at < min(len(a), len(b)):
            cases.append((i, at, inputs["prompts"][i] + a[:at], a[at], b[at]))
    scorer = VllmScorer(args.checkpoint, "strict", max_model_len=PPL_SEQ_LEN + GEN_TOKENS + 64)
    rows = []
    try:
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
        outs = scorer.llm.generate([TokensPrompt(prompt_token_ids=c[2]) for c in cases], params, use_tqdm=False)
        for (i, at, _, tok_cpu, tok_gpu), out in zip(cases, outs):
            lp = out.outputs[0].logprobs[0]
            cpu_lp = lp[tok_cpu].logprob if tok_cpu in lp else None
            gpu_lp = lp[tok_gpu].logprob if tok_gpu in lp else None
            rows.append({"prompt": i, "position": at, "cpu_token": tok_cpu, "gpu_token": tok_gpu,
                         "cpu_logprob_of_cpu_token": cpu_lp, "cpu_logprob_of_gpu_token": gpu_lp,
                         "gap_nats": None if cpu_lp is None or gpu_lp is None else cpu_lp - gpu_lp,
                         "gpu_token_rank_on_cpu": next((r for r, (t, _) in enumerate(
                             sorted(lp.items(), key=lambda kv: -kv[1].logprob)) if t == tok_gpu), None)})
    finally:
        shutdown_llm(scorer.llm)
    out = {**provenance(), "vllm": vllm.__version__, "checkpoint": str(args.checkpoint), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))
    for r in rows:
        print(r)


def tensor_digest(path: str) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: equal for two
    model.safetensors holding the same weights whatever metadata their headers carry (the
    GPU re-exports the checkpoint from the GGUF, and the export stamps commit and time)."""
    import hashlib

    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(path, "pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def digest(args) -> None:
    value = tensor_digest(args.safetensors)
    if args.expect is not None and value != args.expect:
        sys.exit(f"{args.safetensors}: tensor digest {value} differs from the CPU checkpoint's {args.expect}: "
                 "the weights differ, parity would compare two different models")
    print(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p = sub.add_parser("run")
    p.add_argument("checkpoint")
    p.add_argument("--inputs", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("compare")
    p.add_argument("results", nargs="+", help="cpu.json gpu.json [cpu.json gpu.json ...]")
    p.add_argument("--out", required=True)
    p = sub.add_parser("margins", help="CPU log-probabilities at the first CPU/GPU greedy difference")
    p.add_argument("checkpoint")
    p.add_argument("--inputs", required=True)
    p.add_argument("--cpu", required=True)
    p.add_argument("--gpu", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("digest", help="tensor digest of a model.safetensors (--expect: fail unless equal)")
    p.add_argument("safetensors")
    p.add_argument("--expect", default=None)
    args = ap.parse_args()
    {"prepare": prepare, "run": run, "compare": compare, "digest": digest, "margins": margins}[args.cmd](args)


if __name__ == "__main__":
    main()
