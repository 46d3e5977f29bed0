"""rsparse-eval: task loading, the loglikelihood scorer's accounting, and the harness
end to end through real vLLM on the tiny model (strict vs dense-prompt protocols)."""

from __future__ import annotations

import json
import math

import pytest

from vllm_rsparse.evaluation import tasks
from vllm_rsparse.evaluation.harness import EvalConfig, zeroshot


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_tasks_load_with_valid_labels(task):
    full = tasks.load_task(task)
    expected = {"arc_easy": 570, "arc_challenge": 299, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267}
    assert len(full) == expected[task]
    subset = tasks.load_task(task, limit=25)
    assert len(subset) == 25 and subset == tasks.load_task(task, limit=25)  # seeded: same every time
    for ex in subset:
        assert 0 <= ex.label < len(ex.pairs) and len(ex.pairs) >= 2
        for ctx, cont in ex.pairs:
            assert ctx and cont.startswith(" ")


def test_unknown_task_and_bad_config():
    with pytest.raises(ValueError, match="unknown task"):
        tasks.task_dir("mmlu")
    with pytest.raises(ValueError, match="protocol"):
        EvalConfig(checkpoint="x", protocol="half")
    with pytest.raises(ValueError, match="max_model_len"):
        EvalConfig(checkpoint="x", ppl_seq_len=2048, max_model_len=1024)
    EvalConfig(checkpoint="x", ppl_windows=0, ppl_seq_len=2048, max_model_len=256)  # no ppl: no check


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no such checkpoint directory"),
    (["{tmp}", "--limit", "-1"], r"--limit must be >= 0 \(0 = the full validation split\), got -1"),
    # an output the result could not be written to, found before the evaluation, not after it
    (["{tmp}", "-o", "{missing}/result.json"], r"-o .*/nope/result.json: its directory .*/nope does not exist"),
    (["{tmp}", "-o", "{tmp}"], r"-o .*: is a directory; give a file name"),
])
def test_cli_refuses_bad_arguments_before_any_engine(tmp_path, capsys, args, message):
    """A checkpoint path that is not a directory is named as such (vLLM would read it as a hub repo
    id and refuse its characters), and --limit speaks the CLI's terms (0 = full split)."""
    import re

    from vllm_rsparse.evaluation.cli import main

    argv = [a.format(missing=tmp_path / "nope", tmp=tmp_path) for a in args]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


class _FakeTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 97 for c in text]


class _FakeScorer:
    """log p = -1 per token, except tokens of the word 'right' (-0.1): the scorer must
    sum only the continuation's tokens and pick the highest."""

    tokenizer = _FakeTokenizer()

    def token_logprobs(self, prompts):
        good = set(_FakeTokenizer().encode("right"))
        return [[-0.1 if t in good else -1.0 for t in p[1:]] for p in prompts]


def test_zeroshot_accounting_with_a_fake_scorer():
    ex = [tasks.Example(pairs=(("Q:", " xyz"), ("Q:", " right")), label=1),
          tasks.Example(pairs=(("Q:", " right"), ("Q:", " no")), label=1)]
    out = zeroshot(_FakeScorer(), ex)
    assert out["n"] == 2 and out["acc"] == 0.5
    assert math.isclose(out["acc_stderr"], math.sqrt(0.25 / 1))
    assert out["correct"] == [1, 0]  # per example, in order (paired comparisons)


def test_report_paired_delta():
    """The report's zero-shot delta vs dense pairs examples: mean of per-example
    differences, se from their spread (here task a: +1 on 1 of 4, task b: 0)."""
    from benchmark_scripts import load_benchmark

    eq = load_benchmark("eval_quality.py")
    dense = {"limit": 4, "zeroshot_correct": {"a": [1, 0, 0, 1], "b": [1, 1, 0, 0]}}
    row = {"limit": 4, "zeroshot_correct": {"a": [1, 1, 0, 1], "b": [1, 1, 0, 0]}}
    delta, se = eq.paired_delta(row, dense)
    assert math.isclose(delta, (0.25 + 0.0) / 2)
    assert math.isclose(se, math.sqrt(0.25 / 4) / 2)  # var of [0,1,0,0] = 0.25 (n-1), / n
    assert eq.paired_delta({**row, "limit": 8}, dense) is None  # different subsets: not paired


def test_report_markdown_lists_superseded_values(tmp_path):
    """A row re-measured after a calibration change keeps its old numbers in
    'before_rank_alignment'; quality.md prints them under the model's table."""
    from benchmark_scripts import load_benchmark

    eq = load_benchmark("eval_quality.py")
    base = {"model": "m", "zeroshot": {}, "zeroshot_n": {}, "zeroshot_avg": None, "calibration": {}}
    rows = [{**base, "method": "dense", "sparsity": 0.0, "ppl": 10.0, "achieved_sparsity": None},
            {**base, "method": "rsparse", "sparsity": 0.4, "ppl": 12.0, "achieved_sparsity": 0.39,
             "before_rank_alignment": {"ppl": 12.5, "achieved_sparsity": 0.395, "zeroshot_avg": 0.437,
                                       "limit": 200, "zeroshot_avg_delta": -0.024, "zeroshot_avg_delta_se": 0.0122}}]
    report = {"commit": "0" * 40, "machine": "test", "protocol": "p", "protocol_details": "d", "results": rows}
    eq.write_markdown(report, tmp_path / "q.md")
    text = (tmp_path / "q.md").read_text()
    assert "| rsparse | 0.4 | 0.390 | 12.000 | +2.00 |" in text
    assert "rsparse 0.4: ppl 12.500 (achieved 0.395), zero-shot avg 0.437 (n = 200, d -2.4 (1.2))" in text


@pytest.mark.vllm
def test_eval_harness_through_vllm(tiny_model_dir, calibrated_dirs, tmp_path):
    """Strict protocol sparsifies the prompt (ppl changes); dense-prompt runs prefill dense
    (ppl equals the dense model's). Accuracies are valid fractions. The CLI writes JSON."""
    import gc

    from vllm_rsparse.evaluation.cli import main
    from vllm_rsparse.evaluation.harness import evaluate

    small = dict(tasks=("arc_easy", "winogrande"), limit=4, ppl_windows=1, ppl_seq_len=128, max_model_len=256)
    dense = evaluate(EvalConfig(checkpoint=str(tiny_model_dir), **small))
    gc.collect()
    sparse_strict = evaluate(EvalConfig(checkpoint=str(calibrated_dirs[0.5]), **small))
    gc.collect()
    sparse_prompt = evaluate(EvalConfig(checkpoint=str(calibrated_dirs[0.5]), protocol="dense-prompt", **small))
    gc.collect()
    p_dense = dense["perplexity"]["ppl"]
    # 2 of SmolLM2's 30 layers: a real but truncated model, so its ppl is huge (observed 3.0e7);
    # only the comparisons between protocols mean something here.
    assert math.isfinite(p_dense) and p_dense > 1
    ratios = (sparse_strict["perplexity"]["ppl"] / p_dense, sparse_prompt["perplexity"]["ppl"] / p_dense)
    assert abs(ratios[0] - 1) > 0.01, ratios  # strict sparsifies the prompt: observed x1.78
    assert abs(ratios[1] - 1) < 1e-3, ratios  # dense-prompt: same dense prefill, observed x1.0
    for result in (dense, sparse_strict):
        for task, v in result["zeroshot"].items():
            assert v["n"] == 4 and 0 <= v["acc"] <= 1, task
    out = tmp_path / "eval.json"
    assert main([str(tiny_model_dir), "--tasks", "piqa", "--limit", "2", "--ppl-windows", "0",
                 "--max-model-len", "256", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["zeroshot"]["piqa"]["n"] == 2
