"""``hf-jd aggregators``, ``hf-jd env``, ``hf-jd recipes``, ``python -m hf_jd`` and the launch command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_jd.aggregation import Aggregator, aggregator_names
from hf_jd.aggregation import _registry as registry
from hf_jd.cli import main
from hf_jd.cli._aggregators import rows
from hf_jd.cli._launch import LAUNCHED_ENV, launch_command, split_launch_options, wants_launch
from hf_jd.cli._paths import accelerate_names, recipe_names, shipped

ROOT = Path(__file__).resolve().parents[2]


def test_aggregators_table_covers_the_registry(capsys):
    assert main(["aggregators"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "gramian", "stateful", "paper"]
    table = {line.split()[0]: line for line in lines[2:]}
    assert set(table) == set(aggregator_names())
    by_name = {row["name"]: row for row in rows()}
    assert by_name["upgrad"]["gramian"] == "yes" and by_name["trimmed_mean"]["gramian"] == "no"
    assert by_name["random"]["stateful"] == "yes" and by_name["upgrad"]["stateful"] == "no"
    assert "arXiv:2406.16232" in by_name["upgrad"]["paper"] and by_name["mean"]["paper"] == "-"


def test_a_newly_registered_aggregator_appears(monkeypatch, capsys):
    class Halves(Aggregator):
        """Half the sum of the rows (Doe et al., *A Test Aggregator*, 2031, arXiv:3101.00001)."""

        def forward(self, matrix):
            return matrix.sum(0) / 2

        def reset(self) -> None:
            pass

    monkeypatch.setitem(registry._REGISTRY._entries, "halves", Halves)  # removed again after the test
    assert main(["aggregators", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| halves | no | yes | Doe et al. 2031, arXiv:3101.00001 |" in out


def test_env_through_python_dash_m():
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "hf_jd", "env"], capture_output=True, text=True, env=environment, check=True
    )
    fields = dict(line[2:].split(": ", 1) for line in result.stdout.splitlines())
    assert {"hf_jd", "python", "torch", "transformers", "accelerate", "device"} <= set(fields)
    assert fields["python"] == sys.version.split()[0]


def test_train_without_config_prints_usage(capsys):
    assert main(["train"]) == 2
    assert "--config" in capsys.readouterr().out


def test_launch_command_for_two_cpu_processes(monkeypatch):
    monkeypatch.delenv(LAUNCHED_ENV, raising=False)
    options, rest = split_launch_options(
        ["--config", "r.yaml", "--num_processes", "2", "--learning_rate", "1"]
    )
    assert rest == ["--config", "r.yaml", "--learning_rate", "1"] and wants_launch(options)
    command = launch_command(options, rest, cuda=False)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in command  # else accelerate starts ONE process
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[-2:] == ["--use_cpu", "True"]  # gloo
    assert command[command.index("-m", 3) : command.index("-m", 3) + 3] == ["-m", "hf_jd", "train"]
    monkeypatch.setenv(LAUNCHED_ENV, "1")
    assert not wants_launch(options)  # the launched processes train


def test_launch_with_a_named_accelerate_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found in the package, not the working directory
    options, rest = split_launch_options(["--accelerate_config", "multi_gpu", "--config", "r.yaml"])
    command = launch_command(options, rest, cuda=True)
    config = Path(command[command.index("--config_file") + 1])
    assert config.name == "multi_gpu.yaml" and config.is_file()
    assert config == shipped("recipes", "accelerate", "multi_gpu.yaml")
    assert "--multi_gpu" not in command and "--use_cpu" not in command
    options, rest = split_launch_options(["--accelerate_config", "fsdp", "--config", "r.yaml"])
    command = launch_command(options, rest, cuda=True)
    assert Path(command[command.index("--config_file") + 1]).name == "fsdp.yaml"
    with pytest.raises(ValueError, match="FSDP2 needs GPUs"):
        launch_command(options, rest, cuda=False)


def test_multi_node_keeps_the_configs_port():
    # every machine of a multi-node run must meet at the config's main_process_port: never replaced
    options, rest = split_launch_options(
        ["--accelerate_config", "multi_node", "--machine_rank", "1", "--config", "causal_lm"]
    )
    command = launch_command(options, rest, cuda=True)
    assert "--main_process_port" not in command  # accelerate reads 29500 from the config
    assert command[command.index("--machine_rank") + 1] == "1"
    # an explicit port still wins; a config without one (multi_gpu) gets a free local port
    options, rest = split_launch_options(["--accelerate_config", "multi_node", "--main_process_port", "4242"])
    command = launch_command(options, rest, cuda=True)
    assert command[command.index("--main_process_port") + 1] == "4242"
    options, rest = split_launch_options(["--accelerate_config", "multi_gpu", "--config", "causal_lm"])
    command = launch_command(options, rest, cuda=True)
    assert int(command[command.index("--main_process_port") + 1]) > 0


def test_recipes_lists_the_shipped_recipes_and_configs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in out.splitlines() if line[:1].isalpha()}
    assert set(recipe_names()) <= set(rows) and set(accelerate_names()) <= set(rows)
    assert rows["text_classification"] == [
        "text_classification",
        "GLUE SST-2 with per-example Jacobian descent (UPGrad), BERT-base.",
    ]
    assert rows["multi_gpu"][0] == "One"  # name, then the config's first sentence
    assert {"causal_lm", "iwrm_digits", "multitask", "peft_lora", "text_classification"} <= set(
        recipe_names()
    )
    assert {"single_gpu", "multi_gpu", "multi_node", "fsdp", "deepspeed_zero2", "deepspeed_zero3"} == set(
        accelerate_names()
    )


def test_demo_runs_the_digits_job(tmp_path, capsys):
    argv = ["demo", "--hidden_size", "8", "--num_layers", "1", "--max_steps", "2", "--probe_size", "32"]
    argv += [
        "--output_dir",
        str(tmp_path / "out"),
        "--plot_path",
        str(tmp_path / "plot.png"),
        "--disable_tqdm",
        "True",
    ]
    assert main(argv) == 0
    assert "| JD (JDTrainer, upgrad) |" in capsys.readouterr().out
    assert (tmp_path / "plot.png").is_file()


def test_every_named_accelerate_config_exists():
    for name in ("single_gpu", "multi_gpu", "multi_node", "fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        assert (ROOT / "recipes" / "accelerate" / f"{name}.yaml").is_file()
        assert shipped("recipes", "accelerate", f"{name}.yaml").is_file()
