"""Recipes are configuration, never code: ``example:`` names a shipped example; ``--config`` by name or path."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_jd.cli import RecipeError, main
from hf_jd.cli import _main as cli_main
from hf_jd.cli._paths import example_names, recipe_path, shipped

SHIPPED_EXAMPLES = {
    "causal_lm",
    "iwrm_digits",
    "multitask",
    "peft_lora",
    "text_classification",
    "token_classification",
    "trl_dpo",
    "trl_grpo",
    "trl_reward",
    "trl_sft",
}


def _plant(path: Path, marker: Path) -> Path:
    """A script that writes ``marker`` as soon as it is imported (and would train nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef main(argv=None):\n    return 0\n")
    return path


def _recipe(path: Path, example: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"example: {example}\noutput_dir: {path.parent / 'out'}\n")
    return path


def test_the_valid_names_are_the_shipped_examples():
    assert set(example_names()) == SHIPPED_EXAMPLES  # basic_usage takes no command line, hence no recipe
    for name in example_names():
        assert (shipped("examples") / f"{name}.py").is_file()


def test_an_absolute_path_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    script = _plant(tmp_path / "evil.py", marker)
    recipe = _recipe(tmp_path / "r" / "recipe.yaml", str(script))
    with pytest.raises(
        ValueError, match="not a shipped example; valid names: causal_lm, .*text_classification"
    ) as error:
        cli_main.train(["--config", str(recipe)])
    assert "python my_script.py --config" in str(error.value)
    assert not marker.exists()


def test_a_path_out_of_the_examples_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    _plant(tmp_path / "evil.py", marker)  # where examples/../../evil.py next to the recipe points
    recipe = _recipe(tmp_path / "r" / "recipe.yaml", "../../evil")
    (tmp_path / "r" / "examples").mkdir()
    with pytest.raises(RecipeError, match="'../../evil' is not a shipped example"):
        cli_main.train(["--config", str(recipe)])
    assert not marker.exists()
    recipe = _recipe(tmp_path / "r" / "recipe.yaml", "evil.py")  # a relative script name
    with pytest.raises(RecipeError):
        cli_main.train(["--config", str(recipe)])
    assert not marker.exists()


def test_a_shipped_name_runs_the_shipped_script_not_a_file_next_to_the_recipe(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    _plant(tmp_path / "r" / "examples" / "text_classification.py", marker)
    recipe = _recipe(tmp_path / "r" / "recipe.yaml", "text_classification")
    monkeypatch.chdir(tmp_path / "r")  # nor one in the working directory
    _plant(tmp_path / "r" / "text_classification.py", marker)
    metrics = cli_main.train(["--config", str(recipe), "--offline_smoke", "--max_steps", "1"])
    assert not marker.exists()
    assert metrics["epoch"] > 0  # the shipped example trained
    assert (tmp_path / "r" / "out-smoke" / "README.md").is_file()


def test_the_command_line_reports_a_bad_example_in_one_line_and_launches_nothing(
    tmp_path, monkeypatch, capsys
):
    launched = []
    monkeypatch.setattr(cli_main, "relaunch", lambda *args: launched.append(args) or 0)
    monkeypatch.delenv("HF_JD_LAUNCHED", raising=False)
    recipe = _recipe(tmp_path / "recipe.yaml", "/bin/true.py")
    assert main(["train", "--config", str(recipe), "--num_processes", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hf-jd: error: ") and "valid names" in err
    assert not launched


def test_a_recipe_without_example_says_so(tmp_path):
    (tmp_path / "r.yaml").write_text("learning_rate: 0.1\n")
    with pytest.raises(RecipeError, match="has no `example:` key"):
        cli_main.train(["--config", str(tmp_path / "r.yaml")])


def test_a_shipped_recipe_by_name_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--config", "text_classification", "--offline_smoke", "--max_steps", "1"]
    assert main([*argv, "--output_dir", "out"]) == 0
    assert (tmp_path / "out-smoke" / "README.md").is_file()
    assert recipe_path("text_classification") == shipped("recipes", "text_classification.yaml")


def test_an_own_recipe_by_path_from_any_folder(tmp_path, monkeypatch):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "own.yaml").write_text(
        "example: text_classification\nmodel_name_or_path: google-bert/bert-base-uncased\nmax_seq_length: 8\n"
        "aggregator: dualproj\noutput_dir: own_out\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "mine/own.yaml", "--offline_smoke", "--max_steps", "1"]) == 0
    assert "| `aggregator` | `'dualproj'` |" in (tmp_path / "own_out-smoke" / "README.md").read_text()


def test_unknown_recipe_names_and_missing_files_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "text_clasification"]) == 1
    err = capsys.readouterr().err
    assert "no shipped recipe of that name; valid names: causal_lm" in err and len(err.splitlines()) == 1
    assert main(["train", "--config", "recipes/text_classification.yaml"]) == 1  # no clone here
    assert "--config causal_lm | " in capsys.readouterr().err
    assert main(["train", "--config", "x", "--accelerate_config", "multi_gpus"]) == 1
    assert "no shipped recipe" in capsys.readouterr().err
    assert main(["train", "--config", "causal_lm", "--accelerate_config", "multi_gpus"]) == 1
    assert (
        "valid names: deepspeed_zero2, deepspeed_zero3, fsdp, multi_gpu, multi_node, single_gpu"
        in capsys.readouterr().err
    )


def test_the_causal_lm_recipe_uses_the_non_deprecated_activation_checkpointing():
    import warnings

    from transformers import HfArgumentParser, TrainingArguments

    from hf_jd import JDTrainingArguments
    from hf_jd.cli import load_recipe, parse_args_with_config

    assert "activation_checkpointing" in TrainingArguments.__dataclass_fields__  # transformers 5's name
    for path in shipped("recipes").glob("*.yaml"):
        assert "gradient_checkpointing" not in load_recipe(path), path.name  # deprecated, warns
    assert load_recipe("causal_lm")["activation_checkpointing"] is True
    module = cli_main.load_example(shipped("examples", "causal_lm.py"))
    parser = HfArgumentParser((module.ModelArguments, module.DataTrainingArguments, JDTrainingArguments))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # "`gradient_checkpointing` is deprecated"
        *_, args = parse_args_with_config(parser, ["--config", "causal_lm", "--bf16", "False"])
    assert args.activation_checkpointing is True and args.output_dir == "outputs/causal_lm"
