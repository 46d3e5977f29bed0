"""PyTorch simulation of an rsparse configuration on a transformers model (fp32).

For screening methods quickly (no vLLM start, no checkpoint written) and for checking
that vLLM serves what calibration meant: every member projection's forward is
replaced, inside the context only, by ``reference.sparse_linear`` with the group's
settings and tensors -- the same function the runtime's reference path calls.
"""

from __future__ import annotations

import contextlib

import torch

from vllm_rsparse import architectures, reference
from vllm_rsparse.architectures import ModelShapes
from vllm_rsparse.checkpoint import tensor_name
from vllm_rsparse.config import ModuleSettings


@contextlib.contextmanager
def simulated_sparsity(model, shapes: ModelShapes, modules: dict[str, ModuleSettings],
                       tensors: dict[str, torch.Tensor]):
    """Patch every member projection of ``model`` to its sparse forward; always restored."""
    named = dict(model.named_modules())
    patched = []
    try:
        for group_name, group in architectures.iter_groups(shapes):
            s = modules[group_name]
            if s.selection == "dense":
                continue
            base = group_name[: -len(group.merged_name)]
            for member in group.members:
                name = base + member
                lin = named[name]
                get = lambda kind, _n=name: tensors.get(tensor_name(_n, kind))  # noqa: E731

                def forward(x, _lin=lin, _s=s, _get=get):
                    return reference.sparse_linear(
                        x, _lin.weight, _lin.bias,
                        threshold=_get("threshold") if _s.selection == "threshold" else None,
                        keep=_s.keep if _s.selection == "topk" else None,
                        channel_scale=_get("score_weight"),
                        lowrank_up=_get("lowrank_up"), lowrank_down=_get("lowrank_down"),
                    )

                patched.append((lin, lin.forward))
                lin.forward = forward
        yield
    finally:
        for lin, original in patched:
            lin.forward = original
