"""The fixed-cost probe's arithmetic and report (benchmarks/gpu/fixed_cost.py): the committed
markdown is what the committed JSON files give, and the fit recovers a known line."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


@pytest.fixture(scope="module")
def fixed_cost():
    spec = importlib.util.spec_from_file_location("fixed_cost", REPO / "benchmarks" / "gpu" / "fixed_cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fixed_cost"] = module
    spec.loader.exec_module(module)
    return module


def test_fit_line_recovers_fixed_cost_and_bandwidth(fixed_cost):
    # 5 us fixed + bytes at 3 TB/s, as the probe's (bytes, us) points
    points = [(b, 5.0 + b / 3e12 * 1e6) for b in (1e7, 3e7, 5e7, 9e7)]
    fixed_us, us_per_byte = fixed_cost.fit_line(points)
    assert fixed_us == pytest.approx(5.0)
    assert 1e-3 / us_per_byte == pytest.approx(3000.0)  # GB/s
    assert fixed_cost.fit_line([(1.0, 2.0), (1.0, 4.0)]) == (3.0, 0.0)  # no spread: no slope


def test_committed_report_matches_committed_measurements(fixed_cost, tmp_path):
    out = tmp_path / "fixed_cost.md"
    fixed_cost.write_report(str(out), str(RESULTS / "fixed_cost_h200.json"), str(RESULTS / "fixed_cost_chunks_h200.json"))
    assert out.read_text() == (RESULTS / "fixed_cost_h200.md").read_text()
