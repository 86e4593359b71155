"""A missing extra or an unreachable Hub is one line on stderr and exit status 1, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_jd.cli import HubUnreachableError, hub_access, main, missing_extra

ROOT = Path(__file__).resolve().parents[2]


def _hide(monkeypatch, *packages: str) -> None:
    """Make ``import package`` (and its submodules) fail, as when it is not installed."""
    for name in list(sys.modules):
        if name.split(".")[0] in packages:
            monkeypatch.setitem(sys.modules, name, None)
    for package in packages:
        monkeypatch.setitem(sys.modules, package, None)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("hf-jd: error: ")
    return err


def test_demo_without_matplotlib_prints_the_table_and_says_the_plot_needs_the_extra(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    _hide(monkeypatch, "matplotlib")
    assert main(["demo", "--offline_smoke"]) == 0  # the short mode: a tinier ViT, 3 steps
    out = capsys.readouterr().out
    assert "| ERM (Trainer, mean loss) |" in out and "| JD (JDTrainer, upgrad) |" in out
    assert 'The plot needs matplotlib, which is not installed: pip install "hf-jd[examples]"' in out
    assert (tmp_path / "outputs" / "iwrm_digits-smoke.json").is_file()
    assert not (tmp_path / "outputs" / "iwrm_digits.json").exists()  # the real run's files stay untouched


def test_demo_without_scikit_learn(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _hide(monkeypatch, "sklearn")
    assert main(["demo", "--offline_smoke"]) == 1
    assert 'needs scikit-learn, which is not installed: pip install "hf-jd[examples]"' in _one_line(capsys)


def test_peft_recipe_without_peft(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _hide(monkeypatch, "peft")
    assert main(["train", "--config", "peft_lora", "--offline_smoke"]) == 1
    assert 'needs peft, which is not installed: pip install "hf-jd[peft]"' in _one_line(capsys)


def test_missing_extra_knows_only_the_optional_packages():
    assert missing_extra(ModuleNotFoundError("x", name="numpy")) is None
    assert missing_extra(ValueError("x")) is None
    assert "hf-jd[peft]" in str(missing_extra(ModuleNotFoundError("x", name="peft.tuners"), "it"))


def test_hub_access_turns_an_unreachable_hub_into_one_line():
    from datasets import load_dataset
    from transformers import AutoConfig

    assert os.environ["HF_HUB_OFFLINE"] == "1"  # tests/conftest.py
    model = "the model 'google-bert/bert-base-uncased'"
    with pytest.raises(HubUnreachableError, match=f"could not load {model}"), hub_access(model):
        AutoConfig.from_pretrained("google-bert/bert-base-uncased")
    unreachable = pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE=1.*--offline_smoke")
    with unreachable, hub_access("the data set 'nyu-mll/glue'"):
        load_dataset("nyu-mll/glue", "sst2")
    with pytest.raises(ValueError, match="other"), hub_access("x"):  # other errors pass unchanged
        raise ValueError("other")


def test_a_hub_name_offline_is_one_line_and_a_failure(tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "hf_jd", "train", "--config", "text_classification", "--max_steps", "1"]
    result = subprocess.run(
        command, capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("hf-jd: error:")]
    assert errors == [
        "hf-jd: error: could not load the data set 'nyu-mll/glue': the Hugging Face Hub cannot be reached "
        "(offline mode: HF_HUB_OFFLINE=1) and it is not in the local cache. Add --offline_smoke to run this "
        "command without the Hub (a tiny model of the same family, in-memory data)."
    ]
    assert "Traceback" not in result.stderr
    # the same script run directly: one line too
    script = ROOT / "examples" / "text_classification.py"
    command = [sys.executable, str(script), "--model_name_or_path", "google-bert/bert-base-uncased"]
    result = subprocess.run(
        command, capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: could not load the data set 'nyu-mll/glue'" in result.stderr
