"""Load a benchmark script (``benchmarks/<name>.py``) as a module, and make ``benchmarks/_paper`` importable."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))


def load_script(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` under the module name ``bench_<name>``."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_quick(name: str, out: Path) -> dict:
    """``benchmarks/<name>.py --quick`` writing its results under ``out/results`` (``out/figures`` would hold
    figures that quick runs must not write); returns the script's report."""
    return load_script(name).main(
        ["--quick", "--out-dir", str(out / "results"), "--figure-dir", str(out / "figures")]
    )
