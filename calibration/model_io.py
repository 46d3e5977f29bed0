"""Load a Hugging Face model directory or a GGUF file for calibration, and turn it
back into the config / weights / tokenizer files of an HF checkpoint."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from vllm_rsparse.architectures import SUPPORTED_ARCHITECTURES, ModelShapes, UnsupportedArchitectureError

# GGUF "general.architecture" values that map to a supported HF architecture.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
                   "chat_template.jinja")


class ModelSourceError(ValueError):
    pass


def _gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except Exception as e:
        raise ModelSourceError(f"{path}: not a readable GGUF file ({e})") from None


def resolve_source(source: str | Path) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for an HF directory or a GGUF path."""
    source = Path(source)
    if source.is_file() and source.suffix == ".gguf":
        return source.parent, source.name
    if source.is_dir():
        if (source / "config.json").is_file():
            return source, None
        ggufs = sorted(source.glob("*.gguf"))
        if len(ggufs) == 1:
            return source, ggufs[0].name
        raise ModelSourceError(
            f"{source}: neither a Hugging Face model directory (no config.json) nor a directory with one .gguf file"
        )
    raise ModelSourceError(f"{source}: no such model directory or .gguf file")


def load_model(source: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """-> (model in eval mode, tokenizer, HF config dict without any quantization_config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = resolve_source(source)
    if gguf_file is not None:
        arch = _gguf_architecture(directory / gguf_file)
        if arch not in GGUF_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"{directory / gguf_file}: GGUF architecture {arch!r} is not supported; "
                f"supported: {sorted(GGUF_ARCHITECTURES)}"
            )
    else:
        cfg = json.loads((directory / "config.json").read_text())
        ModelShapes.from_hf_config(cfg)  # refuses unsupported architectures before loading weights
        if "quantization_config" in cfg:
            raise ModelSourceError(
                f"{directory}: already quantized/sparsified ({cfg['quantization_config'].get('quant_method')}); "
                "calibrate from the original dense model"
            )
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs)
    model.to(device).eval()
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF loader's marker, not ours
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    if config["architectures"][0] not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {config['architectures'][0]!r} is not supported; supported: {list(SUPPORTED_ARCHITECTURES)}"
        )
    for key in ("_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    # to_dict() stamps the running transformers version, as save_pretrained does. Kept: transformers 5
    # treats a local config.json without it as a Mistral-era export and warns on every tokenizer load
    # of the checkpoint (the Qwen2 tokenizer: "... incorrect regex pattern ... incorrect tokenization")
    # although the tokenizer is the model's own.
    config["torch_dtype"] = "bfloat16"
    config["dtype"] = "bfloat16"
    # GGUF loading drops the model's own max length; keep what the GGUF says.
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model, tokenizer, config


def export_weights(model, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The model's parameters under HF names, cast once (tied lm_head left out)."""
    state = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if "rotary_emb" in name:
            continue
        state[name] = tensor.detach().to("cpu", dtype).contiguous()
    return state


def tokenizer_files(tokenizer, workdir: Path) -> list[Path]:
    """Save the tokenizer into workdir and list the files to copy into a checkpoint."""
    tokenizer.save_pretrained(workdir)
    return [workdir / name for name in TOKENIZER_FILES if (workdir / name).is_file()]


def write_dense_checkpoint(model, tokenizer, config: dict[str, Any], output_dir: Path, force: bool,
                           metadata: dict[str, Any]) -> Path:
    """A plain bf16 HF checkpoint (no quantization_config): the dense baseline."""
    from safetensors.torch import save_file

    from vllm_rsparse.checkpoint import atomic_output_dir, safetensors_metadata

    output_dir = Path(output_dir)
    with atomic_output_dir(output_dir, force) as tmp:
        save_file(export_weights(model), str(tmp / "model.safetensors"), metadata=safetensors_metadata(**metadata))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        with tempfile.TemporaryDirectory() as tok_dir:
            for f in tokenizer_files(tokenizer, Path(tok_dir)):
                shutil.copy2(f, tmp / f.name)
    return output_dir


def write_first_layers(source: str | Path, output_dir: Path, layers: int, base_model: str) -> Path:
    """A dense bf16 HF checkpoint of the model at `source` cut to its first `layers` decoder
    layers, cached: real weights and activations at a size the tests and CPU runs can afford."""
    output_dir = Path(output_dir)
    if (output_dir / "config.json").is_file():
        return output_dir
    model, tokenizer, config = load_model(source)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    config["num_hidden_layers"] = layers
    for key in ("layer_types",):  # per-layer lists must match the new depth
        if isinstance(config.get(key), list):
            config[key] = config[key][:layers]
    return write_dense_checkpoint(model, tokenizer, config, output_dir, force=True,
                                  metadata={"base_model": f"{base_model} (first {layers} layers)"})
