"""vllm-rsparse: training-free activation sparsity (R-Sparse, LaRoSA, TEAL) for vLLM.

``register()`` is the ``vllm.general_plugins`` entry point. vLLM calls plugin entry
points in every process, sometimes more than once: it imports lazily and is
idempotent. Nothing here imports vLLM at package import time, so calibration and
the checkpoint tools work without an engine installed.
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register the "rsparse" quantization method and the rsparse custom op with vLLM."""
    global _registered
    if _registered:
        return
    # Importing the module registers RSparseConfig and the custom op.
    from vllm_rsparse import batch_invariant, ops, vllm_integration  # noqa: F401

    batch_invariant.sync_attention_backend()
    _registered = True
