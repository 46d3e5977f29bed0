"""PCA rotation of the residual stream, folded into the weights offline (LaRoSA).

Why folding: an online ``x Q`` inside each linear layer reads a d x d matrix per
rotated input (+~16% weight reads per layer on Llama-2-7B, most of the gain). With
ONE global Q the whole residual stream can live in the rotated basis instead:

    h~ = h Q                                   (residual stream, row vectors)
    RMSNorm(h~) = RMSNorm(h) Q                 once gamma = 1 (norm is rotation-invariant)
    E' = E Q                                   embedding rows
    W_in' = W_in diag(gamma) Q                 q/k/v (input_layernorm), gate/up (post_attention_layernorm)
    W_out' = Q^T W_out                         o_proj, down_proj (write into the stream)
    L' = L diag(gamma_final) Q                 lm_head (untied from E when tied)

The result is still a plain Llama/Qwen2 checkpoint (norm weights all 1), so vLLM
loads it unchanged; q/k/v biases act on outputs, which are not rotated.

Per-layer rotations Q_l would need a residual adapter Q_l^T Q_{l+1} at runtime (one
d x d read per layer); they are only simulated here (``RotationSimulator``) to
measure what they would buy.

All rotation math is float64; the model keeps float32 weights and the checkpoint
writer casts to bf16 once (float32 rounding is 2^-16 of bf16's: invisible there).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from vllm_rsparse.architectures import ModelShapes
from vllm_rsparse.calibration.stats import run_calibration_forward

DAMPING = 0.01  # fraction of the mean diagonal added to H: keeps eigh stable when H is near-singular
ROTATED_KINDS = ("qkv", "gate_up")  # inputs that read the residual stream (after a norm)


def _layers(model):
    return model.model.layers


@torch.no_grad()
def fold_norm_gammas(model) -> None:
    """Fold every RMSNorm gamma into the weights that read the norm's output; gamma := 1.

    Exact in real arithmetic: W (gamma * n) = (W diag(gamma)) n.
    """
    def fold(norm, linears):
        gamma = norm.weight.double()
        for lin in linears:
            lin.weight.copy_((lin.weight.double() * gamma[None, :]).to(lin.weight.dtype))
        norm.weight.fill_(1.0)

    for layer in _layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj))
        fold(layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))
    _untie_lm_head(model)
    fold(model.model.norm, (model.lm_head,))


def _untie_lm_head(model) -> None:
    """Give lm_head its own weight: after rotation E' = E Q but L' = L diag(gamma) Q."""
    if model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None if not isinstance(model._tied_weights_keys, dict) else {}


@dataclasses.dataclass
class SecondMoments:
    """Uncentred second moments H = sum x^T x (float64) of the residual-reading inputs."""

    per_layer: list[torch.Tensor]  # [num_layers] of [d, d]
    tokens: int

    def global_moment(self) -> torch.Tensor:
        return sum(self.per_layer)


@torch.no_grad()
def collect_second_moments(model, shapes: ModelShapes, windows: torch.Tensor) -> SecondMoments:
    """H_l = sum over calibration tokens of x^T x for layer l's qkv and gate_up inputs.

    Call after ``fold_norm_gammas``: the inputs are then unit-gamma RMSNorm outputs,
    i.e. exactly what the rotated model feeds its sparse q/k/v and gate/up layers.
    """
    d = shapes.hidden
    moments = [torch.zeros(d, d, dtype=torch.float64) for _ in range(shapes.num_layers)]
    counted = [0]

    def observe(name: str, x: torch.Tensor) -> None:
        layer, kind = _parse_group(name)
        if kind in ROTATED_KINDS:
            x64 = x.double().cpu()
            moments[layer] += x64.t() @ x64
            if layer == 0 and kind == "qkv":
                counted[0] += x.shape[0]

    run_calibration_forward(model, windows, shapes, observe, desc="larosa: second moments")
    return SecondMoments(per_layer=moments, tokens=counted[0])


def _parse_group(name: str) -> tuple[int, str]:
    # "model.layers.3.self_attn.qkv_proj" -> (3, "qkv")
    parts = name.split(".")
    kind = {"qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "gate_up", "down_proj": "down"}[parts[-1]]
    return int(parts[2]), kind


def pca_rotation(moment: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Q [d, d] float64 orthogonal: eigenvectors of H + damping*mean(diag H)*I, largest first.

    Largest-variance directions first so that the top-k of x Q concentrates the energy.
    """
    if moment.ndim != 2 or moment.shape[0] != moment.shape[1]:
        raise ValueError(f"second moment must be square [d, d], got {list(moment.shape)}")
    h = moment.double()
    h = (h + h.t()) / 2  # symmetric to the last bit: eigh assumes it
    h = h + damping * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    _, vectors = torch.linalg.eigh(h)
    return vectors.flip(-1).contiguous()


@torch.no_grad()
def rotate_residual_stream(model, q: torch.Tensor) -> None:
    """Apply h~ = h Q to the (gamma-folded) model in place. q [d, d] float64 orthogonal."""
    q = q.double().to(model.model.embed_tokens.weight.device)  # the moments are summed on the CPU

    def right(lin):  # W [d_out, d] reads the stream: W Q
        lin.weight.copy_((lin.weight.double() @ q).to(lin.weight.dtype))

    def left(lin):  # W [d, d_in] writes the stream: Q^T W (and its bias, if any)
        lin.weight.copy_((q.t() @ lin.weight.double()).to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_((lin.bias.double() @ q).to(lin.bias.dtype))

    emb = model.model.embed_tokens
    emb.weight.copy_((emb.weight.double() @ q).to(emb.weight.dtype))
    for layer in _layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            right(lin)
        left(attn.o_proj)
        left(mlp.down_proj)
    right(model.lm_head)


@dataclasses.dataclass
class GlobalRotation:
    q: torch.Tensor  # [d, d] float64
    moments: SecondMoments
    info: dict


def fold_global_rotation(model, shapes: ModelShapes, windows: torch.Tensor) -> GlobalRotation:
    """Fold gammas, compute ONE PCA rotation from all layers' inputs, rotate in place.

    Returns the rotation (float64) and the moments (kept for the per-layer comparison).
    The model afterwards has untied lm_head and unit norm weights.
    """
    fold_norm_gammas(model)
    moments = collect_second_moments(model, shapes, windows)
    q = pca_rotation(moments.global_moment())
    rotate_residual_stream(model, q)
    info = {"rotation": "global PCA of sum_l (H_qkv,l + H_gate_up,l), float64 eigh",
            "damping": DAMPING, "rotation_tokens": moments.tokens}
    return GlobalRotation(q=q, moments=moments, info=info)


class RotationSimulator:
    """PyTorch-only simulation of LaRoSA on a gamma-folded, UNrotated model.

    For layer l's qkv/gate_up input x: x -> topk(x Q_l) Q_l^T (= what W Q_l sees after
    top-k of the rotated input); o/down inputs: plain top-k. With Q_l = Q for every l it
    equals the folded global model; with per-layer Q_l it is what a residual adapter
    would give. keep per group is (1 - s) * d_in.
    """

    def __init__(self, model, shapes: ModelShapes, rotations: list[torch.Tensor], sparsity: float):
        if len(rotations) != shapes.num_layers:
            raise ValueError(f"need one rotation per layer ({shapes.num_layers}), got {len(rotations)}")
        self.model, self.shapes, self.sparsity = model, shapes, sparsity
        self.rotations = [q.float() for q in rotations]

    def _keep(self, d_in: int) -> int:
        return round((1.0 - self.sparsity) * d_in)

    @contextlib.contextmanager
    def active(self):
        from vllm_rsparse.reference import topk_mask

        handles = []
        try:
            for l, layer in enumerate(_layers(self.model)):
                q = self.rotations[l]
                attn, mlp = layer.self_attn, layer.mlp

                def rotated(mod, args, _q=q):
                    x = args[0]
                    xr = x.reshape(-1, x.shape[-1]).float() @ _q
                    m = topk_mask(xr, self._keep(xr.shape[-1]))
                    return ((xr * m) @ _q.t()).reshape(x.shape).to(x.dtype), *args[1:]

                def plain(mod, args):
                    x = args[0]
                    x2 = x.reshape(-1, x.shape[-1])
                    m = topk_mask(x2, self._keep(x2.shape[-1]))
                    return (x2 * m).reshape(x.shape), *args[1:]

                for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                    handles.append(lin.register_forward_pre_hook(rotated))
                for lin in (attn.o_proj, mlp.down_proj):
                    handles.append(lin.register_forward_pre_hook(plain))
            yield
        finally:
            for h in handles:
                h.remove()


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    """Token-level perplexity of windows [B, T] (every token after the first is scored)."""
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(windows.shape[0]):
        ids = windows[i:i + 1].to(device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return float(torch.exp(torch.tensor(nll / count)))
