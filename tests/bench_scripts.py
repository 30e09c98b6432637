"""Loading a script of benchmarks/ (not a package) in tests, by path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):  # noqa: ANN201 - the module
    """``benchmarks/<name>.py`` as the module ``edgekit_bench_<name>``, loaded once (it puts the repository root on
    sys.path for its own imports; dataclasses look their module up in sys.modules while classes are made)."""
    key = f"edgekit_bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod
