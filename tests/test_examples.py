"""The runnable examples run and learn; their smoke data honours the requested columns; the recipes."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


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
    module = _load("iwrm_digits")
    results = module.main(
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
    # both models are saved, the JD one with its card
    assert {"erm", "jd"} <= {path.name for path in (tmp_path / "out").iterdir()}
    assert (tmp_path / "out" / "jd" / "model.safetensors").is_file()
    assert "## Jacobian descent" in (tmp_path / "out" / "jd" / "README.md").read_text()
    # the figure names its data set
    figure = module.plot(results, str(tmp_path / "again.png"))
    assert "scikit-learn's digits" in figure._suptitle.get_text()


def test_iwrm_digits_without_matplotlib_prints_the_table_and_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    argv = ["--offline_smoke", "--output_dir", str(tmp_path / "out"), "--plot_path", str(tmp_path / "p.png")]
    results = _load("iwrm_digits").main(argv)
    out = capsys.readouterr().out
    assert len(results) == 2 and "| JD (JDTrainer, upgrad) |" in out
    assert 'The plot needs matplotlib, which is not installed: pip install "hf-jd[examples]"' in out
    assert not list(tmp_path.glob("*.png")) and (tmp_path / "p-smoke.json").is_file()


# ---------------------------------------------------------------- fine-tuning scripts and recipes
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SCRIPTS = ["text_classification", "token_classification", "causal_lm", "multitask", "peft_lora"]


def _smoke(name: str, tmp_path: Path, *extra: str) -> dict:
    """A smoke run of example ``name``; it writes to ``tmp_path/<name>-smoke``."""
    if name == "peft_lora":
        pytest.importorskip("peft")
    return _load(name).main(["--offline_smoke", "--output_dir", str(tmp_path / name), *extra])


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_help(name, capsys):
    if name == "peft_lora":
        pytest.importorskip("peft")
    with pytest.raises(SystemExit) as exit_info:
        _load(name).main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--offline_smoke" in out and "--aggregator" in out and "--config" in out
    if name != "multitask":  # multitask's default encoder is a small ViT built from a config
        assert "--model_name_or_path" in out and "--dataset_name" in out


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_offline_smoke(name, tmp_path):
    metrics = _smoke(name, tmp_path)
    assert math.isfinite(metrics["train_loss"])
    assert metrics["epoch"] > 0
    assert not (tmp_path / name).exists()  # a smoke run never writes into the real run's output_dir
    card = (tmp_path / f"{name}-smoke" / "README.md").read_text()  # every example saves, with its card
    assert "- hf_jd" in card and "## Jacobian descent" in card


def test_peft_example_trains_the_adapters_only(tmp_path):
    metrics = _smoke("peft_lora", tmp_path)
    assert 0 < metrics["trainable_parameters"] < 0.5 * metrics["total_parameters"]
    saved = {path.name for path in (tmp_path / "peft_lora-smoke").iterdir()}
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved


def test_multitask_example_is_per_task_and_reports_each_task(tmp_path):
    metrics = _smoke("multitask", tmp_path, "--aggregator", "nash_mtl")
    assert {"eval_digit_accuracy", "eval_parity_accuracy", "eval_ink_mse"} <= set(metrics)


def test_multitask_example_runs_a_scalarizer_baseline(tmp_path):
    metrics = _smoke(
        "multitask", tmp_path, "--scalarizer", "uncertainty_weighting", "--scalarizer_kwargs", '{"shape": 3}'
    )
    assert math.isfinite(metrics["train_loss"]) and "eval_digit_accuracy" in metrics


def _recipes() -> list[Path]:
    return sorted(path for path in RECIPES.glob("*.yaml") if "example:" in path.read_text())


def test_examples_and_recipes_have_one_copy_shipped_in_the_package():
    # hf_jd/examples and hf_jd/recipes (package data, in the wheel) are links to the top-level folders
    for name in ("examples", "recipes"):
        link = ROOT / "hf_jd" / name
        assert link.is_symlink() and link.resolve() == (ROOT / name).resolve()
        assert not (ROOT / name).is_symlink()


def test_every_example_has_a_recipe():
    examples = {
        line.split(":", 1)[1].strip()
        for path in _recipes()
        for line in path.read_text().splitlines()
        if line.startswith("example:")
    }
    assert examples == set(SCRIPTS) | {"iwrm_digits"}


@pytest.mark.parametrize("recipe", _recipes(), ids=lambda path: path.stem)
def test_recipe_runs_through_hf_jd_train(recipe, tmp_path, capsys):
    from hf_jd.cli import main

    if recipe.stem == "peft_lora":
        pytest.importorskip("peft")
    argv = ["train", "--config", recipe.stem, "--offline_smoke", "--output_dir", str(tmp_path / "out")]
    if recipe.stem == "iwrm_digits":
        argv += ["--plot_path", str(tmp_path / "plot.png")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train_loss" in out or "| JD (JDTrainer" in out
    # every recipe that trains saves its model with the model card (iwrm_digits: the JD run's)
    saved = tmp_path / "out-smoke" / ("jd" if recipe.stem == "iwrm_digits" else "")
    assert "## Jacobian descent" in (saved / "README.md").read_text()


def test_hf_jd_train_override_wins_over_the_recipe(tmp_path):
    from hf_jd.cli import main

    recipe = RECIPES / "text_classification.yaml"  # by path, as from a clone
    argv = ["train", "--config", str(recipe), "--offline_smoke", "--output_dir", str(tmp_path / "out")]
    assert main([*argv, "--aggregator", "dualproj", "--learning_rate", "0.0123", "--max_steps", "2"]) == 0
    card = (tmp_path / "out-smoke" / "README.md").read_text()
    assert "| `aggregator` | `'dualproj'` |" in card  # the recipe says upgrad
    assert "- learning_rate: 0.0123" in card  # the recipe says 2e-5
    assert "- training_steps: 2" in card  # the smoke schedule says 3
    assert "- seed: 42" in card  # from the recipe (the default is 42 too, so also check the batch size)
    assert "- eval_batch_size: 4" in card  # the smoke setting, over the recipe's 64


def test_smoke_data_has_the_requested_columns(tmp_path):
    # the README's MRPC command: sentence pairs under the columns asked for
    metrics = _smoke(
        "text_classification",
        tmp_path,
        "--model_name_or_path",
        "FacebookAI/roberta-base",
        "--dataset_name",
        "nyu-mll/glue",
        "--dataset_config_name",
        "mrpc",
        "--text_column_names",
        "sentence1,sentence2",
        "--label_column_name",
        "equivalent",
        "--max_steps",
        "1",
    )
    assert metrics["epoch"] > 0
    config = (tmp_path / "text_classification-smoke" / "config.json").read_text()
    assert '"model_type": "roberta"' in config and '"not_equivalent"' in config
    metrics = _smoke(
        "token_classification", tmp_path, "--text_column_name", "words", "--label_column_name", "tags"
    )
    assert metrics["epoch"] > 0
    metrics = _smoke("causal_lm", tmp_path, "--input_column", "", "--output_column", "answer")
    assert metrics["epoch"] > 0


def test_smoke_text_classification_data():
    from hf_jd.cli import smoke_data

    pairs = smoke_data.text_classification(text_columns=["a", "b"], label_column="y", eval_split="dev")
    assert set(pairs) == {"train", "dev"} and pairs["train"].column_names == ["a", "b", "y"]
    assert pairs["train"].features["y"].names == ["not_equivalent", "equivalent"]
    single = smoke_data.text_classification()  # GLUE SST-2's layout, unchanged
    assert single["train"].column_names == ["sentence", "label"]
    assert single["train"].features["label"].names == ["negative", "positive"]
