"""End-to-end decode speed in vLLM on a GPU: dense vs rsparse, same process, one after the other.

Models: Llama-2-7B / Llama-3-8B shapes (../shared/gpu/models) with load_format="dummy"
(random weights: only speed is measured). vLLM defaults otherwise: torch.compile and
CUDA graphs (capture sizes limited to the batch sizes measured, to save start-up time).

How the rsparse tensors are made for random weights: the speed-relevant part of a
method is how many weight rows it reads per token.
  * larosa  -- exact per-token top-k on |x|, keep = (1 - s) * d_in: exactly the target
               (the rotation is folded into the weights offline: no runtime cost);
  * rsparse -- top-k on |x| * column norm plus the low-rank term with the budget formula
               (sparse share ``--sparse-share``), low-rank bytes counted as read: exact;
  * teal    -- thresholds calibrated like TEAL on the engine's own seeded random weights: one
               dense eager engine per model records every layer's input for 4 x (128 + 64) tokens
               and each threshold is put at the target quantile of |x|, for every threshold
               configuration of the run at once. achieved_sparsity = the bytes-not-read fraction
               on the decode inputs of 4 other prompts (held out; dense activations: the sparse
               model's own activations drift a little from them);
  * rsparse-thr -- what rsparse-calibrate exports for R-Sparse: threshold selection (calibrated
               as for teal, at the input sparsity 1 - (1 - s) * sparse_share) plus the low-rank
               term with the budget rank, rounded down to a multiple of 16 with the freed bytes
               given back to the channels as the calibration does; score weights of 1 (column norms of random weights are
               all alike, so they change which channels, not how many).

Per configuration: decode ms/step = (t(prompt + 256 new tokens) - t(prompt + 1 token)) / 255
at each batch size (median of --reps runs), prefill tokens/s on prompts of --prefill-len,
the parameter bytes of the weights and of the rsparse tensors, and a profiler count of the
Triton kernels launched inside CUDA-graph replays (proof the sparse path runs captured).

The "ideal" speedup: the dense step's time in its linear layers is measured by replaying
the step's GEMMs (every layer's qkv/o/gate_up/down, same shapes, dtype and layout as vLLM)
in a CUDA graph; a perfect sparse kernel at sparsity s removes s of that time:
ideal = T_step / (T_step - s * T_linear).

    python benchmarks/bench_e2e.py --models llama2-7b --out $OUT/e2e.json
    # a plugin switch against its default, side by side in one process
    python benchmarks/bench_e2e.py --configs dense:0 rsparse-thr:0.5 rsparse-thr:0.5,RSPARSE_LOWRANK_UP_PDL=1 ...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # apply_model + one process

import torch

from vllm_rsparse.serving import shutdown_llm

ROOT = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = {"llama2-7b": "llama2-7b", "llama3-8b": "llama3-8b"}


def model_config(name: str, models_dir: Path) -> dict:
    return json.loads((models_dir / name / "config.json").read_text())


def rsparse_settings(shapes, method: str, sparsity: float, sparse_share: float) -> tuple[dict, dict]:
    """(modules, tensors) giving exactly `sparsity` of weight bytes not read per token."""
    from vllm_rsparse import architectures
    from vllm_rsparse.calibration.allocation import aligned_budget
    from vllm_rsparse.checkpoint import tensor_name
    from vllm_rsparse.config import ModuleSettings

    modules, tensors = {}, {}
    for name, group in architectures.iter_groups(shapes):
        d_out, d_in = shapes.group_shape(group)
        if method == "teal":
            settings = ModuleSettings(selection="threshold", sparsity=sparsity, input_sparsity=sparsity)
        elif method == "larosa":
            keep = round((1 - sparsity) * d_in)
            settings = ModuleSettings(selection="topk", sparsity=sparsity, input_sparsity=1 - keep / d_in, keep=keep)
        else:
            # the calibration's split: budget rank rounded down to the kernels' multiple of 16
            keep_fraction, rank = aligned_budget(d_out, d_in, sparsity, (1 - sparsity) * sparse_share)
            if method == "rsparse-thr":
                settings = ModuleSettings(selection="threshold", sparsity=sparsity, input_sparsity=1 - keep_fraction,
                                          rank=rank, score_weight=True)
            else:
                keep = round(keep_fraction * d_in)
                settings = ModuleSettings(selection="topk", sparsity=sparsity, input_sparsity=1 - keep / d_in,
                                          keep=keep, rank=rank, score_weight=True)
        modules[name] = settings
        base = name[: -len(group.merged_name)]
        for member in group.members:
            m_out, m_in = shapes.member_shape(member)
            if settings.selection == "threshold":  # placeholder: calibrate_dummy_thresholds fills it in
                tensors[tensor_name(base + member, "threshold")] = torch.zeros(1)
            if settings.score_weight:
                tensors[tensor_name(base + member, "score_weight")] = torch.ones(m_in)
            if settings.rank:
                tensors[tensor_name(base + member, "lowrank_up")] = torch.zeros(m_out, settings.rank, dtype=torch.bfloat16)
                tensors[tensor_name(base + member, "lowrank_down")] = torch.zeros(settings.rank, m_in, dtype=torch.bfloat16)
    return modules, tensors


def write_config_dir(root: Path, cfg: dict, method: str, sparsity: float, sparse_share: float) -> tuple[Path, dict]:
    """-> (checkpoint directory, its per-group ModuleSettings; {} for dense)."""
    from safetensors.torch import save_file

    from vllm_rsparse.architectures import ModelShapes
    from vllm_rsparse.config import RSparseCheckpointConfig

    out = root / f"{method}-{sparsity}"
    out.mkdir(parents=True, exist_ok=True)
    config = dict(cfg)
    modules = {}
    if method != "dense":
        shapes = ModelShapes.from_hf_config(cfg)
        modules, tensors = rsparse_settings(shapes, method, sparsity, sparse_share)
        config["quantization_config"] = RSparseCheckpointConfig(
            method="rsparse" if method == "rsparse-thr" else method, target_sparsity=sparsity, modules=modules,
            calibration={"data": "none: synthetic exact top-k for speed runs on random weights"},
        ).to_dict()
        if tensors:
            save_file(tensors, str(out / "rsparse.safetensors"))
    (out / "config.json").write_text(json.dumps(config))
    return out, modules


def _install_input_recorders(model) -> int:
    """Forward pre-hooks that keep |x| of every rsparse layer's input (eager engines only):
    all rows in the "calib" bucket, decode-sized calls (<= 16 rows) in the "heldout" bucket
    -- _select_bucket below says which one is open."""
    count = 0
    for module in model.modules():
        if hasattr(module, "rsparse_threshold"):
            module._rsparse_seen = {"calib": [], "heldout": []}
            module._rsparse_bucket = "calib"

            def hook(mod, args):
                x = args[0].detach().float().abs()
                x = x.reshape(-1, x.shape[-1])
                if mod._rsparse_bucket == "calib" or x.shape[0] <= 16:
                    mod._rsparse_seen[mod._rsparse_bucket].append(x)

            module._rsparse_hook = module.register_forward_pre_hook(hook)
            count += 1
    return count


def _select_bucket(model, bucket: str) -> None:
    for module in model.modules():
        if hasattr(module, "_rsparse_seen"):
            module._rsparse_bucket = bucket


def _quantiles_and_drops(model, levels: list[float]) -> dict:
    """{layer: {"shape": (n, k), "thresholds": [per level], "dropped": [per level]}}: each
    threshold at its level's quantile of the calibration |x| (TEAL), and the fraction of
    held-out decode inputs it drops."""
    out = {}
    q = torch.tensor(levels, dtype=torch.float32)
    for name, module in model.named_modules():
        if not hasattr(module, "_rsparse_seen"):
            continue
        module._rsparse_hook.remove()
        seen = torch.cat([x.reshape(-1) for x in module._rsparse_seen["calib"]])
        # torch.quantile takes at most 2**24 elements: an even subsample keeps every token's share
        thresholds = torch.quantile(seen[:: max(1, seen.numel() // 4_000_000)], q.to(seen.device)).tolist()
        held = torch.cat(module._rsparse_seen["heldout"]) if module._rsparse_seen["heldout"] else seen[:0]
        dropped = [float((held <= t).float().mean()) if held.numel() else None for t in thresholds]
        out[name] = {"shape": tuple(module.weight.shape), "thresholds": thresholds, "dropped": dropped}
        del module._rsparse_seen, module._rsparse_hook, module._rsparse_bucket
    return out


def calibrate_dummy_thresholds(record_path: Path, targets: list[tuple[Path, dict]], args) -> dict:
    """TEAL's calibration on the engine's own seeded random weights, for every threshold
    configuration at once: one dense eager engine (of any threshold checkpoint: the layers
    and the seeded weights are the same) records every rsparse layer's input on 4 prompts of
    128 tokens + 64 generated (calibration) and the decode calls of 4 other prompts (held
    out). Each target (checkpoint, its ModuleSettings) gets every group's threshold at the
    quantile of its input_sparsity in its rsparse.safetensors (the plugin reads them in
    dummy-weight runs). -> {"levels", "layers": {layer: shape, thresholds and held-out
    drop fractions per level}}."""
    from safetensors.torch import load_file, save_file
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    levels = sorted({m.input_sparsity for _, modules in targets for m in modules.values()})
    previous = os.environ.get("RSPARSE_MAX_SPARSE_TOKENS")
    os.environ["RSPARSE_MAX_SPARSE_TOKENS"] = "0"  # dense: thresholds come from dense activations
    llm = LLM(model=str(record_path), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=args.max_model_len, enforce_eager=True, enable_prefix_caching=False, seed=0,
              gpu_memory_utilization=0.80)
    try:
        llm.apply_model(_install_input_recorders)
        params = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0.0)
        for bucket, seed in (("calib", 1), ("heldout", 2)):
            gen = torch.Generator().manual_seed(seed)
            prompts = [TokensPrompt(prompt_token_ids=torch.randint(100, 31900, (128,), generator=gen).tolist())
                       for _ in range(4)]
            llm.apply_model(lambda m, b=bucket: _select_bucket(m, b))
            llm.generate(prompts, params, use_tqdm=False)
        stats = llm.apply_model(lambda m: _quantiles_and_drops(m, levels))[0]
    finally:
        shutdown_llm(llm)
        if previous is None:
            os.environ.pop("RSPARSE_MAX_SPARSE_TOKENS", None)
        else:
            os.environ["RSPARSE_MAX_SPARSE_TOKENS"] = previous
    from vllm_rsparse import architectures

    for path, modules in targets:
        tensors = load_file(str(path / "rsparse.safetensors"))
        for name, st in stats.items():
            value = st["thresholds"][levels.index(modules[name].input_sparsity)]
            for member in architectures.member_names(name, architectures.group_for_prefix(name)):
                tensors[f"{member}.rsparse_threshold"] = torch.tensor([value], dtype=torch.float32)
        save_file(tensors, str(path / "rsparse.safetensors"))
    return {"levels": levels, "layers": stats}


def achieved_byte_sparsity(calibration: dict, modules: dict) -> float | None:
    """Model-level sparsity on the held-out decode inputs: the fraction of the rsparse
    layers' weight bytes not read per token, the low-rank factors' bytes (rank x (n + k)
    elements per group) counted as read -- the quality report's definition."""
    dense = read = 0.0
    for name, st in calibration["layers"].items():
        i = calibration["levels"].index(modules[name].input_sparsity)
        n, k = st["shape"]
        if st["dropped"][i] is None:
            return None
        dense += n * k
        read += (1 - st["dropped"][i]) * n * k + modules[name].rank * (n + k)
    return 1 - read / dense if dense else None


def param_bytes(model) -> dict:
    weights = rsparse = 0
    for name, p in model.named_parameters():
        if ".rsparse_" in name:
            rsparse += p.numel() * p.element_size()
        else:
            weights += p.numel() * p.element_size()
    return {"weights": weights, "rsparse": rsparse}


def count_triton_kernels(llm, prompt_ids) -> dict:
    """Kernel names seen by the profiler during a short batch-1 decode (CUDA graphs on)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)
    counts: dict[str, int] = {}
    for evt in prof.events():
        if any(key in evt.name for key in ("sparse_gemv", "lowrank_up", "topk_threshold", "cudaGraphLaunch")):
            counts[evt.name] = counts.get(evt.name, 0) + 1
    return counts


def measure_engine(path: Path, args, label: str, prompt_lens: list[int]) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.time()
    engine_args = dict(enforce_eager=True, max_num_batched_tokens=args.max_model_len) if args.eager else dict(
        # capture exactly the measured batch sizes (each capture size costs start-up time)
        compilation_config={"cudagraph_capture_sizes": sorted(set(args.batches))},
        gpu_memory_utilization=0.88)
    llm = LLM(model=str(path), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              max_model_len=args.max_model_len, enable_prefix_caching=False,
              max_num_seqs=max(args.batches), seed=0, **engine_args)
    build_s = time.time() - started
    gen = torch.Generator().manual_seed(0)
    vocab = 32000  # both benchmark shapes have >= 32000 tokens

    def prompts(n, length):
        return [TokensPrompt(prompt_token_ids=torch.randint(100, vocab - 100, (length,), generator=gen).tolist())
                for _ in range(n)]

    def timed(ps, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        synchronize()
        t = time.perf_counter()
        llm.generate(ps, params, use_tqdm=False)
        synchronize()
        return time.perf_counter() - t

    result = {"label": label, "build_s": round(build_s, 1), "decode": [], "prefill": {}}
    try:
        result["bytes"] = llm.apply_model(param_bytes)[0]
        timed(prompts(1, 32), 8)  # warm-up
        for prompt_len in prompt_lens:
            for batch in args.batches:
                if batch * (prompt_len + args.gen) > args.max_tokens_in_flight:
                    continue
                ps = prompts(batch, prompt_len)
                full, first = [], []
                for _ in range(args.reps if batch <= 4 else args.reps_large):
                    full.append(timed(ps, args.gen))
                    first.append(timed(ps, 1))
                step_ms = (statistics.median(full) - statistics.median(first)) / (args.gen - 1) * 1e3
                result["decode"].append({"batch": batch, "prompt_len": prompt_len, "ms_per_step": step_ms,
                                         "tok_s": batch * 1e3 / step_ms})
                print(f"  {label}: batch {batch:3d} prompt {prompt_len:5d}: {step_ms:.3f} ms/step", flush=True)
        ps = prompts(args.prefill_batch, args.prefill_len)
        times = [timed(ps, 1) for _ in range(args.reps)]
        result["prefill"] = {"tokens": args.prefill_batch * args.prefill_len,
                             "tok_s": args.prefill_batch * args.prefill_len / statistics.median(times)}
        if label != "dense" and torch.cuda.is_available():
            result["kernel_events"] = count_triton_kernels(llm, ps[0].get("prompt_token_ids")[:128])
    finally:
        shutdown_llm(llm)
    return result


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def linear_time_ms(cfg: dict, batch: int) -> float:
    """A dense decode step's GEMMs (every layer's 4 projections), replayed in a CUDA graph."""
    if not torch.cuda.is_available():
        return 0.0  # CPU smoke runs: no ideal
    from vllm_rsparse.architectures import INPUT_GROUPS, ModelShapes

    shapes = ModelShapes.from_hf_config(cfg)
    weights = []
    for group in INPUT_GROUPS:
        n, k = shapes.group_shape(group)
        weights.append(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    xs = [torch.randn(batch, w.shape[1], device="cuda", dtype=torch.bfloat16) for w in weights]
    # One weight per group reused across layers would sit in L2 (50 MB): use one per layer.
    layers = [[w.clone() for w in weights] for _ in range(min(shapes.num_layers, 8))]
    repeat = shapes.num_layers / len(layers)

    def step():
        for ws in layers:
            for x, w in zip(xs, ws):
                torch.nn.functional.linear(x, w)

    from vllm_rsparse.cuda_timing import graph_replay_ms

    ms = graph_replay_ms(step, replays=20)
    layers.clear()  # free the copies before the engines start
    torch.cuda.empty_cache()
    return ms * repeat


def versions() -> dict:
    import triton
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return os.environ.get("RSPARSE_COMMIT", "unknown")


def parse_spec(spec: str) -> tuple[str, float, dict]:
    """A --configs entry -> (method, sparsity, environment). "method:sparsity" optionally followed by
    ",RSPARSE_NAME=value" switches that hold while that engine is built and measured, so that a
    plugin switch (e.g. RSPARSE_LOWRANK_UP_PDL=1) is compared with its default in one process."""
    head, *switches = spec.split(",")
    method, sep, sparsity = head.partition(":")
    if not sep:
        raise ValueError(f"config {spec!r}: expected method:sparsity[,RSPARSE_NAME=value...]")
    env = {}
    for switch in switches:
        name, sep, value = switch.partition("=")
        if not sep or not name.startswith("RSPARSE_"):
            raise ValueError(f"config {spec!r}: {switch!r} is not an RSPARSE_NAME=value switch")
        env[name] = value
    return method, float(sparsity), env


def method_label(spec: str) -> str:
    """The method as results and reports name it: the switches of the spec in brackets."""
    method, _, env = parse_spec(spec)
    return method + (f"[{','.join(f'{k}={v}' for k, v in env.items())}]" if env else "")


class spec_environment:
    """Sets a spec's switches for the duration of a with block and restores what was there."""

    def __init__(self, spec: str):
        self.env = parse_spec(spec)[2]
        self.saved: dict = {}

    def __enter__(self):
        self.saved = {name: os.environ.get(name) for name in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def result_rows(model: str, configs: list[str], engines: dict, achieved: dict, linear_ms: dict) -> list[dict]:
    """One row per (sparse config, batch, prompt length) against the dense engine of the same run."""
    dense = engines.get(configs[0])
    if dense is None:
        return []
    dense_steps = {(d["batch"], d["prompt_len"]): d for d in dense["decode"]}
    rows = []
    for spec, eng in engines.items():
        if spec == configs[0]:
            continue
        sparsity = parse_spec(spec)[1]
        method = method_label(spec)
        for d in eng["decode"]:
            base = dense_steps.get((d["batch"], d["prompt_len"]))
            if base is None:
                continue
            lin = linear_ms[d["batch"]]
            ideal = base["ms_per_step"] / (base["ms_per_step"] - sparsity * lin) if lin else None
            speedup = base["ms_per_step"] / d["ms_per_step"]
            rows.append({
                "model": model, "method": method, "sparsity": sparsity, "batch": d["batch"],
                "prompt_len": d["prompt_len"], "dense_tok_s": base["tok_s"], "sparse_tok_s": d["tok_s"],
                "dense_ms_per_step": base["ms_per_step"], "sparse_ms_per_step": d["ms_per_step"],
                "speedup": speedup, "ideal_speedup": ideal,
                "fraction_of_ideal": (speedup - 1) / (ideal - 1) if ideal and ideal > 1 else None,
                "linear_ms_per_step": lin,
                # top-k: exact by construction; thresholds: held-out decode inputs (calibrate_dummy_thresholds)
                "achieved_sparsity": achieved.get(spec, sparsity),
                "extra_mem_bytes": eng["bytes"]["rsparse"], "weight_bytes": eng["bytes"]["weights"],
                "dense_prefill_tok_s": dense["prefill"]["tok_s"], "sparse_prefill_tok_s": eng["prefill"]["tok_s"],
            })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["llama2-7b"], choices=sorted(MODEL_CONFIGS))
    p.add_argument("--models-dir", default=str(ROOT / "benchmarks" / "models"))
    p.add_argument("--configs", nargs="+", default=["dense:0", "teal:0.5", "rsparse-thr:0.5", "larosa:0.5"],
                   help="method:sparsity[,RSPARSE_NAME=value...] (switches held while that engine runs), dense first")
    p.add_argument("--short-configs", nargs="*", default=[],
                   help="configs (of --configs) measured at the first --prompt-lens only (the 0.6/0.7 curve points)")
    p.add_argument("--sparse-share", type=float, default=0.9, help="rsparse: share of the budget kept sparse")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64])
    p.add_argument("--prompt-lens", nargs="+", type=int, default=[128, 2048])
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--reps", type=int, default=2, help="timed runs per point at batch <= 4 (median)")
    p.add_argument("--reps-large", type=int, default=1,
                   help="timed runs per point at batch > 4 (each runs 256 steps of a large batch)")
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--max-model-len", type=int, default=2560)
    p.add_argument("--max-tokens-in-flight", type=int, default=70000)
    p.add_argument("--dispatch", choices=["measured", "kernels"], default="measured",
                   help="measured: the plugin's default (kernels only where their measured crossover says "
                        "they beat dense); kernels: every batch <= 16 tokens through the kernels "
                        "(RSPARSE_MAX_SPARSE_TOKENS=16), to see the kernels in situ")
    p.add_argument("--eager", action="store_true", help="no torch.compile/CUDA graphs (CPU smoke runs)")
    p.add_argument("--out", default="e2e.json")
    args = p.parse_args()
    if args.dispatch == "kernels":
        os.environ["RSPARSE_MAX_SPARSE_TOKENS"] = "16"
    unknown = set(args.short_configs) - set(args.configs)
    if unknown:
        p.error(f"--short-configs not in --configs: {sorted(unknown)}")
    for spec in args.configs:
        try:
            parse_spec(spec)
        except ValueError as err:
            p.error(str(err))

    results = {"commit": os.environ.get("RSPARSE_COMMIT") or git_commit(),
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke run)",
               "versions": versions(),
               "command": "python benchmarks/bench_e2e.py " + " ".join(os.sys.argv[1:]),
               "protocol": __doc__.strip().split("\n\n")[1], "dispatch": args.dispatch,
               "engines": [], "calibration": [], "results": []}
    work = Path(tempfile.mkdtemp(prefix="rsparse-e2e-"))

    def save():
        Path(args.out).write_text(json.dumps(results, indent=1))

    for model in args.models:
        cfg = model_config(MODEL_CONFIGS[model], Path(args.models_dir))
        linear_ms = {b: linear_time_ms(cfg, b) for b in args.batches}
        print(f"{model}: linear-layer time per step {linear_ms}", flush=True)
        paths, targets = {}, []
        for spec in args.configs:
            method, sparsity, _ = parse_spec(spec)
            # specs that differ only in their switches share one checkpoint
            paths[spec], modules = write_config_dir(work / model, cfg, method, sparsity, args.sparse_share)
            if method in ("teal", "rsparse-thr") and all(path != paths[spec] for _, path, _ in targets):
                targets.append((spec, paths[spec], modules))
        achieved = {}
        if targets:
            t0 = time.time()
            # the recording engine must have no low-rank factors: a teal checkpoint if there is one
            record = next((path for spec, path, _ in targets if spec.startswith("teal:")), targets[0][1])
            calibration = calibrate_dummy_thresholds(record, [(path, modules) for _, path, modules in targets], args)
            for _, path, modules in targets:
                for same in (other for other in args.configs if paths[other] == path):
                    achieved[same] = achieved_byte_sparsity(calibration, modules)
            results["calibration"].append({
                "model": model, "seconds": round(time.time() - t0, 1), "levels": calibration["levels"],
                "achieved_sparsity": achieved,
                "thresholds": {name: st["thresholds"] for name, st in list(calibration["layers"].items())[:8]}})
            print(f"  calibrated {len(calibration['layers'])} layers at {calibration['levels']} in "
                  f"{time.time() - t0:.0f} s; achieved {achieved}", flush=True)
            save()
        engines = {}
        for spec in args.configs:
            method = parse_spec(spec)[0]
            lens = args.prompt_lens[:1] if spec in args.short_configs else args.prompt_lens
            with spec_environment(spec):
                engines[spec] = measure_engine(paths[spec], args, "dense" if method == "dense" else spec, lens)
            results["engines"].append({"model": model, "config": spec, **engines[spec]})
            results["results"] = [r for r in results["results"] if r["model"] != model] + \
                result_rows(model, args.configs, engines, achieved, linear_ms)
            save()
    print("\nmodel      method      s    batch prompt  dense ms  sparse ms  speedup  ideal")
    for r in results["results"]:
        ideal = f"{r['ideal_speedup']:6.3f}" if r["ideal_speedup"] else "     -"
        print(f"{r['model']:10s} {r['method']:11s} {r['sparsity']:.2f} {r['batch']:5d} {r['prompt_len']:6d} "
              f"{r['dense_ms_per_step']:9.3f} {r['sparse_ms_per_step']:10.3f} {r['speedup']:8.3f} {ideal}")


if __name__ == "__main__":
    main()
