"""``rsparse-calibrate``: a Hugging Face model directory or GGUF file -> rsparse checkpoint.

Every option and its default is documented once, here, in ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = ("teal", "rsparse", "larosa", "dense")
OPTION_CHOICES = {
    "allocation": ("uniform", "greedy", "layer-search"),
    "rotation": ("auto", "none", "global"),
    "selection": ("auto", "threshold", "topk"),
    "score": ("auto", "abs", "column_norm"),
    "lowrank": ("auto", "on", "off"),
}


@dataclasses.dataclass(frozen=True)
class CalibrationArgs:
    """Typed calibration options (the CLI parses into this; libraries build it directly)."""

    model: str
    output: str
    method: str = "teal"
    sparsity: float = 0.5
    num_samples: int = 16
    seq_len: int = 512
    text: str | None = None
    device: str = "cpu"
    seed: int = 0
    force: bool = False
    max_sparse_tokens: int = 16
    # Method options and combinations ("auto" = the method's own choice).
    allocation: str = "uniform"  # teal: uniform, greedy per-layer split, or layer-search
    rotation: str = "auto"  # none | global (larosa: global)
    selection: str = "auto"  # threshold | topk (rsparse: threshold, larosa: topk)
    score: str = "auto"  # abs | column_norm (rsparse: column_norm, larosa: abs)
    lowrank: str = "auto"  # on | off (rsparse: on, larosa: off)
    max_factor_memory: float | None = None  # low-rank factors' extra memory cap (fraction of weights)

    def __post_init__(self):
        for key, allowed in OPTION_CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} is {getattr(self, key)!r}; allowed values are {list(allowed)}")
        combo = {k: getattr(self, k) for k in ("rotation", "selection", "score", "lowrank")}
        if self.method in ("teal", "dense") and any(v != "auto" for v in combo.values()):
            raise ValueError(f"method {self.method!r} takes no rotation/selection/score/lowrank options "
                             f"(got {combo}); use --method rsparse or larosa for combinations")
        # greedy is a per-group split any group-wise selection can take; layer-search
        # re-derives |x| thresholds inside its loss loop, which only TEAL's selection matches.
        if self.method in ("teal", "dense") and self.max_factor_memory is not None:
            raise ValueError(f"method {self.method!r} has no low-rank factors to cap (max_factor_memory="
                             f"{self.max_factor_memory}); it applies to --method rsparse")
        if self.method == "dense" and self.allocation != "uniform":
            raise ValueError(f"allocation {self.allocation!r} needs a sparse method, not 'dense'")
        if self.method != "teal" and self.allocation == "layer-search":
            raise ValueError(f"allocation {self.allocation!r} is only implemented for --method teal")
        if self.method == "larosa" and self.rotation == "none":
            raise ValueError("method 'larosa' always folds a rotation; use --method rsparse "
                             "--selection topk --score abs --lowrank off for top-k without rotation")
        if self.method not in METHODS:
            raise ValueError(f"method is {self.method!r}; allowed values are {list(METHODS)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.num_samples < 1 or self.seq_len < 16:
            raise ValueError(f"need num_samples >= 1 and seq_len >= 16, got {self.num_samples}, {self.seq_len}")
        if self.max_factor_memory is not None and not 0.0 <= self.max_factor_memory <= 1.0:
            raise ValueError(f"max_factor_memory must be in [0, 1], got {self.max_factor_memory}")
        if self.max_sparse_tokens < 0:
            raise ValueError(f"max_sparse_tokens must be >= 0, got {self.max_sparse_tokens}")
        check_device(self.device)
        if self.text is not None:
            from vllm_rsparse.calibration.data import check_text_file

            check_text_file(self.text)


def check_device(name: str) -> None:
    """Refuse a calibration device this machine cannot run before the model is loaded (a GGUF
    dequantizes for minutes), instead of failing inside the model's .to(device)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r} is not a torch device ({err})") from None
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is None or not is_available():
        raise ValueError(f"device {name!r}: this torch ({torch.__version__}) has no {device.type} device available; "
                         "calibrate with --device cpu")
    count = getattr(backend, "device_count", lambda: None)()
    if device.index is not None and count is not None and device.index >= count:
        raise ValueError(f"device {name!r}: this machine has {count} {device.type} device(s)")


def build_parser() -> argparse.ArgumentParser:
    d = CalibrationArgs(model="", output="")
    p = argparse.ArgumentParser(
        prog="rsparse-calibrate",
        description="Calibrate activation sparsity for a model and write an rsparse checkpoint "
                    "that vLLM serves with --quantization rsparse (auto-detected from config.json).",
    )
    p.add_argument("model", help="Hugging Face model directory, a .gguf file, or a directory holding one .gguf")
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to write (must be empty or absent)")
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help="teal: magnitude thresholds; rsparse: R-Sparse (sparse channels + low-rank SVD term); "
                        "larosa: folded PCA rotation + exact top-k; dense: plain bf16 export, no sparsity "
                        f"(default: {d.method})")
    p.add_argument("--sparsity", type=float, default=d.sparsity,
                   help=f"target model-level sparsity in [0, 1): fraction of linear-layer weight bytes "
                        f"not read per token (default: {d.sparsity})")
    p.add_argument("--num-samples", type=int, default=d.num_samples,
                   help=f"calibration windows (default: {d.num_samples})")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per window (default: {d.seq_len})")
    p.add_argument("--text", default=None,
                   help="calibration text file (default: the calibration part of the Wikipedia articles in "
                        "gensim's test data; the held-out part is never used for calibration)")
    p.add_argument("--device", default=d.device, help=f"torch device for calibration, e.g. cpu or cuda (default: {d.device})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default: {d.seed})")
    p.add_argument("--max-sparse-tokens", type=int, default=d.max_sparse_tokens,
                   help="batches of more tokens than this run dense at serving time (prefill, large "
                        f"decode batches); override when serving with RSPARSE_MAX_SPARSE_TOKENS (default: {d.max_sparse_tokens})")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    m = p.add_argument_group("method options and combinations ('auto' = the method's own choice)")
    m.add_argument("--allocation", choices=OPTION_CHOICES["allocation"], default=d.allocation,
                   help="'uniform' = every group at --sparsity; 'greedy' = TEAL's per-layer greedy "
                        "split by parameter-weighted output error (teal, or rsparse/larosa combinations: searched "
                        "after any rotation, each group's budget then goes to the method's selection); "
                        "'layer-search' (teal only) = per-layer levels (mean --sparsity) "
                        "searched greedily against the model loss on calibration windows (default: uniform)")
    m.add_argument("--rotation", choices=OPTION_CHOICES["rotation"], default=d.rotation,
                   help="'global' folds one PCA rotation of the residual stream into the weights before "
                        "selecting channels (larosa: always; rsparse: optional; default: auto)")
    m.add_argument("--selection", choices=OPTION_CHOICES["selection"], default=d.selection,
                   help="'threshold': per-group score threshold (tokens vary); 'topk': exactly k channels "
                        "per token (rsparse: threshold, larosa: topk)")
    m.add_argument("--score", choices=OPTION_CHOICES["score"], default=d.score,
                   help="channel score: 'abs' = |x|, 'column_norm' = |x| * ||W[:, j]|| "
                        "(rsparse: column_norm, larosa: abs)")
    m.add_argument("--lowrank", choices=OPTION_CHOICES["lowrank"], default=d.lowrank,
                   help="'on': R-Sparse low-rank term for dropped channels, sparse share searched per group "
                        "(rsparse: on, larosa: off)")
    m.add_argument("--max-factor-memory", type=float, default=d.max_factor_memory, metavar="FRACTION",
                   help="with the low-rank term: the factors may add at most this fraction of each group's "
                        "weight bytes (e.g. 0.05 for a 5%% memory budget; shares that need more are not "
                        "searched). Default: no cap")
    return p


def method_options(args: CalibrationArgs):
    """RSparseOptions for rsparse/larosa from the method defaults and the explicit flags."""
    from vllm_rsparse.calibration.rsparse import RSparseOptions

    default_sel, default_score, default_lowrank = (
        ("threshold", "column_norm", "on") if args.method == "rsparse" else ("topk", "abs", "off"))
    pick = lambda value, default: default if value == "auto" else value  # noqa: E731
    return RSparseOptions(
        selection=pick(args.selection, default_sel),
        score_weight=pick(args.score, default_score) == "column_norm",
        lowrank=pick(args.lowrank, default_lowrank) == "on",
        max_factor_memory=args.max_factor_memory,
        seed=args.seed,
    )


def calibrate(args: CalibrationArgs) -> Path:
    """Run one calibration end to end; returns the checkpoint directory."""
    from vllm_rsparse.architectures import ModelShapes
    from vllm_rsparse.calibration import data, model_io
    from vllm_rsparse.checkpoint import refuse_non_empty_output, refuse_output_over_source, write_checkpoint
    from vllm_rsparse.config import RSparseCheckpointConfig

    output = Path(args.output)
    refuse_output_over_source(output, args.model)
    refuse_non_empty_output(output, args.force)  # before the slow part, not after it
    torch.manual_seed(args.seed)
    started = time.time()
    model, tokenizer, hf_config = model_io.load_model(args.model, device=args.device)
    metadata = {"base_model": str(args.model), "method": args.method, "seed": args.seed}
    if args.method == "dense":
        return model_io.write_dense_checkpoint(model, tokenizer, hf_config, output, args.force, metadata)

    shapes = ModelShapes.from_hf_config(hf_config)
    source = args.text or "default Wikipedia text (gensim test data, calibration split)"
    text = data.calibration_text(args.text)
    windows = data.token_windows(tokenizer, text, args.num_samples, args.seq_len,
                                 source=f"text {args.text!r}" if args.text else "text")
    if args.method == "teal":
        from vllm_rsparse.calibration.teal import calibrate_teal

        result = calibrate_teal(model, shapes, windows, args.sparsity, allocation=args.allocation)
    elif args.method == "rsparse" and args.rotation != "global":
        from vllm_rsparse.calibration.rsparse import calibrate_rsparse
        from vllm_rsparse.calibration.teal import greedy_split_or_none

        per_group = greedy_split_or_none(args.allocation, model, shapes, windows, args.sparsity)
        result = calibrate_rsparse(model, shapes, windows, args.sparsity, method_options(args), allocation=per_group)
        result.info["allocation"] = args.allocation
    else:
        # larosa, or rsparse on the rotated model (a combination): the fold happens in
        # place, so the weights exported below are the rotated ones.
        from vllm_rsparse.calibration.larosa import calibrate_larosa

        result = calibrate_larosa(model, shapes, windows, args.sparsity, method_options(args), args.allocation)

    calibration_info = {
        "data": source,
        "num_samples": args.num_samples,
        "seq_len": args.seq_len,
        "tokens": int(windows.numel()),
        "seed": args.seed,
        "seconds": round(time.time() - started, 1),
        # Process peak RSS (includes loading the model): what a user must provision.
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "options": {k: getattr(args, k) for k in OPTION_CHOICES},
        **result.info,
    }
    qcfg = RSparseCheckpointConfig(
        method=args.method,
        target_sparsity=args.sparsity,
        modules=result.modules,
        max_sparse_tokens=args.max_sparse_tokens,
        rotation=result.rotation,
        calibration=calibration_info,
    )
    weights = model_io.export_weights(model)
    weights.update({k: v.to(torch.bfloat16) for k, v in result.weight_overrides.items()})
    hf_config = {**hf_config, **result.config_overrides}
    if hf_config.get("tie_word_embeddings") is False:
        weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"].clone())
    metadata.update({"calibration_data": source, "calibration_tokens": int(windows.numel())})
    with tempfile.TemporaryDirectory() as tok_dir:
        extra = model_io.tokenizer_files(tokenizer, Path(tok_dir))
        return write_checkpoint(output, hf_config, qcfg, weights, result.tensors, metadata,
                                extra_files=extra, force=args.force)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        args = CalibrationArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(CalibrationArgs)})
        out = calibrate(args)
    except KeyboardInterrupt:
        print("rsparse-calibrate: interrupted; no checkpoint was written", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        # Our errors are ValueError subclasses whose message names the problem: print
        # that, not a traceback (set RSPARSE_DEBUG=1 to see one).
        import os

        if os.environ.get("RSPARSE_DEBUG"):
            raise
        print(f"rsparse-calibrate: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
