"""What a calibration method hands to the checkpoint writer."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vllm_rsparse.config import ModuleSettings


@dataclasses.dataclass
class CalibrationResult:
    modules: dict[str, ModuleSettings]  # vLLM group name -> settings
    tensors: dict[str, torch.Tensor]  # "<hf module>.rsparse_<kind>" -> tensor
    # Weights that replace the model's own (LaRoSA folds rotations into them).
    weight_overrides: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    config_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    rotation: str | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)  # goes to quantization_config.calibration
