"""Installed from a wheel (not editable) into a fresh virtual environment, every ``hf-jd`` command works.

The module's fixture builds the wheel from a copy of the sources, creates a virtual environment, installs
the pinned torch first (``TORCH_SPEC``, as the Makefile: ``torch==2.13.0``, the local CPU build on the
CI machines; never a CUDA build pulled in by the wheel's ``torch>=`` requirement), then the wheel with its
``[examples]`` extra. The commands run from an empty folder, offline, with nothing of the clone on the
path. About 2-3 minutes on 2 cores, most of it pip installing torch and the dependencies (from pip's cache
when it has them).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What the build reads: the metadata (pyproject.toml, README.md), the package and, through the links
# hf_jd/examples and hf_jd/recipes, the scripts and recipes.
SOURCES = ("pyproject.toml", "README.md", "hf_jd", "examples", "recipes")
BUILD_LEFTOVERS = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")


def _run(
    command: list[str], cwd: Path, env: dict[str, str], timeout: int = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _check(result: subprocess.CompletedProcess, what: str) -> None:
    assert result.returncode == 0, f"{what} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


class Installed:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.bin = root / "venv" / "bin"
        self.cwd = root / "empty"
        self.env = env
        self.timings: dict[str, float] = {}

    def hf_jd(self, *args: str) -> subprocess.CompletedProcess:
        start = time.perf_counter()
        result = _run([str(self.bin / "hf-jd"), *args], self.cwd, self.env)
        self.timings[" ".join(args)] = time.perf_counter() - start
        print(
            f"\n$ hf-jd {' '.join(args)}  ({self.timings[' '.join(args)]:.0f} s, status {result.returncode})"
        )
        print(result.stdout[-1500:] + result.stderr[-800:])
        return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("wheel_install")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, symlinks=True, ignore=BUILD_LEFTOVERS)
        else:
            shutil.copy2(path, source / name)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"
    )
    timings = {}

    start = time.perf_counter()
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(source)]
    if importlib.util.find_spec("setuptools") is not None:
        build.insert(4, "--no-build-isolation")  # the setuptools at hand: no index needed to build
    _check(_run(build, root, env), "building the wheel")
    (wheel,) = (root / "dist").glob("hf_jd-*.whl")
    timings["build the wheel"] = time.perf_counter() - start

    start = time.perf_counter()
    _check(
        _run([sys.executable, "-m", "venv", str(root / "venv")], root, env),
        "creating the virtual environment",
    )
    pip = [
        str(root / "venv" / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--progress-bar",
        "off",
        "--no-compile",
    ]
    torch_spec = os.environ.get("TORCH_SPEC", "torch==2.13.0")
    result = _run([*pip, torch_spec], root, env)
    if result.returncode != 0:
        pytest.skip(f"{torch_spec} cannot be installed on this machine: {result.stderr.strip()[-500:]}")
    timings["venv + torch"] = time.perf_counter() - start

    start = time.perf_counter()
    _check(_run([*pip, f"{wheel}[examples]"], root, env), "installing the wheel")
    timings["wheel[examples] + dependencies"] = time.perf_counter() - start
    print("\n" + ", ".join(f"{what}: {seconds:.0f} s" for what, seconds in timings.items()))

    (root / "empty").mkdir()
    return Installed(root, env)


def test_the_wheel_holds_the_scripts_and_recipes_and_not_the_clone(installed):
    code = (
        "import hf_jd, importlib.resources as r, torch; p = r.files('hf_jd'); "
        "print(hf_jd.__file__); print(torch.__version__); "
        "print(sorted(x.name for x in (p / 'examples').iterdir() if x.name.endswith('.py'))); "
        "print(sorted(x.name for x in (p / 'recipes' / 'accelerate').iterdir()))"
    )
    result = _run([str(installed.bin / "python"), "-c", code], installed.cwd, installed.env)
    _check(result, "importing hf_jd")
    location, torch_version, examples, configs = result.stdout.splitlines()
    assert Path(location).is_relative_to(installed.bin.parent)  # the installed copy, not the clone
    assert not (Path(location).parent / "examples").is_symlink()
    assert torch_version.startswith("2.13.0")
    assert "'text_classification.py'" in examples and "'iwrm_digits.py'" in examples
    assert "'multi_node.yaml'" in configs


def test_env_and_aggregators(installed):
    env = installed.hf_jd("env")
    _check(env, "hf-jd env")
    assert "- hf_jd: 0.1.0" in env.stdout and "- torch: 2.13.0" in env.stdout
    aggregators = installed.hf_jd("aggregators")
    _check(aggregators, "hf-jd aggregators")
    assert aggregators.stdout.splitlines()[0].split() == ["name", "gramian", "stateful", "paper"]
    assert any(line.startswith("upgrad ") for line in aggregators.stdout.splitlines())


def test_recipes(installed):
    result = installed.hf_jd("recipes")
    _check(result, "hf-jd recipes")
    assert "text_classification   text_classification   GLUE SST-2" in result.stdout
    assert "multi_node" in result.stdout


def test_demo_short_mode(installed):
    result = installed.hf_jd("demo", "--offline_smoke")
    _check(result, "hf-jd demo --offline_smoke")
    assert "| JD (JDTrainer, upgrad) |" in result.stdout
    assert (installed.cwd / "outputs" / "iwrm_digits-smoke.png").stat().st_size > 1000
    assert (installed.cwd / "outputs" / "iwrm_digits-smoke" / "jd" / "README.md").is_file()


def test_train_a_shipped_recipe_by_name(installed):
    result = installed.hf_jd(
        "train", "--config", "text_classification", "--offline_smoke", "--max_steps", "2"
    )
    _check(result, "hf-jd train --config text_classification")
    assert "train_loss" in result.stdout
    card = (installed.cwd / "outputs" / "text_classification-smoke" / "README.md").read_text()
    assert "## Jacobian descent" in card and "- training_steps: 2" in card


def test_a_missing_extra_is_one_line(installed):
    result = installed.hf_jd("train", "--config", "peft_lora", "--offline_smoke")  # [examples] has no PEFT
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        'hf-jd: error: hf-jd train --config peft_lora needs peft, which is not installed: pip install "hf-jd[peft]"'
    )
    assert "Traceback" not in result.stderr
