"""The fixed-cost probe's arithmetic and report (benchmarks/gpu/fixed_cost.py): the committed
markdown is what the committed JSON files give, and the fit recovers a known line."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


@pytest.fixture(scope="module")
def fixed_cost():
    return load_benchmark("gpu/fixed_cost.py")


def test_fit_line_recovers_fixed_cost_and_bandwidth(fixed_cost):
    # 5 us fixed + bytes at 3 TB/s, as the probe's (bytes, us) points
    points = [(b, 5.0 + b / 3e12 * 1e6) for b in (1e7, 3e7, 5e7, 9e7)]
    fixed_us, us_per_byte = fixed_cost.fit_line(points)
    assert fixed_us == pytest.approx(5.0)
    assert 1e-3 / us_per_byte == pytest.approx(3000.0)  # GB/s
    assert fixed_cost.fit_line([(1.0, 2.0), (1.0, 4.0)]) == (3.0, 0.0)  # no spread: no slope


def test_committed_report_matches_committed_measurements(fixed_cost, tmp_path):
    out = tmp_path / "fixed_cost.md"
    fixed_cost.write_report(str(out), str(RESULTS / "fixed_cost_h200.json"), str(RESULTS / "fixed_cost_chunks_h200.json"),
                            str(RESULTS / "fixed_cost_finish_h200.json"), str(RESULTS / "fixed_cost_reglist_h200.json"),
                            str(RESULTS / "fixed_cost_pdl_h200.json"), str(RESULTS / "fixed_cost_head_evict_h200.json"),
                            str(RESULTS / "fixed_cost_wide_word_h200.json"))
    assert out.read_text() == (RESULTS / "fixed_cost_h200.md").read_text()


def test_target_budget_is_the_stricter_time_bound_less_the_bytes(fixed_cost):
    """Issue 4's targets as a fixed-cost budget: at s = 0.5 both the 0.58x ratio and 80% of copy
    bandwidth bound the time; at 0.9 only the 0.2x ratio does."""
    # 40 MB selected at 4000 GB/s = 10 us; 0.58 x 20 us = 11.6 us beats 10 / 0.8 = 12.5 us
    half = fixed_cost.target_budget(dense_us=20.0, nbytes=40e6, s=0.5, copy_gbs=4000.0, floor_us=2.0)
    assert half["ratio_target_us"] == pytest.approx(11.6)
    assert half["bandwidth_target_us"] == pytest.approx(12.5)
    assert half["fixed_allowed_us"] == pytest.approx(1.6)
    assert half["cublas_like_ratio"] == pytest.approx((2.0 + 0.5 * 18.0) / 20.0)
    # a larger dense time: now the bandwidth bound is the stricter one
    wide = fixed_cost.target_budget(dense_us=30.0, nbytes=40e6, s=0.5, copy_gbs=4000.0, floor_us=2.0)
    assert wide["fixed_allowed_us"] == pytest.approx(2.5)
    tenth = fixed_cost.target_budget(dense_us=20.0, nbytes=8e6, s=0.9, copy_gbs=4000.0, floor_us=2.0)
    assert tenth["bandwidth_target_us"] is None
    assert tenth["fixed_allowed_us"] == pytest.approx(0.2 * 20.0 - 2.0)


def _band_rows(times, same_config=False):
    n, k = 4096, 4096
    rows = []
    for s, (t_design, t_high) in times.items():
        rows.append({"n": n, "k": k, "sparsity": s, "band": "configs", "sparse_us": t_design, "gemv_config": {"a": 1}})
        rows.append({"n": n, "k": k, "sparsity": s, "band": "configs_high", "sparse_us": t_high,
                     "gemv_config": {"a": 1} if same_config else {"a": 2}})
    return rows


def test_band_boundary_at_the_crossing_of_the_two_times(fixed_cost):
    # high band 31% slower at 0.8, 6% faster at 0.9: the times cross at 0.884 -> 0.89
    rows = _band_rows({0.5: (11.2, 17.8), 0.8: (7.1, 9.3), 0.9: (6.5, 6.1), 1.0: (5.2, 4.3)})
    assert fixed_cost.band_boundaries(rows, 0.7) == {"N4096_K4096": 0.89}
    # slower only inside the tolerance above 0.7: the boundary is the next measured point
    rows = _band_rows({0.7: (20.3, 22.8), 0.8: (16.7, 16.8), 0.9: (11.4, 11.2)})
    assert fixed_cost.band_boundaries(rows, 0.7) == {"N4096_K4096": 0.8}
    # never slower, the same config in both bands, or a boundary below the default: no entry
    assert fixed_cost.band_boundaries(_band_rows({0.5: (23.0, 22.6), 0.9: (8.9, 8.4)}), 0.7) == {}
    assert fixed_cost.band_boundaries(_band_rows({0.5: (10, 12), 0.9: (5, 6)}, True), 0.7) == {}
    assert fixed_cost.band_boundaries(_band_rows({0.5: (10, 12), 0.6: (9, 8)}), 0.7) == {}
    # the high band slower everywhere: never used
    assert fixed_cost.band_boundaries(_band_rows({0.5: (10, 12), 0.9: (5, 6)}), 0.7) == {"N4096_K4096": 1.01}


def test_committed_band_boundaries_match_the_measurement(fixed_cost):
    from vllm_rsparse import launchers

    measured = json.loads((RESULTS / "fixed_cost_h200.json").read_text())["rows"]
    table = launchers._load_json(launchers._CONFIG_FILE)
    assert fixed_cost.band_boundaries(measured, launchers.HIGH_SPARSITY_FROM) == table["high_from"]


@pytest.mark.parametrize("name", ["ncu", "ncu_fma", "ncu_fma_sum"])
def test_committed_ncu_report_matches_committed_counters(name, tmp_path):
    """benchmarks/gpu/ncu_profile.py --report rebuilds the committed Nsight Compute tables (the one-token
    probe of session 10, the 1 / 2-token FMA union probes of sessions 21 and 23) from the committed raw counters,
    case list and stall samples (every sparse case matched to its kernel)."""
    module = load_benchmark("gpu/ncu_profile.py")
    out = tmp_path / "ncu.md"
    module.write_report(str(RESULTS / f"{name}_raw_h200.csv"), str(RESULTS / f"{name}_cases_h200.json"), str(out),
                        str(RESULTS / f"{name}_source_h200.csv.gz"))
    assert out.read_text() == (RESULTS / f"{name}_h200.md").read_text()


def test_ncu_match_cases_shares_cublas_kernels_among_adjacent_dense_cases():
    """Adjacent dense cases (1 and 2 tokens of one shape) each get their own cuBLAS launches, in order;
    a run of cuBLAS kernels that cannot be shared evenly stops the report with the shape named."""
    module = load_benchmark("gpu/ncu_profile.py")
    dense = [{"kind": "dense", "shape": "down", "tokens": t} for t in (1, 2)]
    sparse = {"kind": "sparse", "shape": "down", "tokens": 2, "sparsity": 0.5}
    names = ["gemv_a", "reduce_a", "gemv_b", "reduce_b", "sparse_gemv_compact_kernel"]
    pairs = module.match_cases(dense + [sparse], [{"Kernel Name": n} for n in names])
    assert [(c.get("tokens"), k["Kernel Name"]) for c, k in pairs] == [
        (1, "gemv_a"), (1, "reduce_a"), (2, "gemv_b"), (2, "reduce_b"), (2, "sparse_gemv_compact_kernel")]
    with pytest.raises(SystemExit, match="3 cuBLAS kernels .* 2 adjacent dense cases of down"):
        module.match_cases(dense + [sparse], [{"Kernel Name": n} for n in names[1:]])


def test_ncu_match_cases_by_case_markers():
    """A profile whose cases each open with a marker launch gives every case exactly its own kernels
    (two dense cases with a different cuBLAS kernel count, an R-Sparse case's two launches); a profile
    that does not fit the case list stops the report and names what does not fit."""
    module = load_benchmark("gpu/ncu_profile.py")
    marker = {"Kernel Name": "void at::cuda::<unnamed>::spin_kernel(long)"}
    dense = [{"kind": "dense", "shape": "down", "tokens": t} for t in (1, 2)]
    sparse = {"kind": "sparse", "shape": "down", "tokens": 1, "sparsity": 0.5}
    runs = [["gemv_split", "reduce"], ["gemv"], ["sparse_gemv_compact_kernel", "lowrank_up_kernel"]]
    kernels = [k for run in runs for k in [marker] + [{"Kernel Name": n} for n in run]]
    pairs = module.match_cases(dense + [sparse], kernels)
    assert [(c["kind"], c["tokens"], k["Kernel Name"]) for c, k in pairs] == [
        ("dense", 1, "gemv_split"), ("dense", 1, "reduce"), ("dense", 2, "gemv"),
        ("sparse", 1, "sparse_gemv_compact_kernel"), ("sparse", 1, "lowrank_up_kernel")]
    with pytest.raises(SystemExit, match="3 case markers and the case list 2 cases"):
        module.match_cases(dense, kernels)
    with pytest.raises(SystemExit, match="before the first case marker"):
        module.match_cases(dense + [sparse], kernels[1:])
    with pytest.raises(SystemExit, match=r"\['gemv'\] do not fit the sparse case"):
        module.match_cases([dense[0], sparse, sparse], kernels)
    with pytest.raises(SystemExit, match="do not fit the dense case"):
        module.match_cases(dense + [dense[0]], kernels)
    with pytest.raises(SystemExit, match=r"\[\] do not fit the dense case"):
        module.match_cases(dense[:1], [marker])


def test_ncu_source_lines_follow_the_case_markers():
    """The SASS stall section names each sparse case's own sparse kernel: its blocks are matched to the
    cases as the raw rows are (markers, a dense case's cuBLAS kernels and a sparse case's epilogue skipped)."""
    module = load_benchmark("gpu/ncu_profile.py")
    cases = [{"kind": "dense", "shape": "o", "tokens": 1},
             {"kind": "sparse", "shape": "o", "tokens": 1, "sparsity": 0.5, "finish": "split 8"},
             {"kind": "sparse", "shape": "o", "tokens": 1, "sparsity": 0.9, "finish": "split 4"}]

    def block(name, samples):
        return {"name": name, "rows": [{"Warp Stall Sampling (All Samples)": str(n), "Source": f"LDG {name} {i}",
                                        "stall_long_scoreboard": str(n)} for i, n in enumerate(samples)]}

    marker = block("spin_kernel", [1])
    blocks = [marker, block("nvjet_gemv", [9]), marker, block("sparse_gemv_compact_kernel", [90, 10]),
              block("lowrank_up_kernel", [5]), marker, block("sparse_gemv_compact_kernel", [1, 99])]
    text = "\n".join(module.source_lines(blocks, {"cases": cases}))
    assert "nvjet" not in text and "lowrank_up" not in text and "spin" not in text
    assert "**o s = 0.5** (split 8, 2 instructions, 100 samples)" in text
    assert "| 0 | 90.0% | `LDG sparse_gemv_compact_kernel 0` | long_scoreboard 90 |" in text
    assert "**o s = 0.9** (split 4, 2 instructions, 100 samples)" in text
    assert "| 1 | 99.0% |" in text and "| 0 | 1.0% |" not in text


def test_ncu_profile_variants_make_one_case_per_sparsity_and_variant():
    """ncu_profile.py --variants: a dense case per token count, then per sparsity one sparse case per
    variant, each running its own config or what the launcher picks (per-row with union_rows off)."""
    module = load_benchmark("gpu/ncu_profile.py")
    fma = {"rows": 2, "block_n": 512, "block_k": 8, "split_k": 16, "num_warps": 4, "num_stages": 2,
           "kernel": "compact"}
    variants = [{"tokens": 2, "config": fma}, {"tokens": 2, "union_rows": "off"}, {"tokens": 1}]
    cases = module.cases(["llama2-7b/qkv"], [0.0, 0.5], variants)
    assert [(c["kind"], c["tokens"], c.get("sparsity")) for c in cases] == [
        ("dense", 1, None), ("dense", 2, None)] + [("sparse", t, s) for s in (0.0, 0.5) for t in (2, 2, 1)]
    n, k = cases[0]["n"], cases[0]["k"]
    assert module.variant_config(cases[2], n, k) == module.launchers.GemvConfig.from_dict(fma)
    assert module.variant_config(cases[3], n, k).rows == 1
    assert module.launchers.UNION_ROWS is None


def test_adopted_config_keeps_the_lowrank_layout(tmp_path, monkeypatch):
    """wide_tiles.py --adopt replaces a shape's one-token config by a faster one and keeps the
    R-Sparse v_t layout (GemvConfig.lowrank) that lowrank_time.py chose for that shape."""
    wide_tiles = load_benchmark("gpu/wide_tiles.py")
    committed = {"rows": 1, "block_n": 2048, "block_k": 4, "split_k": 64, "num_warps": 4, "num_stages": 1,
                 "kernel": "compact", "lowrank": "w_tiles"}
    table = {"note": "n", "configs": {"N28672_K4096": {"1": committed}}}
    monkeypatch.setattr(wide_tiles.launchers, "_load_json", lambda name: table)
    faster = {**committed, "block_n": 1024, "block_k": 8}
    del faster["lowrank"]
    rows = [{"shape": "llama3-8b/gate_up", "n": 28672, "k": 4096, "sparsity": 0.5, "config": "committed",
             "sparse_us": 40.0},
            {"shape": "llama3-8b/gate_up", "n": 28672, "k": 4096, "sparsity": 0.5, "config": "bn1024", "ratio": 0.6,
             "sparse_us": 30.0, "max_rel_err_vs_committed": 0.0, "gemv_config": faster}]
    out = tmp_path / "sparse_gemv.json"
    wide_tiles.adopt(rows, str(out))
    adopted = json.loads(out.read_text())["configs"]["N28672_K4096"]["1"]
    assert adopted == {**faster, "lowrank": "w_tiles"}


def test_adopted_config_on_another_gpu_goes_under_by_gpu(tmp_path, monkeypatch):
    """wide_tiles.py --adopt on a GPU other than the table's own writes the faster config under
    "by_gpu" for that GPU only: the main table keeps the sweeping GPU's config, and the committed
    config the rows raced (and whose R-Sparse layout is kept) is the one that GPU read."""
    wide_tiles = load_benchmark("gpu/wide_tiles.py")
    committed = {"rows": 1, "block_n": 512, "block_k": 16, "split_k": 56, "num_warps": 2, "num_stages": 1,
                 "kernel": "compact", "lowrank": "own_tiles"}
    table = {"gpu": "NVIDIA H200", "note": "n", "configs": {"N4096_K14336": {"1": committed, "2": committed}}}
    monkeypatch.setattr(wide_tiles.launchers, "_load_json", lambda name: table)
    faster = {**committed, "block_n": 128, "block_k": 64, "split_k": 7, "num_warps": 4, "lowrank": ""}
    rows = [{"shape": "llama3-8b/down", "n": 4096, "k": 14336, "sparsity": 0.5, "config": "committed",
             "sparse_us": 46.0},
            {"shape": "llama3-8b/down", "n": 4096, "k": 14336, "sparsity": 0.5, "config": "bn128", "ratio": 0.66,
             "sparse_us": 29.5, "max_rel_err_vs_committed": 0.0, "gemv_config": faster}]
    out = tmp_path / "sparse_gemv.json"
    wide_tiles.adopt(rows, str(out), "split_depth", gpu="NVIDIA H100 80GB HBM3")
    written = json.loads(out.read_text())
    assert written["configs"] == table["configs"] and written["note"] == "n"
    h100 = written["by_gpu"]["NVIDIA H100 80GB HBM3"]
    assert h100["configs"] == {"N4096_K14336": {"1": {**faster, "lowrank": "own_tiles"}}}
    assert "on NVIDIA H100 80GB HBM3" in h100["note"]
    # the same run on the table's own GPU replaces the main entry
    wide_tiles.adopt(rows, str(out), "split_depth", gpu="NVIDIA H200")
    assert json.loads(out.read_text())["configs"]["N4096_K14336"]["1"] == {**faster, "lowrank": "own_tiles"}


@pytest.mark.parametrize("name, title, shapes", [
    ("down_configs_h100", "Down-projection configs on the H100 (session 31)", ["llama2-7b/down", "llama3-8b/down"]),
    ("near_target_configs_h100", "Configs of the near-target shapes on the H100 (session 32)",
     ["llama2-7b/qkv", "llama2-7b/down", "llama3-8b/down"])])
def test_h100_config_races_report_matches_committed_files(name, title, shapes):
    """The H100's one-token config races are what wide_tiles.py --report makes of the committed JSONs:
    session 31 raced the down projections' committed configs against the split-depth and spill-free sets,
    session 32 the three shapes nearest issue 4's 0.5 targets (Llama-2 qkv, both downs) against the
    short-chunk, tiny-chunk and wide sets (26+ candidates per shape that run enough programs). None was
    faster by the adopt rule, so the H100's by_gpu entries of sparse_gemv.json hold no one-token config."""
    wide_tiles = load_benchmark("gpu/wide_tiles.py")
    record = json.loads((RESULTS / f"{name}.json").read_text())
    assert all(record[key] for key in ("commit", "gpu", "versions", "command")) and "H100" in record["gpu"]
    assert wide_tiles.report_markdown(record, title) == (RESULTS / f"{name}.md").read_text()
    for shape in shapes:
        rows = [r for r in record["rows"] if r["shape"] == shape]
        committed = next(r for r in rows if r["config"] == "committed")
        assert len(rows) > 25 and all(r["sparse_us"] >= wide_tiles.ADOPT_MAX_RATIO * committed["sparse_us"]
                                      for r in rows)
    h100 = wide_tiles.launchers._load_json(wide_tiles.launchers._CONFIG_FILE)["by_gpu"][record["gpu"]]
    assert all("1" not in per_shape for band in ("configs", "configs_high") for per_shape in h100.get(band, {}).values())


def test_pipelined_report_matches_committed_files():
    """pipelined_h200.md (session 27) is what wide_tiles.py --report makes of the committed JSON; the run
    records its commit, GPU, versions and command, and every candidate it timed ran the cp.async loop."""
    wide_tiles = load_benchmark("gpu/wide_tiles.py")
    record = json.loads((RESULTS / "pipelined_h200.json").read_text())
    assert all(record[key] for key in ("commit", "gpu", "versions", "command"))
    candidates = [r for r in record["rows"] if r["config"] != "committed"]
    assert candidates and all(r["gemv_config"]["num_stages"] in (2, 4) for r in candidates)
    assert wide_tiles.report_markdown(record, "The compact loop through Triton's cp.async pipeline (session 27)") \
        == (RESULTS / "pipelined_h200.md").read_text()


@pytest.mark.parametrize("name", ["topk_select_h200", "topk_select_warps_h100", "topk_select_warps_s31_h100"])
def test_topk_select_report_matches_committed_files(name):
    """The select timings (session 27 on the H200, sessions 30 and 31 on the H100) are what
    topk_select_time.py --report makes of the committed JSONs; every variant gave the radix select's
    (threshold, tie cut). In the runs over the bf16 span (the launcher's passes since session 28), the
    launcher's digit size for each row width is the fastest at its block size (launchers.hist_warps)."""
    module = load_benchmark("gpu/topk_select_time.py")
    record = json.loads((RESULTS / f"{name}.json").read_text())
    assert all(record[key] for key in ("commit", "gpu", "versions", "command"))
    assert all(value for row in record["rows"] for key, value in row.items() if key.endswith("same_result"))
    assert module.report_markdown(record) == (RESULTS / f"{name}.md").read_text()
    for row in record["rows"]:
        if module.has_span_variants(row):
            chosen, rivals = module.launcher_choice(row)
            assert len(rivals) == 4 and row[f"{chosen}_us"] == min(row[f"{r}_us"] for r in rivals)


def test_topk_select_variants():
    """topk_select_time.py times session 27's set under its names (passes over all 32 bits) and the passes
    over the bits that can be set ("_span") at every block width, every name once."""
    module = load_benchmark("gpu/topk_select_time.py")
    names = [v[0] for v in module.variants()]
    assert len(set(names)) == len(names) == 18
    assert names[:5] == ["radix16", "histogram4", "histogram5", "histogram6", "histogram8"]
    assert {"radix16_span", "histogram5_span", "histogram4_w32_span", "histogram8_w16_span"} <= set(names)
    assert all(span == name.endswith("_span") for name, _, _, span in module.variants())


def test_committed_kernels_merge_topk():
    """committed_kernels.py --merge-topk: exact top-k's crossover counts and ratios come from the run's
    larosa rows (every sparsity and token count it measured); the threshold and low-rank entries stay;
    a run without larosa rows is refused with a message that says so. A run on another GPU than the
    table's goes beside it (by_gpu), the table's own entries untouched."""
    module = load_benchmark("gpu/committed_kernels.py")
    dispatch = {"gpu": "GPU", "crossover": {"threshold": {"N1_K1": {"0.5": 4}}, "topk": {"N22016_K4096": {"0.5": 0}}},
                "ratios": {"threshold": {"x": 1}, "topk": {"N22016_K4096": {"0.5": {"1": 1.25}}},
                           "threshold_lowrank": {"y": 2}}}
    rows = [{"method": "larosa", "n": 22016, "k": 4096, "sparsity": s, "tokens": t, "sparse_ms": ms, "dense_ms": 1.0}
            for s, t, ms in [(0.5, 1, 0.8), (0.5, 2, 1.1), (0.9, 1, 0.5), (0.9, 2, 0.9)]]
    rows.append({"method": "teal", "n": 22016, "k": 4096, "sparsity": 0.5, "tokens": 1, "sparse_ms": 0.6,
                 "dense_ms": 1.0})
    merged = module.merge_topk({"commit": "abc1234", "gpu": "GPU", "results": rows}, dispatch)
    assert merged["crossover"]["topk"] == {"N22016_K4096": {"0.5": 1, "0.9": 2}}
    assert merged["ratios"]["topk"] == {"N22016_K4096": {"0.5": {"1": 0.8, "2": 1.1}, "0.9": {"1": 0.5, "2": 0.9}}}
    assert merged["crossover"]["threshold"] == dispatch["crossover"]["threshold"]
    assert merged["ratios"]["threshold_lowrank"] == {"y": 2} and "abc1234" in merged["topk_note"]
    assert dispatch["crossover"]["topk"] == {"N22016_K4096": {"0.5": 0}}  # the input is left alone
    with pytest.raises(SystemExit, match="larosa"):
        module.merge_topk({"commit": "c", "gpu": "g", "results": rows[-1:]}, dispatch)
    other = module.merge_topk({"commit": "abc1234", "gpu": "Other GPU", "results": rows}, dispatch)
    assert other["crossover"] == dispatch["crossover"] and other["ratios"] == dispatch["ratios"]
    beside = other["by_gpu"]["Other GPU"]
    assert beside["ratios"]["topk"] == merged["ratios"]["topk"] and beside["crossover"]["topk"] == merged["crossover"]["topk"]
    assert "abc1234" in beside["notes"]["topk"]


def test_bench_kernels_dispatch_candidate_keeps_what_it_did_not_measure(tmp_path, monkeypatch):
    """bench_kernels' dispatch.json candidate is the committed table with the measuring GPU's entries of the
    measured selections replaced: on the table's own GPU its main entries (the low-rank tables, their note and
    the other GPUs' entries stay; the notes on the replaced ratios go); on another GPU its by_gpu entry, the
    table's own entries untouched (before, the candidate was a new table for the measuring GPU that carried the
    committed GPU's low-rank ratios as its own and dropped every by_gpu entry)."""
    from vllm_rsparse import launchers

    module = load_benchmark("bench_kernels.py")
    committed = {"gpu": "GPU A", "commit": "old", "design_sparsity": 0.5, "union_note": "u", "lowrank_note": "l",
                 "crossover": {"threshold": {"N1_K1": {"0.5": 4}}, "topk": {"N1_K1": {"0.5": 1}}},
                 "ratios": {"threshold": {"N1_K1": {"0.5": {"1": 0.5}}}, "topk": {"N1_K1": {"0.5": {"1": 0.9}}},
                            "threshold_lowrank": {"N1_K1": {"0.5": {"1": 0.7}}},
                            "threshold_lowrank_one_token": {"N1_K1": {"0.5": {"2": 0.8}}}},
                 "by_gpu": {"GPU C": {"ratios": {"threshold": {"N1_K1": {"0.5": {"1": 0.6}}}}}}}
    monkeypatch.setattr(launchers, "_load_json", lambda name: committed)
    rows = [{"method": "teal", "n": 64, "k": 96, "sparsity": 0.5, "tokens": t, "sparse_ms": ms, "dense_ms": 1.0}
            for t, ms in [(1, 0.6), (2, 1.2)]]
    path = tmp_path / "dispatch.json"
    module.write_dispatch(str(path), {"gpu": "GPU A", "commit": "new"}, rows, "sweep", ratios=True, timing="g")
    own = json.loads(path.read_text())
    assert own["crossover"]["threshold"] == {"N64_K96": {"0.5": 1}} and own["crossover"]["topk"] == committed[
        "crossover"]["topk"]
    assert own["ratios"]["threshold"] == {"N64_K96": {"0.5": {"1": 0.6, "2": 1.2}}}
    assert {sel: own["ratios"][sel] for sel in ("topk", "threshold_lowrank", "threshold_lowrank_one_token")} == {
        sel: committed["ratios"][sel] for sel in ("topk", "threshold_lowrank", "threshold_lowrank_one_token")}
    assert own["by_gpu"] == committed["by_gpu"] and own["lowrank_note"] == "l" and "union_note" not in own
    assert (own["commit"], own["note"], own["timing"]) == ("new", "sweep", "g")
    module.write_dispatch(str(path), {"gpu": "GPU B", "commit": "new"}, rows, "sweep")
    beside = json.loads(path.read_text())
    assert {key: beside[key] for key in committed if key != "by_gpu"} == {
        key: committed[key] for key in committed if key != "by_gpu"}
    entry = beside["by_gpu"]["GPU B"]
    # no ratios measured: an empty threshold table there, so that this GPU's counts decide, not GPU A's ratios
    assert entry["crossover"] == {"threshold": {"N64_K96": {"0.5": 1}}} and entry["ratios"] == {"threshold": {}}
    assert entry["notes"] == {"threshold": "sweep"} and beside["by_gpu"]["GPU C"] == committed["by_gpu"]["GPU C"]


def test_union_rows_adopt_on_another_gpu_goes_under_by_gpu(tmp_path, monkeypatch):
    """union_rows.py --adopt on a GPU other than the tables' own writes its 2-16 token choices under
    sparse_gemv.json's by_gpu and its threshold ratios under dispatch.json's by_gpu, starting from the
    table the GPU read (a shape the run did not time keeps its ratios there); --one-token-from sets that
    GPU's one-token ratios, and refuses a run from another GPU. The tables' own entries stay."""
    union_rows = load_benchmark("gpu/union_rows.py")
    per_row = {"rows": 1, "block_n": 512, "block_k": 8, "split_k": 16, "num_warps": 4, "num_stages": 1,
               "kernel": "compact"}
    union = {**per_row, "rows": 2, "block_n": 1024}
    configs = {"gpu": "GPU A", "note": "n", "configs": {"N64_K96": {"1": per_row, "2": per_row}}}
    dispatch = {"gpu": "GPU A", "ratios": {"threshold": {"N64_K96": {"0.5": {"1": 0.7, "2": 1.2}},
                                                         "N32_K32": {"0.5": {"1": 0.9}}}}}
    monkeypatch.setattr(union_rows.launchers, "_load_json",
                        lambda name: configs if name == union_rows.launchers._CONFIG_FILE else dispatch)
    rows = [{"n": 64, "k": 96, "band": "configs", "tokens": 2, "sparsity": 0.5, "dense_us": 10.0,
             "committed_us": 12.0, "committed_config": per_row, "per_row_us": 12.0, "per_row_config": per_row,
             "union_us": 8.0, "union_config": union, "union_max_rel_err_vs_per_row": 1e-3}]
    one_token = union_rows.one_token_ratios(
        {"gpu": "GPU B", "results": [{"method": "teal", "n": 64, "k": 96, "tokens": 1, "sparsity": 0.5,
                                      "sparse_ms": 0.6, "dense_ms": 1.0},
                                     {"method": "larosa", "n": 64, "k": 96, "tokens": 1, "sparsity": 0.5,
                                      "sparse_ms": 0.9, "dense_ms": 1.0}]}, "GPU B")
    assert one_token == {"N64_K96": {"0.5": 0.6}}
    adopted = union_rows.adopt(rows, str(tmp_path), "run.json", gpu="GPU B", one_token=one_token)
    assert adopted and "8.0 us" in adopted[0]
    written = json.loads((tmp_path / "sparse_gemv.json").read_text())
    assert written["configs"] == configs["configs"] and written["note"] == "n"
    assert written["by_gpu"]["GPU B"]["configs"] == {"N64_K96": {"2": union}}
    assert "on GPU B" in written["by_gpu"]["GPU B"]["note"]
    # the same run adopted again onto what it wrote is recorded once
    monkeypatch.setattr(union_rows.launchers, "_load_json",
                        lambda name: json.loads((tmp_path / name).read_text()))
    union_rows.adopt(rows, str(tmp_path), "run.json", gpu="GPU B", one_token=one_token)
    assert json.loads((tmp_path / "sparse_gemv.json").read_text())["by_gpu"]["GPU B"]["note"] \
        == written["by_gpu"]["GPU B"]["note"]
    monkeypatch.setattr(union_rows.launchers, "_load_json",
                        lambda name: configs if name == union_rows.launchers._CONFIG_FILE else dispatch)
    table = json.loads((tmp_path / "dispatch.json").read_text())
    assert table["ratios"] == dispatch["ratios"] and "union_note" not in table
    assert table["by_gpu"]["GPU B"]["ratios"]["threshold"] == {"N64_K96": {"0.5": {"1": 0.6, "2": 0.8}},
                                                               "N32_K32": {"0.5": {"1": 0.9}}}
    assert "one token" in table["by_gpu"]["GPU B"]["notes"]["threshold"]
    with pytest.raises(SystemExit, match="GPU A"):
        union_rows.one_token_ratios({"gpu": "GPU A", "results": []}, "GPU B")
    # the tables' own GPU: the main entries, as before
    union_rows.adopt(rows, str(tmp_path), "run.json", gpu="GPU A")
    table = json.loads((tmp_path / "dispatch.json").read_text())
    assert table["ratios"]["threshold"]["N64_K96"]["0.5"] == {"1": 0.7, "2": 0.8} and "by_gpu" not in table
    assert json.loads((tmp_path / "sparse_gemv.json").read_text())["configs"]["N64_K96"]["2"] == union


def test_committed_kernels_combine_runs():
    """committed_kernels.py --merge-topk A B:SHAPE,...: the named shapes' larosa rows come from run B,
    every other shape's from A (teal rows dropped); both commits and B's select are named; runs from
    different GPUs are refused."""
    module = load_benchmark("gpu/committed_kernels.py")

    def run(commit, ms, hist=None, gpu="H100"):
        rows = [{"method": m, "shape": shape, "n": 4096, "k": k, "sparsity": 0.5, "tokens": 1, "sparse_ms": ms,
                 "dense_ms": 1.0} for shape, k in (("a/qkv", 4096), ("a/down", 11008)) for m in ("teal", "larosa")]
        return {"commit": commit, "gpu": gpu, "command": f"run {commit}", "hist_select": hist, "results": rows}

    combined = module.combine_runs([run("aaa", 0.7), run("bbb", 0.9, {"digit_bits": 5, "warps": 16})],
                                   [[], ["a/down"]])
    got = {(r["shape"], r["method"]): r["sparse_ms"] for r in combined["results"]}
    assert got == {("a/qkv", "larosa"): 0.7, ("a/down", "larosa"): 0.9}
    assert "aaa [a/qkv]" in combined["commit"] and "bbb [a/down]" in combined["commit"]
    assert "'warps': 16" in combined["commit"] and combined["gpu"] == "H100"
    # without a shape list the later run replaces every shape it has
    assert {r["sparse_ms"] for r in module.combine_runs([run("aaa", 0.7), run("bbb", 0.9)])["results"]} == {0.9}
    with pytest.raises(SystemExit, match="different GPUs"):
        module.combine_runs([run("aaa", 0.7), run("bbb", 0.9, gpu="H200")])


def test_e2e_config_switches(monkeypatch):
    """bench_e2e --configs: "method:sparsity[,RSPARSE_NAME=value...]" -- a plugin switch held while
    that one engine is built and measured (a switch against its default in one process), named in
    the results' method; anything else a clear error."""
    bench = load_benchmark("bench_e2e.py")
    assert bench.parse_spec("teal:0.5") == ("teal", 0.5, {})
    spec = "rsparse-thr:0.5,RSPARSE_LOWRANK_UP_PDL=1"
    assert bench.parse_spec(spec) == ("rsparse-thr", 0.5, {"RSPARSE_LOWRANK_UP_PDL": "1"})
    assert bench.method_label(spec) == "rsparse-thr[RSPARSE_LOWRANK_UP_PDL=1]"
    assert bench.method_label("dense:0") == "dense"
    for bad in ("teal", "teal:0.5,PATH=/tmp", "teal:0.5,RSPARSE_PDL"):
        with pytest.raises(ValueError, match="config"):
            bench.parse_spec(bad)
    monkeypatch.setenv("RSPARSE_PDL", "0")
    monkeypatch.delenv("RSPARSE_LOWRANK_UP_PDL", raising=False)
    with bench.spec_environment("rsparse-thr:0.5,RSPARSE_LOWRANK_UP_PDL=1,RSPARSE_PDL=1"):
        assert os.environ["RSPARSE_LOWRANK_UP_PDL"] == "1" and os.environ["RSPARSE_PDL"] == "1"
    assert "RSPARSE_LOWRANK_UP_PDL" not in os.environ and os.environ["RSPARSE_PDL"] == "0"
    rows = bench.result_rows(
        "m", ["dense:0", spec], {
            "dense:0": {"decode": [{"batch": 1, "prompt_len": 8, "tok_s": 100.0, "ms_per_step": 10.0}],
                        "prefill": {"tok_s": 1.0}, "bytes": {"rsparse": 0, "weights": 1}},
            spec: {"decode": [{"batch": 1, "prompt_len": 8, "tok_s": 125.0, "ms_per_step": 8.0}],
                   "prefill": {"tok_s": 1.0}, "bytes": {"rsparse": 0, "weights": 1}}},
        {}, {1: 4.0})
    assert [(r["method"], r["sparsity"], r["speedup"]) for r in rows] == [
        ("rsparse-thr[RSPARSE_LOWRANK_UP_PDL=1]", 0.5, 1.25)]


@pytest.fixture(scope="module")
def report_e2e():
    return load_benchmark("report_e2e.py")


MERGED_E2E = sorted(p.stem for p in RESULTS.glob("e2e_*.json")
                    if "runs" in json.loads(p.read_text()) and p.with_suffix(".md").is_file())


@pytest.mark.parametrize("name", MERGED_E2E)
def test_committed_e2e_report_matches_committed_measurements(name, report_e2e):
    """Every merged end-to-end report (report_e2e.py) is what its committed JSON and notes give, and
    each run's rows are that run's speedups: a hand edit of a number in the markdown, or notes
    written after the table was rendered and never appended, show up here."""
    data = json.loads((RESULTS / f"{name}.json").read_text())
    assert report_e2e.markdown(data, RESULTS / f"{name}.notes.md") == (RESULTS / f"{name}.md").read_text()
    for row in data["results"]:
        assert row["speedup"] == pytest.approx(row["sparse_tok_s"] / row["dense_tok_s"], rel=1e-9)
        assert data["runs"][row["run"]]["run"] == row["run"]


@pytest.mark.parametrize("name,sources", [
    ("e2e_h200_s18", ["e2e_h200_llama2_s17.json", "e2e_h200_llama2_s18.json", "e2e_h200_llama3_s18.json"]),
    ("e2e_h200_s20", ["e2e_h200_llama3_s20.json", "e2e_h200_llama2_fma3d_s20.json"]),
    ("e2e_h200_s21", ["e2e_h200_llama2_s21.json", "e2e_h200_llama2_fma_ahead_s21.json",
                      "e2e_h200_llama3_fma_ahead_s21.json"]),
    ("e2e_h200_s23", ["e2e_h200_llama2_s23.json", "e2e_h200_llama3_s23.json"]),
])
def test_session_e2e_report_merges_the_committed_runs(name, sources, report_e2e):
    """A session's merged end-to-end report is the merge of its committed single-run files, in that order."""
    merged = report_e2e.merge([str(RESULTS / s) for s in sources])
    committed = json.loads((RESULTS / f"{name}.json").read_text())
    assert merged["results"] == committed["results"]
    assert [r["command"] for r in merged["runs"]] == [r["command"] for r in committed["runs"]]


@pytest.mark.parametrize("name", ["kernels_committed_h200", "kernels_committed_lowrank_h200", "kernels_committed_h100",
                                  "kernels_committed_larosa_hist5w16_h100", "kernels_committed_larosa_h100"])
def test_committed_kernels_report_matches_committed_measurements(name):
    """benchmarks/results/kernels_committed*.md is what committed_kernels --report makes of
    the committed runs with today's tables (the op's dense/sparse choice per point is read from
    kernels/configs: a dispatch change that moves a measured point shows up here)."""
    data = json.loads((RESULTS / f"{name}.json").read_text())
    assert load_benchmark("gpu/committed_kernels.py").report(data) == (RESULTS / f"{name}.md").read_text()


def test_committed_kernels_script_dry_run(tmp_path):
    """benchmarks/gpu/committed_kernels.py end to end on a tiny shape under the interpreter (fake
    timings): every method, two token counts, the v_t chunk A/B and --report run before GPU time
    is spent, and the JSON has issue 4's fields."""
    import subprocess

    script = REPO / "benchmarks" / "gpu" / "committed_kernels.py"
    env = {**os.environ, "RSPARSE_BENCH_DRY": "1", "TRITON_INTERPRET": "1"}
    out = tmp_path / "k.json"
    subprocess.run([sys.executable, str(script), "--ab-lowrank-chunks", "--out", str(out)],
                   check=True, env=env, capture_output=True, timeout=300)
    data = json.loads(out.read_text())
    assert {"commit", "gpu", "versions", "command", "copy_bandwidth_gbs", "results"} <= set(data)
    assert {r["method"] for r in data["results"]} == {"teal", "rsparse", "rsparse_lowrank", "larosa"}
    assert {"shape", "method", "tokens", "sparsity", "dense_ms", "sparse_ms", "gbs"} <= set(data["results"][0])
    assert any("design_chunks_ms" in r for r in data["results"])
    subprocess.run([sys.executable, str(script), "--report", str(out), "--out", str(tmp_path / "k.md")],
                   check=True, env=env, capture_output=True, timeout=120)
    assert (tmp_path / "k.md").read_text().startswith("# Decode kernels as committed")
    if importlib.util.find_spec("matplotlib"):  # the [bench] extra; CI has the markdown only
        assert list(tmp_path.glob("k_*.png"))


def test_union_density_counts_shared_and_independent_channels():
    """union_density.union_stats: M tokens that select the same channels have a union no larger than
    one token's selection; tokens with disjoint selections a union of the sum; the independent
    prediction is 1 - prod(1 - d_i) of the same tokens' densities; windows past the last whole group
    are left out."""
    import torch

    module = load_benchmark("union_density.py")
    k = 8
    same = torch.zeros(4, 3, k, dtype=torch.bool)
    same[:, :, :2] = True  # every token keeps channels 0-1: density 0.25
    per_token, union, independent, steps = module.union_stats(same, 2)
    assert steps == 2 * 3
    assert per_token / steps == pytest.approx(0.25) and union / steps == pytest.approx(0.25)
    assert independent / steps == pytest.approx(1 - 0.75 ** 2)
    disjoint = torch.zeros(5, 1, k, dtype=torch.bool)
    for w in range(4):
        disjoint[w, 0, 2 * w: 2 * w + 2] = True
    disjoint[4, 0, :] = True  # a fifth window, past the last group of 4: not counted
    per_token, union, independent, steps = module.union_stats(disjoint, 4)
    assert steps == 1 and union == pytest.approx(1.0) and per_token == pytest.approx(0.25)
    assert independent == pytest.approx(1 - 0.75 ** 4)


@pytest.mark.parametrize("name", sorted(p.stem for p in RESULTS.glob("union_density_*.json")))
def test_committed_union_density_report_matches_its_json(name):
    """benchmarks/results/union_density_*.md is what union_density.py --report makes of its JSON."""
    module = load_benchmark("union_density.py")
    assert module.markdown(json.loads((RESULTS / f"{name}.json").read_text())) == (RESULTS / f"{name}.md").read_text()


def test_committed_sass_comparison_matches_its_json():
    """benchmarks/results/offline_build_sass_*.md is what offline_build.compare_markdown makes of its
    JSON, and every build it holds kept its machine code (the refactor it checks changed nothing)."""
    module = load_benchmark("gpu/offline_build.py")
    for path in sorted(RESULTS.glob("offline_build_sass_*.json")):
        record = json.loads(path.read_text())
        assert {"commit", "machine", "versions", "command"} <= record.keys(), path.name
        assert module.compare_markdown(record) == path.with_suffix(".md").read_text()
        for run in record["runs"]:
            assert [b["sass_sha1"] for b in run["before"]] == [b["sass_sha1"] for b in run["after"]]


def test_sass_compare_exit_status(tmp_path):
    """offline_build.py --compare exits 1 and marks the build when one build's machine code differs."""
    import subprocess

    build = dict(kernel="k", num_warps=4, BLOCK_N=512, registers=128, stack_bytes=0, local_bytes=0, calls=0,
                 sass_instructions=10, sass_sha1="aaaa", triton="3.6.0")
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    before.write_text(json.dumps([build, {**build, "BLOCK_N": 1024}]))
    script = [sys.executable, str(REPO / "benchmarks" / "gpu" / "offline_build.py"), "--compare", str(before),
              str(after)]
    after.write_text(json.dumps([build, {**build, "BLOCK_N": 1024}]))
    same = subprocess.run(script, capture_output=True, text=True)
    assert same.returncode == 0 and "**no**" not in same.stdout
    after.write_text(json.dumps([build, {**build, "BLOCK_N": 1024, "sass_sha1": "bbbb", "registers": 130}]))
    changed = subprocess.run(script, capture_output=True, text=True)
    assert changed.returncode == 1 and changed.stdout.count("**no**") == 1 and "128 -> 130" in changed.stdout


def test_run_header_records_the_plugin_switches(monkeypatch):
    """A GPU probe's header names the plugin's switches set in the environment before its command, so a
    run with an A/B switch on (RSPARSE_TOPK_IN_KERNEL=1) says so; the commit and dry-run variables are
    not switches."""
    module = load_benchmark("bench_kernels.py")
    for name in [n for n in os.environ if n.startswith("RSPARSE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(sys, "argv", ["x", "--out", "o.json"])
    assert module.run_header("benchmarks/gpu/x.py")["command"] == "python3 -P benchmarks/gpu/x.py --out o.json"
    monkeypatch.setenv("RSPARSE_TOPK_IN_KERNEL", "1")
    monkeypatch.setenv("RSPARSE_COMMIT", "abc1234")
    header = module.run_header("benchmarks/gpu/x.py")
    assert header["command"] == "RSPARSE_TOPK_IN_KERNEL=1 python3 -P benchmarks/gpu/x.py --out o.json"
    assert header["commit"] == "abc1234"


@pytest.mark.parametrize("name", ["compiled_cpu", "compiled_cpu_opaque_mask"])
def test_compiled_vs_eager_report_is_its_json(name):
    """The committed eager-vs-compiled tables are what their JSON gives (benchmarks/compiled_vs_eager.py),
    and the paired ratios are the per-window NLLs' (recomputed here)."""
    import math

    script = load_benchmark("compiled_vs_eager.py")
    result = json.loads((RESULTS / f"{name}.json").read_text())
    assert (RESULTS / f"{name}.md").read_text() == script.report_md(result)
    for run in result["runs"]:
        nll = run["nll"]
        check = script.paired(nll["eager"], nll["compiled"])
        assert check == run["compiled_vs_eager"]
        assert check["ppl_ratio"] == pytest.approx(run["ppl"]["compiled"] / run["ppl"]["eager"])
        assert check["windows"] == result["windows"] and not math.isnan(check["se"])
