"""RSparseParameter: per-shard loading of merged layers and tensor-parallel slicing.

A real single-process vLLM distributed state is initialised (gloo); ranks of a larger
tensor-parallel group are then played by setting the parameter's tp_rank/tp_size, the
two numbers vLLM's own loaders read.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")


@pytest.fixture(scope="module", autouse=True)
def vllm_distributed():
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    from vllm_rsparse.serving import free_port

    with set_current_vllm_config(VllmConfig()):
        ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                        distributed_init_method=f"tcp://127.0.0.1:{free_port()}")
        ps.initialize_model_parallel(1, 1)
        try:
            yield
        finally:
            # Later tests build real engines in this process: leave no global state.
            ps.destroy_model_parallel()
            ps.destroy_distributed_environment()


def make(kind, data, members, input_side, input_dim, output_sizes=None, tp=(0, 1)):
    from vllm_rsparse.parameters import RSparseParameter

    param = RSparseParameter(data=data, weight_loader=lambda *a, **k: None, kind=kind,
                             member_names=[f"{m}.rsparse_{kind}" for m in members],
                             input_side=input_side, input_dim=input_dim, output_sizes=output_sizes)
    param.tp_rank, param.tp_size = tp
    return param


QKV = ["l.q_proj", "l.k_proj", "l.v_proj"]


def test_qkv_threshold_slots_collapse_when_equal():
    p = make("threshold", torch.full((3, 1), float("nan")), QKV, True, None)
    for shard in "qkv":
        p.load_qkv_weight(torch.tensor([0.25]), shard_id=shard, num_heads=1)
    assert p.finalize().tolist() == [0.25]


def test_missing_shard_names_the_tensor():
    from vllm_rsparse.checkpoint import CheckpointError

    p = make("threshold", torch.full((3, 1), float("nan")), QKV, True, None)
    p.load_qkv_weight(torch.tensor([0.25]), shard_id="q", num_heads=1)
    p.load_qkv_weight(torch.tensor([0.25]), shard_id="v", num_heads=1)
    with pytest.raises(CheckpointError, match="missing tensor 'l.k_proj.rsparse_threshold'"):
        p.finalize()


def test_disagreeing_shared_copies_are_refused():
    from vllm_rsparse.checkpoint import CheckpointError

    p = make("threshold", torch.full((3, 1), float("nan")), QKV, True, None)
    for shard, value in zip("qkv", (0.25, 0.5, 0.25)):
        p.load_qkv_weight(torch.tensor([value]), shard_id=shard, num_heads=1)
    with pytest.raises(CheckpointError, match="'l.q_proj.rsparse_threshold' and 'l.k_proj.rsparse_threshold' differ"):
        p.finalize()


def test_wrong_shape_is_refused_with_the_name():
    from vllm_rsparse.checkpoint import CheckpointError

    p = make("score_weight", torch.zeros(2, 8), ["l.gate_proj", "l.up_proj"], True, 0)
    with pytest.raises(CheckpointError, match=r"'l.up_proj.rsparse_score_weight' has shape \[7\], expected \[8\]"):
        p.load_merged_column_weight(torch.ones(7), shard_id=1, shard_offset=0, shard_size=8)


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_row_parallel_input_side_tensors_are_sliced_by_rank(tp_rank):
    full = torch.arange(2 * 8, dtype=torch.float32).reshape(2, 8)  # lowrank_down [r=2, K=8]
    p = make("lowrank_down", torch.zeros(1, 2, 4), ["l.o_proj"], True, 1, tp=(tp_rank, 2))
    p.load_row_parallel_weight(full)
    torch.testing.assert_close(p.finalize(), full[:, 4 * tp_rank: 4 * tp_rank + 4])


@pytest.mark.parametrize("tp_rank", [0, 1, 2, 3])
def test_qkv_lowrank_up_rows_follow_the_weight_with_kv_replication(tp_rank):
    """4 query heads, 2 KV heads, head_dim 1, tp=4: each rank holds 1 q row and one of the
    2 k/v rows (KV heads replicated over 2 ranks), exactly like the weight."""
    rank_r = 3
    q_full = torch.arange(4 * rank_r, dtype=torch.float32).reshape(4, rank_r)
    k_full = 100 + torch.arange(2 * rank_r, dtype=torch.float32).reshape(2, rank_r)
    v_full = 200 + torch.arange(2 * rank_r, dtype=torch.float32).reshape(2, rank_r)
    p = make("lowrank_up", torch.zeros(3, rank_r), QKV, False, None, output_sizes=[1, 1, 1], tp=(tp_rank, 4))
    replicas = 2  # num_kv_head_replicas = tp / kv_heads
    p.load_qkv_weight(q_full, shard_id="q", shard_offset=0, shard_size=1, num_heads=replicas)
    p.load_qkv_weight(k_full, shard_id="k", shard_offset=1, shard_size=1, num_heads=replicas)
    p.load_qkv_weight(v_full, shard_id="v", shard_offset=2, shard_size=1, num_heads=replicas)
    got = p.finalize()
    torch.testing.assert_close(got[0], q_full[tp_rank])
    torch.testing.assert_close(got[1], k_full[tp_rank // replicas])
    torch.testing.assert_close(got[2], v_full[tp_rank // replicas])
