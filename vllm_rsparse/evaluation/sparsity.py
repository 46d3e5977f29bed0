"""Achieved sparsity of an rsparse checkpoint on real text.

Runs the checkpoint's own weights in transformers (fp32), applies each group's mask
exactly as the runtime does (``vllm_rsparse.reference``) to the group's input, and
counts the channels skipped. Model-level sparsity = fraction of linear-layer weight
bytes NOT read per token, with the low-rank factors' bytes counted as read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vllm_rsparse import architectures, reference
from vllm_rsparse.architectures import ModelShapes
from vllm_rsparse.checkpoint import RSPARSE_FILE, tensor_name
from vllm_rsparse.config import RSparseCheckpointConfig


def load_checkpoint_in_transformers(checkpoint_dir: str | Path, dtype=torch.float32):
    """The checkpoint's dense weights in transformers (rsparse tensors are left out:
    transformers does not know the 'rsparse' quant_method, so it is removed first)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    checkpoint_dir = Path(checkpoint_dir)
    raw = json.loads((checkpoint_dir / "config.json").read_text())
    raw.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in raw.items() if k != "model_type"}, model_type=raw["model_type"])
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, config=config, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    return model, tokenizer


def group_bytes_fraction_read(d_out: int, d_in: int, input_kept: float, rank: int) -> float:
    """Weight reads of one group per token, as a fraction of its dense reads."""
    return (input_kept * d_in * d_out + rank * (d_in + d_out)) / (d_in * d_out)


def group_mask_fn(qcfg: RSparseCheckpointConfig, tensors: dict, groups: dict):
    """-> mask(group name, x [tokens, K]) -> bool [tokens, K]: the channels the runtime keeps for
    that group's input, from the checkpoint's selection settings and tensors (reference masks)."""
    def mask(name: str, x: torch.Tensor) -> torch.Tensor:
        s = qcfg.modules[name]
        member = name[: -len(groups[name].merged_name)] + groups[name].members[0]
        score_weight = tensors.get(tensor_name(member, "score_weight"))
        if s.selection == "threshold":
            return reference.threshold_mask(x, tensors[tensor_name(member, "threshold")], score_weight)
        if s.selection == "topk":
            return reference.topk_mask(x, s.keep, score_weight)
        return torch.ones_like(x, dtype=torch.bool)

    return mask


def load_for_masks(checkpoint_dir: str | Path):
    """-> (qcfg, shapes, groups {name: group}, model in transformers, mask(group name, x)): what a
    measurement of the runtime's selections on real activations needs from a checkpoint."""
    from safetensors.torch import load_file

    checkpoint_dir = Path(checkpoint_dir)
    raw = json.loads((checkpoint_dir / "config.json").read_text())
    qcfg = RSparseCheckpointConfig.from_dict(raw["quantization_config"])
    shapes = ModelShapes.from_hf_config(raw)
    tensors = load_file(str(checkpoint_dir / RSPARSE_FILE)) if (checkpoint_dir / RSPARSE_FILE).exists() else {}
    model, _ = load_checkpoint_in_transformers(checkpoint_dir)
    groups = dict(architectures.iter_groups(shapes))
    return qcfg, shapes, groups, model, group_mask_fn(qcfg, tensors, groups)


@torch.no_grad()
def measure_achieved_sparsity(checkpoint_dir: str | Path, windows: torch.Tensor) -> dict:
    """windows [B, T] token ids -> {"model_sparsity", "input_sparsity", "per_kind", "per_group"}."""
    from vllm_rsparse.calibration.stats import run_calibration_forward

    qcfg, shapes, groups, model, group_mask = load_for_masks(checkpoint_dir)
    skipped = {name: 0.0 for name in groups}
    seen = {name: 0 for name in groups}

    def observe(name: str, x: torch.Tensor) -> None:
        mask = group_mask(name, x)
        skipped[name] += float((~mask).sum())
        seen[name] += mask.numel()

    run_calibration_forward(model, windows, shapes, observe, desc="achieved sparsity")
    per_group, dense_bytes, read_bytes = {}, 0.0, 0.0
    per_kind_num, per_kind_den = {}, {}
    for name, group in groups.items():
        frac = skipped[name] / max(seen[name], 1)
        per_group[name] = frac
        d_out, d_in = shapes.group_shape(group)
        rank = qcfg.modules[name].rank
        dense_bytes += d_out * d_in
        read_bytes += d_out * d_in * group_bytes_fraction_read(d_out, d_in, 1.0 - frac, rank)
        per_kind_num[group.kind] = per_kind_num.get(group.kind, 0.0) + frac * d_out * d_in
        per_kind_den[group.kind] = per_kind_den.get(group.kind, 0.0) + d_out * d_in
    return {
        "model_sparsity": 1.0 - read_bytes / dense_bytes,
        "input_sparsity": sum(per_kind_num.values()) / sum(per_kind_den.values()),
        "per_kind": {k: per_kind_num[k] / per_kind_den[k] for k in per_kind_num},
        "per_group": per_group,
    }
