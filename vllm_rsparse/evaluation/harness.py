"""Quality of a checkpoint measured THROUGH vLLM: held-out perplexity and zero-shot accuracy.

Every number comes from vLLM's ``prompt_logprobs`` on the served checkpoint (the real
serving path: the rsparse LinearMethod, its CPU/GPU kernels, bf16). Protocols:

* "strict" (default): RSPARSE_MAX_SPARSE_TOKENS=all, so the sparse path runs for every
  token, prompt included (a prompt is prefill, which would otherwise run dense). Every
  scored token has passed through sparse layers at every position before it.
* "dense-prompt": the configured max_sparse_tokens applies, so prefill of the prompt
  is dense. prompt_logprobs are all computed in prefill, so this equals dense on
  single-pass scoring: it is offered for checking the harness, not as a result.

Why not lm-evaluation-harness: its tasks fetch datasets from the hub (none here) and
its vLLM backend starts vLLM with its own arguments; the scorer below implements the
same loglikelihood requests and prompts (see ``tasks``) on local data, in ~100 lines.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from vllm_rsparse.config import MAX_SPARSE_TOKENS_ENV
from vllm_rsparse.evaluation.tasks import Example, load_task

PROTOCOLS = ("strict", "dense-prompt")
STRICT_PROTOCOL = ("strict: RSPARSE_MAX_SPARSE_TOKENS=all, the sparse path runs on every token including the "
                   "prompt; scores are vLLM prompt_logprobs (bf16, enforce_eager)")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    checkpoint: str
    tasks: tuple[str, ...] = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande")
    limit: int | None = 200  # examples per task (a fixed seeded subset); None = full split
    ppl_windows: int = 8
    ppl_seq_len: int = 512
    protocol: str = "strict"
    max_model_len: int = 1024
    seed: int = 1234
    engine: "EngineOptions" = None  # vLLM batching/memory options; None = the CPU defaults

    def __post_init__(self):
        if self.engine is None:
            object.__setattr__(self, "engine", EngineOptions())
        self.engine.llm_kwargs(self.max_model_len)  # refuses a step smaller than one sequence
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol is {self.protocol!r}; allowed values are {list(PROTOCOLS)}")
        if self.ppl_windows > 0 and self.ppl_seq_len + 1 > self.max_model_len:
            raise ValueError(f"ppl_seq_len {self.ppl_seq_len} needs max_model_len > it, got {self.max_model_len}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How vLLM batches the scoring prompts; none of it changes a score's definition.

    The defaults are the CPU settings (one max_model_len of tokens per step, vLLM's
    default max_num_seqs and memory). On a GPU, larger steps (e.g. 16384 tokens, 512
    sequences) cut the eager step count by 16x; under the strict protocol every step of
    more than 16 tokens runs the masked reference path (vllm_rsparse.reference), so the
    numbers stay those of the sparse model. kv_cache_gib fixes the KV cache size
    (vLLM's kv_cache_memory_bytes: no memory profiling), which lets several evaluations
    share one GPU; gpu_memory_utilization is then only vLLM's start-up free-memory check.
    """

    max_num_batched_tokens: int | None = None  # None: max_model_len
    max_num_seqs: int | None = None  # None: vLLM's default
    gpu_memory_utilization: float | None = None  # None: vLLM's default
    kv_cache_gib: float | None = None  # None: vLLM sizes the KV cache itself
    # False: vLLM's default torch.compile (and CUDA graphs on a GPU), the mode a server runs in.
    # Compiled kernels round differently in the last bits, which a threshold mask turns into other
    # selected channels: on SmolLM2 TEAL 0.5 the compiled perplexity is 0.3-3.8% above eager, where
    # dense moves by 0.04% (benchmarks/results/compiled_cpu*.md). The committed quality rows are eager.
    enforce_eager: bool = True

    def llm_kwargs(self, max_model_len: int) -> dict:
        out = {"max_num_batched_tokens": self.max_num_batched_tokens or max_model_len,
               "enforce_eager": self.enforce_eager}
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < max_model_len:
            raise ValueError(f"max_num_batched_tokens {self.max_num_batched_tokens} < max_model_len {max_model_len}")
        if self.max_num_seqs is not None:
            out["max_num_seqs"] = self.max_num_seqs
        if self.gpu_memory_utilization is not None:
            out["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.kv_cache_gib is not None:
            out["kv_cache_memory_bytes"] = int(self.kv_cache_gib * 2**30)
        return out


class VllmScorer:
    """Token log-probabilities of prompts from one vLLM instance (reused for all prompts)."""

    def __init__(self, checkpoint: str | Path, protocol: str = "strict", max_model_len: int = 1024,
                 engine: EngineOptions | None = None):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol is {protocol!r}; allowed values are {list(PROTOCOLS)}")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from vllm import LLM

        # The rsparse layers read the override when vLLM builds them: set it for the
        # construction only, so a caller's environment is left as it was.
        previous = os.environ.get(MAX_SPARSE_TOKENS_ENV)
        if protocol == "strict":
            os.environ[MAX_SPARSE_TOKENS_ENV] = "all"
        else:
            os.environ.pop(MAX_SPARSE_TOKENS_ENV, None)
        try:
            self.llm = LLM(model=str(checkpoint), max_model_len=max_model_len,
                           dtype="bfloat16", enable_prefix_caching=False, seed=0,
                           **(engine or EngineOptions()).llm_kwargs(max_model_len))
        finally:
            if previous is None:
                os.environ.pop(MAX_SPARSE_TOKENS_ENV, None)
            else:
                os.environ[MAX_SPARSE_TOKENS_ENV] = previous
        self.tokenizer = self.llm.get_tokenizer()

    def token_logprobs(self, prompts: list[list[int]]) -> list[list[float]]:
        """For each prompt [t0..tn-1]: log p(t_i | t_<i) for i = 1..n-1."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        result = []
        for prompt, out in zip(prompts, outs):
            lps = out.prompt_logprobs[1:]
            result.append([float(d[t].logprob) for d, t in zip(lps, prompt[1:])])
        return result


def perplexity(scorer: VllmScorer, windows) -> dict:
    """windows [B, T] token ids -> {"ppl", "tokens"} (every token after a window's first)."""
    lps = scorer.token_logprobs([w.tolist() for w in windows])
    total = sum(sum(x) for x in lps)
    count = sum(len(x) for x in lps)
    return {"ppl": math.exp(-total / count), "tokens": count}


def zeroshot(scorer: VllmScorer, examples: list[Example]) -> dict:
    """-> {"acc", "acc_norm", "n", "acc_stderr", "correct"} over the examples ("correct":
    0/1 per example in order, for paired comparisons between checkpoints)."""
    tok = scorer.tokenizer
    prompts, spans = [], []
    for ex in examples:
        for ctx, cont in ex.pairs:
            ctx_ids = tok.encode(ctx, add_special_tokens=False)
            cont_ids = tok.encode(cont, add_special_tokens=False)
            prompts.append(ctx_ids + cont_ids)
            spans.append(len(cont_ids))
    lps = scorer.token_logprobs(prompts)
    correct = correct_norm = 0
    hits = []  # per example 0/1, in order: lets a report pair two runs on the same examples
    i = 0
    for ex in examples:
        scores, norms = [], []
        for ctx, cont in ex.pairs:
            ll = sum(lps[i][-spans[i]:])
            scores.append(ll)
            norms.append(ll / max(len(cont), 1))
            i += 1
        hit = int(max(range(len(scores)), key=scores.__getitem__) == ex.label)
        hits.append(hit)
        correct += hit
        correct_norm += int(max(range(len(norms)), key=norms.__getitem__) == ex.label)
    n = len(examples)
    acc = correct / n
    return {"acc": acc, "acc_norm": correct_norm / n, "n": n,
            "acc_stderr": math.sqrt(acc * (1 - acc) / max(n - 1, 1)), "correct": hits}


def evaluate(config: EvalConfig) -> dict:
    """Perplexity on held-out Wikipedia windows plus zero-shot accuracy per task."""
    from vllm_rsparse.calibration import data

    scorer = VllmScorer(config.checkpoint, config.protocol, config.max_model_len, config.engine)
    out: dict = {"checkpoint": str(config.checkpoint), "protocol": config.protocol,
                 "engine": {"max_model_len": config.max_model_len, **config.engine.llm_kwargs(config.max_model_len)},
                 "protocol_text": STRICT_PROTOCOL if config.protocol == "strict" else
                 "dense-prompt: configured max_sparse_tokens; prompts run dense"}
    if config.ppl_windows > 0:
        windows = data.token_windows(scorer.tokenizer, data.heldout_text(), config.ppl_windows,
                                     config.ppl_seq_len, source="held-out text")
        out["perplexity"] = {**perplexity(scorer, windows), "windows": config.ppl_windows,
                             "seq_len": config.ppl_seq_len, "text": "held-out Wikipedia articles (gensim test data)"}
    out["zeroshot"] = {}
    for task in config.tasks:
        out["zeroshot"][task] = zeroshot(scorer, load_task(task, config.limit, config.seed))
    if out["zeroshot"]:
        out["zeroshot_avg"] = sum(v["acc"] for v in out["zeroshot"].values()) / len(out["zeroshot"])
    return out
