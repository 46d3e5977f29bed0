"""The code paths of the GPU full-validation-set quality run (benchmarks/gpu/quality_*.sh),
checked on the CPU without starting vLLM: task rows without `datasets`, the Wikipedia
articles without gensim, the engine options, and the report's separate GPU table."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

from vllm_rsparse.evaluation import tasks
from vllm_rsparse.evaluation.harness import EngineOptions, EvalConfig

REPO = Path(__file__).resolve().parent.parent


def _eval_quality():
    return load_benchmark("eval_quality.py")


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_pyarrow_rows_equal_datasets_rows(task, monkeypatch):
    """Without `datasets` (the GPU image), load_task reads the Arrow files with pyarrow:
    the same rows in the same order, hence the same examples and the same seeded subsets."""
    datasets = pytest.importorskip("datasets")
    folder = tasks.task_dir(task)
    ref = datasets.load_from_disk(str(folder))
    rows = tasks._ArrowRows(folder)
    assert len(rows) == len(ref)
    assert all(rows[i] == ref[i] for i in range(len(ref)))
    full, subset = tasks.load_task(task), tasks.load_task(task, limit=50)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    assert isinstance(tasks.load_rows(folder), tasks._ArrowRows)
    assert tasks.load_task(task) == full and tasks.load_task(task, limit=50) == subset


def test_articles_file_replaces_gensim(tmp_path, monkeypatch):
    """Without gensim, calibration/data.py reads $RSPARSE_CACHE/wiki_articles.json
    (written where gensim is installed): the same calibration and held-out texts."""
    pytest.importorskip("gensim")
    from vllm_rsparse.calibration import data

    calib, held = data.calibration_text(), data.heldout_text()
    monkeypatch.setenv("RSPARSE_CACHE", str(tmp_path))
    data.write_articles_file(tmp_path / data.ARTICLES_FILE)
    monkeypatch.setitem(sys.modules, "gensim", None)
    monkeypatch.setitem(sys.modules, "gensim.corpora", None)
    monkeypatch.setitem(sys.modules, "gensim.corpora.wikicorpus", None)
    data.wiki_articles.cache_clear()
    try:
        assert data.calibration_text() == calib and data.heldout_text() == held
        saved = json.loads((tmp_path / data.ARTICLES_FILE).read_text())
        saved["articles"][0] += " tampered"
        (tmp_path / data.ARTICLES_FILE).write_text(json.dumps(saved))
        data.wiki_articles.cache_clear()
        with pytest.raises(RuntimeError, match="sha256"):
            data.wiki_articles()
        (tmp_path / data.ARTICLES_FILE).unlink()
        data.wiki_articles.cache_clear()
        with pytest.raises(ImportError):  # neither gensim nor the file: the original error
            data.wiki_articles()
    finally:
        data.wiki_articles.cache_clear()


def test_engine_options_defaults_and_cli():
    # CPU defaults unchanged: one max_model_len of tokens per step, nothing else set
    # (and eager: the committed quality rows' mode)
    assert EngineOptions().llm_kwargs(1024) == {"max_num_batched_tokens": 1024, "enforce_eager": True}
    gpu = EngineOptions(max_num_batched_tokens=16384, max_num_seqs=512, gpu_memory_utilization=0.1, kv_cache_gib=4)
    assert gpu.llm_kwargs(1024) == {"max_num_batched_tokens": 16384, "max_num_seqs": 512, "enforce_eager": True,
                                    "gpu_memory_utilization": 0.1, "kv_cache_memory_bytes": 4 * 2**30}
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EvalConfig(checkpoint="x", engine=EngineOptions(max_num_batched_tokens=512))
    from vllm_rsparse.evaluation.cli import build_parser

    ns = build_parser().parse_args(["ckpt", "--max-num-batched-tokens", "16384", "--kv-cache-gib", "4"])
    assert (ns.max_num_batched_tokens, ns.max_num_seqs, ns.kv_cache_gib, ns.compiled) == (16384, None, 4.0, False)
    assert build_parser().parse_args(["ckpt", "--compiled"]).compiled


def _gpu_row(method, correct, ppl, model="smollm2"):
    n = {t: len(c) for t, c in correct.items()}
    acc = {t: sum(c) / len(c) for t, c in correct.items()}
    return {"model": model, "method": method, "sparsity": 0.0 if method == "dense" else 0.4, "ppl": ppl,
            "zeroshot": acc, "zeroshot_n": n, "zeroshot_stderr": {t: 0.0 for t in n},
            "zeroshot_avg": sum(acc.values()) / len(acc), "zeroshot_correct": correct,
            "achieved_sparsity": None if method == "dense" else 0.39,
            "calibration": {} if method == "dense" else {"device": "cuda", "calibration_s": 12.0},
            "eval_seconds": 50.0, "protocol": "strict: ...", "ppl_setup": {"windows": 4, "seq_len": 512, "tokens": 2044},
            "engine": {"max_num_batched_tokens": 16384}, "limit": 0, "tasks": "a,b", "machine": "NVIDIA H200",
            "versions": {"vllm": "0.26.0"}, "commit": "abc123", "run": "gpu-full-validation",
            "calibration_setup": {"num_samples": 8, "seq_len": 512}}


def test_report_adds_a_gpu_table_and_keeps_the_cpu_rows(tmp_path):
    eq = _eval_quality()
    path = tmp_path / "gpu.jsonl"
    for row in (_gpu_row("dense", {"a": [1, 0, 0, 1], "b": [1, 1, 0, 0]}, 14.0),
                _gpu_row("teal", {"a": [1, 1, 0, 1], "b": [1, 1, 0, 0]}, 16.0)):
        eq.append_row(path, row)
    report = json.loads((REPO / "benchmarks" / "results" / "quality.json").read_text())
    eq.add_gpu_results(report, path)
    gpu = report["gpu_full_validation"]
    teal = next(r for r in gpu["results"] if r["method"] == "teal")
    assert teal["zeroshot_avg_delta"] == 0.125 and "zeroshot_correct" not in teal
    out = tmp_path / "quality.md"
    eq.write_markdown(report, out)
    text = out.read_text()
    assert "## Full validation sets (GPU)" in text and "| teal | 0.4 | 0.390 | 16.000 | +2.00 |" in text
    assert "+12.50" in text and "NVIDIA H200" in text
    # the CPU part of the report is untouched: without the GPU rows it is the committed quality.md
    eq.add_gpu_results(report, tmp_path / "missing.jsonl")
    assert "gpu_full_validation" not in report
    eq.write_markdown(report, out)
    committed = (REPO / "benchmarks" / "results" / "quality.md").read_text()
    # the committed report may carry the GPU section: the CPU part is the rest
    assert out.read_text() == re.sub(r"## Full validation sets \(GPU\)\n.*?(?=^## )", "", committed,
                                     flags=re.S | re.M)


def test_report_gpu_table_has_a_section_per_model_from_several_files(tmp_path):
    """SmolLM2's and Qwen's rows in their own files (quality_gpu_full.jsonl and
    quality_gpu_full_qwen.jsonl): one GPU table section per model, each paired against its own
    dense; a model run with other settings (Qwen: 2 ppl windows, other engine) says so."""
    eq = _eval_quality()
    smol, qwen = tmp_path / "quality_gpu_full.jsonl", tmp_path / "quality_gpu_full_qwen.jsonl"
    for row in (_gpu_row("dense", {"a": [1, 0, 0, 1], "b": [1, 1, 0, 0]}, 14.0),
                _gpu_row("teal", {"a": [1, 1, 0, 1], "b": [1, 1, 0, 0]}, 16.0)):
        eq.append_row(smol, row)
    for method, correct, ppl in (("dense", {"a": [1, 1, 1, 1], "b": [1, 1, 0, 0]}, 25.0),
                                 ("larosa", {"a": [1, 1, 0, 1], "b": [1, 0, 0, 0]}, 27.5),
                                 ("larosa-threshold-greedy", {"a": [1, 1, 1, 1], "b": [1, 1, 0, 0]}, 30.0)):
        row = _gpu_row(method, correct, ppl, model="qwen")
        row["ppl_setup"] = {"windows": 2, "seq_len": 512, "tokens": 1022}
        row["engine"] = {"max_num_batched_tokens": 32768}
        eq.append_row(qwen, row)
    assert eq.gpu_result_paths(f"{smol},{qwen}") == [smol, qwen]
    report = json.loads((REPO / "benchmarks" / "results" / "quality.json").read_text())
    eq.add_gpu_results(report, f"{smol},{tmp_path / 'missing.jsonl'},{qwen}")
    gpu = report["gpu_full_validation"]
    assert gpu["source"] == f"{smol}, {qwen}"
    by = {(r["model"], r["method"]): r for r in gpu["results"]}
    assert by["smollm2", "teal"]["zeroshot_avg_delta"] == 0.125  # against SmolLM2's dense
    assert by["qwen", "larosa"]["zeroshot_avg_delta"] == -0.25  # against Qwen's dense, not SmolLM2's
    assert by["qwen", "larosa-threshold-greedy"]["zeroshot_avg_delta"] == 0.0
    out = tmp_path / "quality.md"
    eq.write_markdown(report, out)
    text = out.read_text()
    gpu_part = text[text.index("## Full validation sets (GPU)"):]
    assert gpu_part.count("## Full validation sets (GPU)") == 1
    assert gpu_part.index("### qwen") < gpu_part.index("### smollm2")
    qwen_part = gpu_part[gpu_part.index("### qwen"):gpu_part.index("### smollm2")]
    assert "| larosa | 0.4 | 0.390 | 27.500 | +2.50 |" in qwen_part and "-25.00" in qwen_part
    assert "| larosa-threshold-greedy (best combination) | 0.4 |" in qwen_part
    assert '"windows": 2' in qwen_part and '"windows": 4' not in qwen_part
    assert f"`{smol}`" in gpu_part and f"`{qwen}`" in gpu_part
    smol_part = gpu_part[gpu_part.index("### smollm2"):]
    assert "| teal | 0.4 | 0.390 | 16.000 | +2.00 |" in smol_part and "+12.50" in smol_part
    # the header takes the first row's (qwen's) engine; SmolLM2's own is named in its section
    assert "vLLM engine for smollm2" in smol_part and "vLLM engine for qwen" not in qwen_part
