"""The runnable examples run and learn."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_basic_usage(capsys):
    history = _load("basic_usage").main(epochs=2, log_every=8)
    assert len(history) == 2 * 512 // 16
    assert all(math.isfinite(v) for v in history)
    first, last = sum(history[:8]) / 8, sum(history[-8:]) / 8
    assert last < 0.25 * first, (first, last)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(printed) == len(history) // 8
