"""vLLM parameters for the rsparse tensors, loaded per checkpoint shard.

Two layouts, because the tensors of a merged layer (qkv_proj, gate_up_proj) come
from several checkpoint projections:

* input-side tensors (threshold [1], score_weight [K], lowrank_down [r, K]) belong
  to the shared input: every member carries a copy, each lands in its own slot
  ([num_shards, ...]) and ``finalize`` checks the copies agree and keeps one.
  Row-parallel layers see an input slice, so K-sized dims are sliced by TP rank.
* output-side tensors (lowrank_up [N, r]) are laid out like the weight: member
  rows at the member's offset, sliced by TP rank like the weight's rows (with
  vLLM's KV-head replication when tp > num_kv_heads).

Every load checks the shape and records which shard arrived, raising errors that
name the checkpoint tensor: vLLM's own loaders would assert or, for a tensor that
never arrives, leave the parameter uninitialised.
"""

from __future__ import annotations

import torch
from vllm.model_executor.parameter import BasevLLMParameter

from vllm_rsparse.checkpoint import CheckpointError

QKV_SLOTS = {"q": 0, "k": 1, "v": 2}


class RSparseParameter(BasevLLMParameter):
    """One rsparse tensor of a (possibly merged) linear layer."""

    def __init__(
        self,
        data: torch.Tensor,
        weight_loader,
        *,
        kind: str,
        member_names: list[str],
        input_side: bool,
        input_dim: int | None,
        output_sizes: list[int] | None = None,
    ):
        super().__init__(data=data, weight_loader=weight_loader)
        self.kind = kind
        self.member_names = member_names  # checkpoint tensor name per shard slot
        self.input_side = input_side
        self.input_dim = input_dim  # dim of the loaded tensor to slice for row parallel
        self.output_sizes = output_sizes  # per-member rows on this rank (output side)
        self.loaded_slots: set[int] = set()

    # -- vLLM loader entry points -------------------------------------------------
    def load_column_parallel_weight(self, loaded_weight: torch.Tensor):
        self._load(0, loaded_weight, row_parallel=False, shard_offset=0, shard_rank=self.tp_rank)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor):
        self._load(0, loaded_weight, row_parallel=True, shard_offset=0, shard_rank=0)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs):
        slot = int(kwargs["shard_id"])
        self._load(slot, loaded_weight, row_parallel=False,
                   shard_offset=kwargs.get("shard_offset"), shard_rank=self.tp_rank)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs):
        shard_id = kwargs["shard_id"]
        slot = QKV_SLOTS[shard_id] if isinstance(shard_id, str) else int(shard_id)
        # k/v heads are replicated when tp > num_kv_heads: rank r reads head r // replicas.
        rank = self.tp_rank if shard_id == "q" else self.tp_rank // kwargs["num_heads"]
        self._load(slot, loaded_weight, row_parallel=False,
                   shard_offset=kwargs.get("shard_offset"), shard_rank=rank)

    # -- shared logic --------------------------------------------------------------
    def _name(self, slot: int) -> str:
        return self.member_names[slot] if slot < len(self.member_names) else f"{self.member_names[0]}[shard {slot}]"

    def _load(self, slot: int, loaded: torch.Tensor, *, row_parallel: bool, shard_offset, shard_rank: int):
        name = self._name(slot)
        if loaded.ndim == 0:
            loaded = loaded.reshape(1)
        if self.input_side:
            target = self.data[slot]
            if row_parallel and self.input_dim is not None and self.tp_size > 1:
                part = target.shape[self.input_dim]
                full = part * self.tp_size
                if loaded.shape[self.input_dim] != full:
                    raise CheckpointError(
                        f"tensor {name!r} has shape {list(loaded.shape)}, expected "
                        f"{self._full_shape(target.shape, full)}"
                    )
                loaded = loaded.narrow(self.input_dim, self.tp_rank * part, part)
        else:
            rows = self.output_sizes[slot]
            offset = sum(self.output_sizes[:slot]) if shard_offset is None or row_parallel else shard_offset
            target = self.data.narrow(0, offset, rows)
            if not row_parallel and self.tp_size > 1:
                if loaded.shape[0] < (shard_rank + 1) * rows:
                    raise CheckpointError(
                        f"tensor {name!r} has {loaded.shape[0]} rows, too few for tensor-parallel "
                        f"rank {self.tp_rank} ({rows} rows per rank)"
                    )
                loaded = loaded.narrow(0, shard_rank * rows, rows)
        if tuple(loaded.shape) != tuple(target.shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {list(loaded.shape)}, expected {list(target.shape)}"
                + (f" on each of {self.tp_size} tensor-parallel ranks" if self.tp_size > 1 else "")
            )
        target.copy_(loaded)
        self.loaded_slots.add(slot)

    @staticmethod
    def _full_shape(part_shape, full: int) -> list[int]:
        shape = list(part_shape)
        shape[-1] = full
        return shape

    def finalize(self, dummy_weights: bool = False) -> torch.Tensor:
        """Check completeness/finiteness/agreement; return the tensor the kernels use.

        With vLLM's load_format="dummy" nothing is loaded from disk (every parameter,
        ours included, is filled with random values): only the layout is kept, for
        speed runs on random weights.
        """
        num_slots = len(self.member_names)
        if dummy_weights:
            return self.data[0] if self.input_side else self.data
        for slot in range(num_slots):
            if slot not in self.loaded_slots:
                raise CheckpointError(
                    f"checkpoint is missing tensor {self._name(slot)!r} (vLLM would have left it uninitialised)"
                )
        data = self.data
        if not torch.isfinite(data.float()).all():
            bad = [self._name(s) for s in range(num_slots)
                   if not torch.isfinite((data[s] if self.input_side else data).float()).all()]
            raise CheckpointError(f"tensor {bad[0]!r} has NaN or Inf values")
        if not self.input_side:
            return data
        for slot in range(1, num_slots):
            if not torch.equal(data[slot], data[0]):
                raise CheckpointError(
                    f"tensors {self._name(0)!r} and {self._name(slot)!r} differ, but they belong to "
                    "projections that share one input and must be identical"
                )
        return data[0]
