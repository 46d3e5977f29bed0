"""Bad checkpoints are refused with a message that names the problem.

Each case is checked twice: by ``validate_checkpoint`` directly, and by building a
real vLLM engine over the broken directory (the plugin validates in the front end,
before any weight is loaded, because vLLM itself would leave a missing tensor
uninitialised). The original checkpoint is never modified: each case works on a copy.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_helpers import make_llm
from vllm_rsparse.checkpoint import CheckpointError, validate_checkpoint
from vllm_rsparse.config import RSparseConfigError

TENSOR = "model.layers.1.self_attn.k_proj.rsparse_threshold"


def edit_tensors(fn):
    def apply(ckpt):
        tensors = load_file(str(ckpt / "rsparse.safetensors"))
        fn(tensors)
        save_file(tensors, str(ckpt / "rsparse.safetensors"))
    return apply


def edit_config(fn):
    def apply(ckpt):
        cfg = json.loads((ckpt / "config.json").read_text())
        fn(cfg)
        (ckpt / "config.json").write_text(json.dumps(cfg))
    return apply


def corrupt_header(ckpt):
    path = ckpt / "rsparse.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"{not json at all" + b"!" * 16
    path.write_bytes(bytes(data))


def unsupported_architecture(cfg):
    cfg["architectures"] = ["MixtralForCausalLM"]
    cfg["num_local_experts"] = 8


CASES = {
    "missing-tensor": (edit_tensors(lambda t: t.pop(TENSOR)), rf"missing tensor '{TENSOR}'"),
    "wrong-shape": (edit_tensors(lambda t: t.__setitem__(TENSOR, torch.ones(3))),
                    rf"tensor '{TENSOR}' has shape \[3\], expected \[1\]"),
    "nan": (edit_tensors(lambda t: t.__setitem__(TENSOR, torch.tensor([float("nan")]))),
            rf"tensor '{TENSOR}' has NaN or Inf values"),
    "inf": (edit_tensors(lambda t: t.__setitem__(TENSOR, torch.tensor([float("inf")]))),
            rf"tensor '{TENSOR}' has NaN or Inf values"),
    "unknown-method": (edit_config(lambda c: c["quantization_config"].__setitem__("method", "magic")),
                       r"method is 'magic'; allowed values are"),
    "sparsity-1.5": (edit_config(lambda c: c["quantization_config"].__setitem__("target_sparsity", 1.5)),
                     r"target_sparsity must be in \[0, 1\), got 1.5"),
    "future-format": (edit_config(lambda c: c["quantization_config"].__setitem__("format_version", 2)),
                      r"format_version is 2; this vllm-rsparse reads format_version \[1\]"),
    "unknown-key": (edit_config(lambda c: c["quantization_config"].__setitem__("sparsity_typo", 0.5)),
                    r"unknown key\(s\) \['sparsity_typo'\]"),
    "module-missing": (edit_config(lambda c: c["quantization_config"]["modules"].pop(
        "model.layers.1.mlp.down_proj")), r"no entry for 1 module\(s\).*model.layers.1.mlp.down_proj"),
    "corrupted-header": (corrupt_header, r"corrupted safetensors header"),
    "truncated-in-header": (lambda ckpt: os.truncate(ckpt / "rsparse.safetensors", 100),
                            r"claims \d+ header bytes after the 8-byte length, but the file has 100 bytes in all: "
                            r"truncated"),
    "truncated-in-data": (lambda ckpt: os.truncate(ckpt / "rsparse.safetensors",
                                                   os.path.getsize(ckpt / "rsparse.safetensors") - 8),
                          r"corrupted safetensors file \(.*incomplete metadata, file not fully covered"),
    "unsupported-architecture": (edit_config(unsupported_architecture),
                                 r"architecture 'MixtralForCausalLM' is not supported by rsparse"),
}


@pytest.fixture
def broken(calibrated_dirs, tmp_path, request):
    edit, message = CASES[request.param]
    ckpt = tmp_path / "broken"
    shutil.copytree(calibrated_dirs[0.5], ckpt)
    edit(ckpt)
    return ckpt, message


@pytest.mark.parametrize("broken", list(CASES), indirect=True)
def test_validate_checkpoint_names_the_problem(broken):
    ckpt, message = broken
    with pytest.raises((CheckpointError, RSparseConfigError, ValueError), match=message):
        validate_checkpoint(ckpt)


# The architecture case is refused by vLLM's own model registry before our config is
# consulted (Mixtral is a different model class), so it is covered above only.
VLLM_CASES = [c for c in CASES if c != "unsupported-architecture"]


@pytest.mark.vllm
@pytest.mark.parametrize("broken", VLLM_CASES, indirect=True)
def test_vllm_refuses_the_checkpoint_with_the_message(broken):
    ckpt, message = broken
    with pytest.raises(Exception, match=message):
        with make_llm(ckpt):
            pass


@pytest.mark.vllm
@pytest.mark.parametrize("name,value,expected", [
    ("RSPARSE_PDL", "maybe", "expected 1"), ("RSPARSE_BATCH_INVARIANT", "yes please", "expected 1"),
    ("RSPARSE_LOWRANK_UP_PDL", "2", "expected 1"),
    ("RSPARSE_UNION_ROWS", "always", "expected one of table, on, off")])
def test_vllm_refuses_a_bad_switch_up_front(name, value, expected, calibrated_dirs, monkeypatch):
    """An environment switch with a value it does not take fails in the front end, before any
    worker starts, with the variable, the value and what it takes in the message."""
    monkeypatch.setenv(name, value)
    with pytest.raises(Exception, match=f"{name}='{value}': {expected}"):
        with make_llm(calibrated_dirs[0.5]):
            pass


@pytest.mark.vllm
def test_vllm_refuses_a_missing_table_folder_up_front(calibrated_dirs, monkeypatch, tmp_path):
    """RSPARSE_CONFIG_DIR naming no folder (a typo) fails in the front end, before a worker starts, with
    the variable and the path; it does not serve the package's tables instead (tests/test_config_dir.py)."""
    monkeypatch.setenv("RSPARSE_CONFIG_DIR", str(tmp_path / "tables-typo"))
    with pytest.raises(Exception, match="RSPARSE_CONFIG_DIR=.*tables-typo.* is not a folder"):
        with make_llm(calibrated_dirs[0.5]):
            pass


@pytest.mark.vllm
def test_vllm_refuses_quantization_rsparse_on_a_plain_model(tiny_model_dir):
    """--quantization rsparse on a model without an rsparse quantization_config (never calibrated)
    says that it needs a calibrated checkpoint and how to make one; before, vLLM's argument-less
    construction of the config class failed with a TypeError."""
    with pytest.raises(Exception, match="needs an rsparse checkpoint.*no quantization_config.*rsparse-calibrate"):
        with make_llm(tiny_model_dir, quantization="rsparse"):
            pass


def test_original_checkpoint_is_untouched_and_valid(calibrated_dirs):
    assert validate_checkpoint(calibrated_dirs[0.5])
