"""``examples/trl_sft.py`` (offline smoke run, ``--help``) and the ``trl`` extra that installs TRL."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_example():
    spec = importlib.util.spec_from_file_location("example_trl_sft", ROOT / "examples" / "trl_sft.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_example_trains_offline(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)
    metrics = _load_example().main(
        ["--offline_smoke", "--output_dir", str(tmp_path / "trl_sft"), "--max_steps", "2"]
    )
    assert metrics["epoch"] > 0
    card = (tmp_path / "trl_sft-smoke" / "README.md").read_text()
    assert "<!-- hf_jd:begin -->" in card
    for tag in ("- trl", "- sft", "- hf_jd"):
        assert tag in card


def test_the_example_help_lists_trl_and_jd_flags(capsys):
    pytest.importorskip("trl")
    with pytest.raises(SystemExit) as exit_info:
        _load_example().main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for flag in (
        "--model_name_or_path",
        "--packing",
        "--assistant_only_loss",
        "--aggregator",
        "--jd_sft_objective_weighting",
    ):
        assert flag in out, flag


def test_the_trl_extra_is_declared_and_installed_by_make_test():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^trl = \["trl>=1\.16"\]$', pyproject, flags=re.MULTILINE)
    test_extra = re.search(r"^test = \[(.*?)\]", pyproject, flags=re.MULTILINE | re.DOTALL)
    assert test_extra and "trl" not in test_extra.group(1)  # make test-min stays on the minimum accelerate
    makefile = (ROOT / "Makefile").read_text()
    install_rule = makefile.split("$(VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    assert '-e ".[test,trl,deepspeed]"' in install_rule  # DeepSpeed: tests/distributed/test_deepspeed.py
    minimum_rule = makefile.split("$(MIN_VENV)/.installed:", 1)[1].split("\n\n", 1)[0]
    assert '-e ".[test]"' in minimum_rule
