"""Every command of the README's "Install", "The two commands" and "Command line, examples and recipes".

The commands are read from the README itself: a command added there without a way to test it here fails
``test_every_readme_command_is_covered``. Commands that need the Hub run with ``--offline_smoke``, every
training run with one or two steps, from an empty folder (paths such as ``examples/`` and ``recipes/`` are
the clone's). Launches are checked on the command they would run (no GPUs here); installs and ``make`` are
covered by the tests named in :data:`ELSEWHERE`.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from hf_jd.cli import main
from hf_jd.cli._launch import launch_command, split_launch_options
from hf_jd.cli._paths import recipe_path

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("Install", "The two commands", "Command line, examples and recipes", "TRL")
# Hub models or data sets: run offline
NEEDS_HUB = ("text_classification", "token_classification", "causal_lm", "peft_lora", "my_recipe.yaml")

# Commands tested elsewhere: the test that runs them.
ELSEWHERE = {
    "pip install hf-jd": "tests/cli/test_wheel_install.py::test_env_and_aggregators",
    "pip install hf-jd[examples]": "tests/cli/test_wheel_install.py::test_demo_short_mode",
    "pip install hf-jd[peft]": "tests/cli/test_wheel_install.py::test_a_missing_extra_is_one_line",
    "pip install hf-jd[trl]": "tests/trl_trainers/test_sft_example.py::test_the_trl_extra_is_declared_and_installed_by_make_test",
    "pip install -e .[test]": "Makefile",
    "make demo": "tests/test_examples.py::test_iwrm_digits_small_run",
    "make test": "Makefile",
    "make test-min": "tests/test_minimum_versions.py::test_the_minimum_environment_has_the_minimum_versions",
    "make test-fast": "tests/test_markers.py::test_fast_loop_deselects_every_marker",
    "hf-jd train --config text_classification --num_processes 2": (
        "tests/cli/test_two_processes.py::test_hf_jd_train_on_two_processes"
    ),
}


def readme_commands() -> list[str]:
    """The command lines of the ``bash`` blocks of :data:`SECTIONS` (continuations joined, comments and
    quotes off)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for section in re.split(r"^## ", text, flags=re.MULTILINE):
        if section.split("\n", 1)[0].strip() not in SECTIONS:
            continue
        for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words:
                    commands.append(" ".join(words))
    return commands


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"readme_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _covered_elsewhere(command: str) -> None:
    where = ELSEWHERE[command]
    if where == "Makefile":
        makefile = (ROOT / "Makefile").read_text()
        assert command.split()[1] + ":" in makefile and '-e ".[test]"' in makefile
        return
    path, name = where.split("::")
    assert f"def {name}(" in (ROOT / path).read_text(), where
    if command == "make demo":
        assert "$(PY) examples/iwrm_digits.py" in (ROOT / "Makefile").read_text()


def _train_argv(words: list[str], tmp_path: Path) -> list[str]:
    argv = [*words, "--output_dir", str(tmp_path / "out")]
    config = words[words.index("--config") + 1]
    if config in NEEDS_HUB and "--offline_smoke" not in argv:
        argv.append("--offline_smoke")
    return [*argv, "--max_steps", "1"]


def _run(command: str, tmp_path: Path, capsys) -> None:
    words = shlex.split(command)
    if command in ELSEWHERE:
        return _covered_elsewhere(command)
    if words[0] == "hf-jd" and words[1] in ("aggregators", "env", "recipes"):
        assert main(words[1:]) == 0
        assert capsys.readouterr().out.strip()
        return None
    if words[:2] == ["hf-jd", "demo"]:
        argv = (
            words[1:]
            if "--offline_smoke" in words
            else [*words[1:], "--max_steps", "2", "--probe_size", "32"]
        )
        assert main(argv) == 0
        assert "| JD (JDTrainer, upgrad) |" in capsys.readouterr().out
        assert list((tmp_path / "outputs").glob("iwrm_digits*.png"))
        return None
    if words[:2] == ["hf-jd", "train"]:
        if "my_recipe.yaml" in words:  # the user's own recipe
            (tmp_path / "my_recipe.yaml").write_text("example: text_classification\naggregator: mgda\n")
        options, rest = split_launch_options(words[2:])
        if options.accelerate_config or options.num_processes:  # checked on the launch command, not run
            launch = launch_command(options, rest, cuda=True)
            assert launch[launch.index("-m", 3) :][:3] == ["-m", "hf_jd", "train"]
            assert recipe_path(rest[rest.index("--config") + 1]).is_file()
            if options.accelerate_config:
                assert Path(launch[launch.index("--config_file") + 1]).is_file()
            return None
        if "peft_lora" in words:
            pytest.importorskip("peft")
        assert main(_train_argv(words[1:], tmp_path)) == 0
        assert (tmp_path / "out-smoke" / "README.md").is_file() or (tmp_path / "out" / "README.md").is_file()
        return None
    if words[0] == "python" and words[1].startswith("examples/trl_"):  # TRL is an extra: skip without it
        pytest.importorskip("trl")
        module = _load(ROOT / words[1])
        out = words[words.index("--output_dir") + 1]
        argv = [word if word != out else str(tmp_path / Path(out).name) for word in words[2:]]
        assert module.main([*argv, "--max_steps", "1"])["epoch"] > 0
        assert (tmp_path / f"{Path(out).name}-smoke" / "README.md").is_file()
        return None
    if words[0] == "python" and words[1].startswith("examples/"):
        module = _load(ROOT / words[1])
        if "--help" in words:
            with pytest.raises(SystemExit) as exit_info:
                module.main(words[2:])
            assert exit_info.value.code == 0 and "--model_name_or_path" in capsys.readouterr().out
            return None
        argv = [word if word != "outputs/mrpc" else str(tmp_path / "mrpc") for word in words[2:]]
        assert module.main([*argv, "--offline_smoke", "--max_steps", "1"])["epoch"] > 0
        assert (tmp_path / "mrpc-smoke" / "README.md").is_file()
        return None
    if words[:2] == ["accelerate", "launch"]:  # GPUs: check that what it names exists
        assert (ROOT / words[words.index("--config_file") + 1]).is_file()
        assert (ROOT / next(word for word in words if word.endswith(".py"))).is_file()
        assert recipe_path(words[words.index("--config") + 1]).is_file()
        return None
    raise AssertionError(f"README command without a test: {command}")


def test_the_sections_have_commands():
    commands = readme_commands()
    assert (
        "hf-jd recipes" in commands and "make demo" in commands and "pip install hf-jd[examples]" in commands
    )
    assert len(commands) >= 20


@pytest.mark.parametrize("command", readme_commands())
def test_every_readme_command_is_covered(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _run(command, tmp_path, capsys)
