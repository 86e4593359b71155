"""``--config recipe.yaml`` and the command line: precedence, smoke settings, unknown keys."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from transformers import HfArgumentParser

from hf_jd import JDTrainingArguments
from hf_jd.cli import parse_args_with_config


@dataclass
class Knobs:
    width: int = 8
    name: str = "default"
    offline_smoke: bool = False


def _parse(tmp_path, recipe: str, argv: list[str], **kwargs):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    parser = HfArgumentParser((Knobs, JDTrainingArguments))
    return parse_args_with_config(parser, ["--config", str(path), *argv], **kwargs)


def test_recipe_then_command_line(tmp_path):
    recipe = "example: x\nwidth: 32\nname: recipe\noutput_dir: o\nlearning_rate: 2e-5\naggregator: mgda\n"
    knobs, args = _parse(tmp_path, recipe, ["--name", "cli", "--aggregator", "dualproj"])
    assert (knobs.width, knobs.name) == (32, "cli")
    assert args.learning_rate == pytest.approx(2e-5)  # YAML's "2e-5" is a string: converted like a flag
    assert args.aggregator == "dualproj"


def test_precedence_with_smoke(tmp_path):
    recipe = "width: 32\nmax_steps: 1000\nper_device_train_batch_size: 64\noutput_dir: o\n"
    knobs, args = _parse(
        tmp_path,
        recipe,
        ["--offline_smoke", "--per_device_train_batch_size", "2"],
        smoke_defaults={"width": 4},
    )
    assert knobs.offline_smoke and knobs.width == 32  # the recipe beats the example's smoke default
    assert args.max_steps == 3  # the smoke schedule beats the recipe
    assert args.per_device_train_batch_size == 2  # the command line beats everything


def test_example_defaults_are_lowest(tmp_path):
    knobs, args = _parse(tmp_path, "output_dir: o\n", [], defaults={"width": 5, "seed": 7})
    assert knobs.width == 5 and args.seed == 7


def test_unknown_recipe_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown setting.*learning_rat\\b"):
        _parse(tmp_path, "learning_rat: 0.1\noutput_dir: o\n", [])


def test_help_lists_config(capsys):
    parser = HfArgumentParser((Knobs,))
    with pytest.raises(SystemExit):
        parse_args_with_config(parser, ["--help"])
    assert "--config" in capsys.readouterr().out


def test_tiny_config_skips_read_only_size_fields():
    # FalconConfig.head_dim is a property derived from hidden_size and the heads: it cannot be passed.
    from hf_jd.cli import tiny_config

    config = tiny_config("tiiuae/falcon-7b")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 2)
    assert config.head_dim == 16
    assert tiny_config("meta-llama/Llama-2-7b-hf").head_dim == 16  # a plain field there: still set
