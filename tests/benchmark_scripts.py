"""The scripts under benchmarks/ as modules, for the tests of their arithmetic and reports. They are
scripts, not a package, so they are loaded by path; each is registered in sys.modules under its file
name because the dataclasses they define look their module up there."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(relpath: str, register: bool = True):
    """benchmarks/<relpath> (e.g. "gpu/union_rows.py") executed as a fresh module. register=False
    keeps it out of sys.modules, for a script whose functions are sent to vLLM's worker processes:
    cloudpickle sends a function by value only if its module is not importable by name, and the
    workers cannot import a script by its file name."""
    path = BENCHMARKS / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module
