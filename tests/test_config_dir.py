"""Kernel tables tuned on the user's own GPU: $RSPARSE_CONFIG_DIR (launchers.CONFIG_DIR_ENV).

A table found in that folder replaces the package's (kernels/configs); a table it does not hold is the
package's. A folder that does not exist, a table that is not JSON and a config or ratio that is not one
fail with the file and the entry named -- in the front end, before a worker starts (the vLLM case in
test_bad_checkpoints.py) -- never as the package's tables served without a word.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

from vllm_rsparse import launchers

PACKAGE_TABLES = Path(__file__).resolve().parent.parent / "kernels" / "configs"
CONFIG = {"rows": 1, "block_n": 64, "block_k": 32, "split_k": 2, "num_warps": 4, "num_stages": 1, "kernel": "compact"}


def test_without_the_folder_the_package_tables_are_read(monkeypatch):
    monkeypatch.delenv(launchers.CONFIG_DIR_ENV, raising=False)
    for name in (launchers._CONFIG_FILE, launchers._DISPATCH_FILE):
        assert launchers._load_json(name) == json.loads((PACKAGE_TABLES / name).read_text())
    launchers.check_tables()  # the committed tables pass the check


def test_a_table_in_the_folder_replaces_the_package_one(tmp_path, monkeypatch):
    """The folder holds a dispatch table only: it is read, the config table stays the package's; the
    variable is read on each lookup, so a process that sets it later gets the folder's tables."""
    dispatch = {"gpu": "GPU T", "ratios": {"threshold": {"N64_K96": {"0.5": {"1": 0.5, "2": 0.8}}}}}
    (tmp_path / launchers._DISPATCH_FILE).write_text(json.dumps(dispatch))
    monkeypatch.setenv(launchers.CONFIG_DIR_ENV, str(tmp_path))
    assert launchers._load_json(launchers._DISPATCH_FILE) == dispatch
    assert launchers.crossover_tokens(64, 96, "threshold", 0.5) == 2
    assert launchers._load_json(launchers._CONFIG_FILE) == json.loads((PACKAGE_TABLES / launchers._CONFIG_FILE).read_text())
    launchers.check_tables()
    monkeypatch.delenv(launchers.CONFIG_DIR_ENV)
    assert launchers.crossover_tokens(64, 96, "threshold", 0.5) is None  # a shape the package never measured


def test_a_missing_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(launchers.CONFIG_DIR_ENV, str(tmp_path / "typo"))
    with pytest.raises(ValueError, match="RSPARSE_CONFIG_DIR=.*typo.* is not a folder"):
        launchers.check_tables()


@pytest.mark.parametrize("name, text, message", [
    ("sparse_gemv.json", "{not json", r"sparse_gemv.json is not valid JSON"),
    ("dispatch.json", "[1, 2]", r"dispatch.json must hold a JSON object, got list"),
    ("sparse_gemv.json", json.dumps({"configs": {"N64_K96": {"1": {"rows": 1}}}}),
     r"sparse_gemv.json: configs/N64_K96/1 is not a config \(KeyError"),
    ("sparse_gemv.json", json.dumps({"by_gpu": {"GPU T": {"configs_high": {"N64_K96": {"2": {**CONFIG, "rows": 3}}}}}}),
     r"by_gpu/GPU T/configs_high/N64_K96/2 is not a config \(ValueError: GemvConfig.rows"),
    ("sparse_gemv.json", json.dumps({"configs": {"N64_K96": {"one": CONFIG}}}), r"configs/N64_K96/one is not a config"),
    ("dispatch.json", json.dumps({"ratios": {"threshold": {"N64_K96": {"0.5": {"1": "fast"}}}}}),
     r"dispatch.json: ratios/threshold/N64_K96/0.5/1 = 'fast' is not a sparse / dense time ratio"),
    ("dispatch.json", json.dumps({"by_gpu": {"GPU T": {"ratios": {"topk": {"N64_K96": {"half": {"1": 0.5}}}}}}}),
     r"by_gpu/GPU T/ratios/topk/N64_K96/half/1 = 0.5 is not a sparse"),
    ("dispatch.json", json.dumps({"ratios": {"threshold": {"N64_K96": [0.5]}}}),
     r"ratios/threshold/N64_K96 must be a JSON object, got \[0.5\]"),
    ("sparse_gemv.json", json.dumps({"by_gpu": {"GPU T": []}}), r"by_gpu/GPU T must be a JSON object")])
def test_a_bad_table_in_the_folder_names_the_file_and_the_entry(tmp_path, monkeypatch, name, text, message):
    (tmp_path / name).write_text(text)
    monkeypatch.setenv(launchers.CONFIG_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match=message) as err:
        launchers.check_tables()
    assert str(tmp_path / name) in str(err.value)  # the file, whole: the user's folder, not the package's


def test_an_adopting_run_writes_a_folder_the_launcher_reads(tmp_path, monkeypatch):
    """The workflow of README's RSPARSE_CONFIG_DIR knob: a tuning script's --adopt DIR writes both tables
    (the ones read before, with the run's choices), and RSPARSE_CONFIG_DIR=DIR serves them. Here
    union_rows.adopt on a GPU other than the tables' own, then the launcher on that GPU."""
    union_rows = load_benchmark("gpu/union_rows.py")
    union = {**CONFIG, "rows": 2, "block_n": 128, "num_stages": 2}
    rows = [{"n": 4096, "k": 14336, "band": "configs", "tokens": 2, "sparsity": 0.5, "dense_us": 40.0,
             "committed_us": 48.0, "committed_config": CONFIG, "per_row_us": 48.0, "per_row_config": CONFIG,
             "union_us": 30.0, "union_config": union, "union_max_rel_err_vs_per_row": 1e-3}]
    monkeypatch.delenv(launchers.CONFIG_DIR_ENV, raising=False)
    union_rows.adopt(rows, str(tmp_path), "run.json", gpu="GPU T")
    monkeypatch.setenv(launchers.CONFIG_DIR_ENV, str(tmp_path))
    launchers.check_tables()
    assert launchers.config_table("GPU T")["configs"]["N4096_K14336"]["2"] == union
    assert launchers.dispatch_table("GPU T")["ratios"]["threshold"]["N4096_K14336"]["0.5"]["2"] == 0.75
    assert launchers.config_table("NVIDIA H200")["configs"]["N4096_K14336"]["2"] != union


def test_the_tables_note_says_whose_measurements_a_gpu_runs(tmp_path, monkeypatch):
    """launchers.tables_note, the line each GPU worker logs once: the committed tables' GPU and the GPUs
    with entries beside them; a GPU with none of its own is told so (a warning in the worker) and where
    to read how to measure it; with RSPARSE_CONFIG_DIR the folder's table is the one named."""
    monkeypatch.delenv(launchers.CONFIG_DIR_ENV, raising=False)
    own, line = launchers.tables_note("NVIDIA H200")
    assert own and line.count("(this GPU's own)") == 2
    own, line = launchers.tables_note("NVIDIA H100 80GB HBM3")
    assert own and "re-measured on NVIDIA H100 80GB HBM3 (this GPU reads its entries where they exist)" in line
    own, line = launchers.tables_note("NVIDIA A100-SXM4-80GB")
    assert not own and "no entries of its own" in line and launchers.CONFIG_DIR_ENV in line
    (tmp_path / launchers._DISPATCH_FILE).write_text(json.dumps({"gpu": "NVIDIA A100-SXM4-80GB", "ratios": {}}))
    monkeypatch.setenv(launchers.CONFIG_DIR_ENV, str(tmp_path))
    own, line = launchers.tables_note("NVIDIA A100-SXM4-80GB")
    assert own and f"{tmp_path / launchers._DISPATCH_FILE} measured on NVIDIA A100-SXM4-80GB (this GPU's own)" in line
