"""Which model architectures rsparse serves, as data: module names and shapes.

An "input group" is the set of projections that read the same input: q/k/v, o,
gate/up, down. vLLM merges q/k/v into ``qkv_proj`` and gate/up into
``gate_up_proj``; rsparse keys its per-module settings by those merged names so
that one group has one mask, and keeps tensors under the checkpoint's (HF) names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Dense decoder-only families whose layers are exactly these seven projections.
# MoE models (experts), fused-qkv checkpoints (e.g. Phi-3) and others are refused
# at load time rather than served wrong.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclasses.dataclass(frozen=True)
class InputGroup:
    merged_name: str  # vLLM module name relative to the layer, e.g. "self_attn.qkv_proj"
    members: tuple[str, ...]  # checkpoint (HF) module names relative to the layer
    kind: str  # "qkv", "o", "gate_up", "down"
    row_parallel: bool  # input is sliced across tensor-parallel ranks


INPUT_GROUPS = (
    InputGroup("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "qkv", False),
    InputGroup("self_attn.o_proj", ("self_attn.o_proj",), "o", True),
    InputGroup("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"), "gate_up", False),
    InputGroup("mlp.down_proj", ("mlp.down_proj",), "down", True),
)
GROUP_KINDS = tuple(g.kind for g in INPUT_GROUPS)


class UnsupportedArchitectureError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class ModelShapes:
    architecture: str
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf_config(cls, cfg: Any) -> "ModelShapes":
        """Accepts a transformers PretrainedConfig or the config.json dict."""
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (
            lambda k, d=None: getattr(cfg, k, d)
        )
        archs = get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"architecture {arch!r} is not supported by rsparse; supported: "
                f"{list(SUPPORTED_ARCHITECTURES)} (dense decoders with separate q/k/v/o and "
                "gate/up/down projections; MoE experts and fused-qkv layouts are not)"
            )
        if get("num_local_experts") or get("num_experts"):
            raise UnsupportedArchitectureError(
                f"{arch} with experts (MoE) is not supported by rsparse: expert layers are refused"
            )
        hidden = int(get("hidden_size"))
        heads = int(get("num_attention_heads"))
        return cls(
            architecture=arch,
            num_layers=int(get("num_hidden_layers")),
            hidden=hidden,
            intermediate=int(get("intermediate_size")),
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        )

    def member_shape(self, member: str) -> tuple[int, int]:
        """(d_out, d_in) of one checkpoint projection, relative name like 'mlp.up_proj'."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        shapes = {
            "self_attn.q_proj": (q_out, self.hidden),
            "self_attn.k_proj": (kv_out, self.hidden),
            "self_attn.v_proj": (kv_out, self.hidden),
            "self_attn.o_proj": (self.hidden, q_out),
            "mlp.gate_proj": (self.intermediate, self.hidden),
            "mlp.up_proj": (self.intermediate, self.hidden),
            "mlp.down_proj": (self.hidden, self.intermediate),
        }
        return shapes[member]

    def group_shape(self, group: InputGroup) -> tuple[int, int]:
        """(d_out summed over members, d_in) of a merged group."""
        outs = [self.member_shape(m)[0] for m in group.members]
        return sum(outs), self.member_shape(group.members[0])[1]


def layer_group_name(layer: int, group: InputGroup) -> str:
    return f"model.layers.{layer}.{group.merged_name}"


def iter_groups(shapes: ModelShapes):
    """(full merged name, group) for every input group of every layer, in order."""
    for layer in range(shapes.num_layers):
        for group in INPUT_GROUPS:
            yield layer_group_name(layer, group), group


def group_for_prefix(prefix: str) -> InputGroup | None:
    """The input group of a vLLM linear-layer prefix, None for other layers."""
    for group in INPUT_GROUPS:
        if prefix.endswith("." + group.merged_name):
            return group
    return None


def member_names(prefix: str, group: InputGroup) -> list[str]:
    """Checkpoint module names of a merged vLLM prefix (q/k/v for qkv_proj...)."""
    base = prefix[: -len(group.merged_name)]
    return [base + m for m in group.members]
