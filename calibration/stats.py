"""Activation statistics from calibration text, collected with forward hooks.

The hooks sit on the first projection of each input group (q_proj for q/k/v,
gate_proj for gate/up, o_proj, down_proj): the group's members see the same input.
They are registered together and always removed together, even on error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from tqdm.auto import tqdm

from vllm_rsparse import architectures
from vllm_rsparse.architectures import ModelShapes

# callback(group_name, x [T, K] float32) for every calibration batch
Observer = Callable[[str, torch.Tensor], None]


def group_input_modules(model, shapes: ModelShapes) -> dict[str, torch.nn.Module]:
    """vLLM group name -> the HF module whose input is the group's input."""
    modules = dict(model.named_modules())
    out = {}
    for group_name, group in architectures.iter_groups(shapes):
        base = group_name[: -len(group.merged_name)]
        out[group_name] = modules[base + group.members[0]]
    return out


@contextlib.contextmanager
def observe_group_inputs(model, shapes: ModelShapes, observer: Observer):
    handles = []
    try:
        for name, module in group_input_modules(model, shapes).items():
            def hook(mod, args, _name=name):
                x = args[0]
                observer(_name, x.detach().reshape(-1, x.shape[-1]).float())

            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def run_calibration_forward(model, windows: torch.Tensor, shapes: ModelShapes, observer: Observer,
                            desc: str = "calibration", batch_size: int = 1) -> None:
    """Forward every window once with the observer attached. windows [B, T] token ids."""
    device = next(model.parameters()).device
    with observe_group_inputs(model, shapes, observer):
        for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="window"):
            model(windows[start:start + batch_size].to(device), use_cache=False)


class LogHistogram:
    """Counts of positive values on a log scale: quantiles without keeping the data.

    8192 bins over 1e-10..1e4 give ~0.4% relative resolution, far finer than the
    step between sparsity levels; exact zeros are counted apart.
    """

    LOG10_LO, LOG10_HI, BINS = -10.0, 4.0, 8192

    def __init__(self, device="cpu"):
        self.counts = torch.zeros(self.BINS, dtype=torch.float64, device=device)
        self.zeros = 0
        self.total = 0

    def add(self, values: torch.Tensor) -> None:
        values = values.reshape(-1)
        positive = values[values > 0]
        self.zeros += values.numel() - positive.numel()
        self.total += values.numel()
        logs = positive.log10().clamp(self.LOG10_LO, self.LOG10_HI)
        self.counts += torch.histc(logs, bins=self.BINS, min=self.LOG10_LO, max=self.LOG10_HI).double()

    def quantile(self, q: float) -> float:
        """Value below which a fraction q of all added values lie (q in [0, 1))."""
        if self.total == 0:
            raise ValueError("no calibration values were observed")
        target = q * self.total - self.zeros
        if target <= 0:
            return 0.0
        cum = torch.cumsum(self.counts, 0)
        idx = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype, device=cum.device)))
        idx = min(idx, self.BINS - 1)
        below = float(cum[idx - 1]) if idx > 0 else 0.0
        frac = (target - below) / max(float(self.counts[idx]), 1.0)
        width = (self.LOG10_HI - self.LOG10_LO) / self.BINS
        return 10.0 ** (self.LOG10_LO + (idx + frac) * width)
