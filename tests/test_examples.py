"""The runnable examples run and learn."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
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


def test_iwrm_digits_small_run(tmp_path, capsys):
    plot_path = tmp_path / "quantiles.png"
    results = _load("iwrm_digits").main(
        [
            "--hidden_size",
            "16",
            "--num_layers",
            "1",
            "--max_steps",
            "6",
            "--probe_size",
            "64",
            "--probe_every",
            "2",
            "--per_device_train_batch_size",
            "16",
            "--output_dir",
            str(tmp_path / "out"),
            "--plot_path",
            str(plot_path),
            "--disable_tqdm",
            "True",
        ]
    )
    assert [result["name"] for result in results] == ["ERM (Trainer, mean loss)", "JD (JDTrainer, upgrad)"]
    for result in results:
        assert result["steps"] == [0, 2, 4, 6]
        assert 0.0 <= result["eval_accuracy"] <= 1.0
        assert result["train_loss_max"] >= result["train_loss_q90"] >= 0
    assert plot_path.stat().st_size > 1000
    assert (tmp_path / "quantiles.json").is_file()
    assert "| JD (JDTrainer, upgrad) |" in capsys.readouterr().out
