"""The scripts under benchmarks/ as modules, for the tests of their arithmetic and reports. They are
scripts, not a package, so they are loaded by path; each is registered in sys.modules under its file
name because the dataclasses they define look their module up there."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(relpath: str):
    """benchmarks/<relpath> (e.g. "gpu/union_rows.py") executed as a fresh module."""
    path = BENCHMARKS / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
