"""The example scripts and recipes shipped inside the package, found from the package, never the working directory.

* ``hf_jd/examples/<name>.py``: the scripts ``hf-jd train`` and ``hf-jd demo`` run;
* ``hf_jd/recipes/<name>.yaml``: the training recipes (``hf-jd train --config <name>``);
* ``hf_jd/recipes/accelerate/<name>.yaml``: the ``accelerate`` configs (``--accelerate_config <name>``).

In a clone ``hf_jd/examples`` and ``hf_jd/recipes`` are links to the top-level ``examples/`` and
``recipes/`` (one copy of each file); a wheel holds the files themselves.

A recipe is configuration, never code: its ``example:`` must name a shipped example (:func:`example_script`);
a script of your own runs the explicit way, ``python my_script.py --config recipe.yaml``.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from pathlib import Path

from ._errors import RecipeError

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


def shipped(*parts: str) -> Path:
    """``hf_jd/<parts>`` of the installed package (``shipped("recipes", "accelerate")``)."""
    return Path(str(importlib.resources.files("hf_jd").joinpath(*parts)))


def _stems(folder: Path, suffix: str) -> list[str]:
    return sorted(path.stem for path in folder.glob(f"*{suffix}") if not path.stem.startswith("_"))


def example_names() -> list[str]:
    """The shipped examples a recipe may name: the scripts whose ``main`` takes the command line.

    (``basic_usage.py``, the JD core loop below the Trainer, takes no command line and no recipe.)
    """
    folder = shipped("examples")
    return [
        name
        for name in _stems(folder, ".py")
        if "def main(argv" in (folder / f"{name}.py").read_text(encoding="utf-8")
    ]


def recipe_names() -> list[str]:
    """The shipped training recipes (``hf_jd/recipes/<name>.yaml``)."""
    return _stems(shipped("recipes"), ".yaml")


def accelerate_names() -> list[str]:
    """The shipped ``accelerate`` configs (``hf_jd/recipes/accelerate/<name>.yaml``)."""
    return _stems(shipped("recipes", "accelerate"), ".yaml")


def example_script(name: object, recipe: str | Path | None = None) -> Path:
    """The shipped script of example ``name``; :class:`RecipeError` for anything else.

    Only the names of :func:`example_names` are accepted, resolved in the package: never a path, never a
    file next to the recipe or in the working directory, so that a recipe cannot run code.
    """
    names = example_names()
    if not isinstance(name, str) or name not in names:
        where = f"{recipe}: " if recipe is not None else ""
        raise RecipeError(
            f"{where}example: {name!r} is not a shipped example; valid names: {', '.join(names)}. A recipe is "
            f"configuration, not code: run your own script the explicit way, python my_script.py --config "
            f"{recipe or 'recipe.yaml'}"
        )
    return shipped("examples", f"{name}.py")


def _is_path(value: str) -> bool:
    return value.endswith(RECIPE_SUFFIXES) or "/" in value or os.sep in value


def recipe_path(value: str | Path) -> Path:
    """``--config`` VALUE: a shipped recipe's name (``text_classification``) or a path to a YAML file.

    A value with a ``.yaml`` / ``.yml`` / ``.json`` suffix or a folder in it is a path (relative to the
    working directory, as any path on a command line); a bare name is a shipped recipe.
    """
    value = str(value)
    if _is_path(value):
        path = Path(value).expanduser()
        if not path.is_file():
            raise RecipeError(
                f"recipe {value} not found. Shipped recipes are named without a path: "
                f"--config {' | '.join(recipe_names())} (hf-jd recipes lists them)."
            )
        return path
    if value not in recipe_names():
        raise RecipeError(
            f"--config {value}: no shipped recipe of that name; valid names: {', '.join(recipe_names())} "
            "(hf-jd recipes), or a path to your own YAML file."
        )
    return shipped("recipes", f"{value}.yaml")


def accelerate_config(value: str | Path) -> Path:
    """``--accelerate_config`` VALUE: a shipped config's name (``multi_gpu``) or a path to a config file."""
    value = str(value)
    if _is_path(value):
        path = Path(value).expanduser()
        if not path.is_file():
            raise RecipeError(f"accelerate config {value} not found.")
        return path
    if value not in accelerate_names():
        raise RecipeError(
            f"--accelerate_config {value}: no shipped accelerate config of that name; valid names: "
            f"{', '.join(accelerate_names())}, or a path to your own config file."
        )
    return shipped("recipes", "accelerate", f"{value}.yaml")


def description(path: Path) -> str:
    """The first sentence of a YAML file's opening comment (up to its indented example commands)."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#") or line.startswith("#  "):
            break
        words.append(line.lstrip("#").strip())
    text = " ".join(word for word in words if word)
    return re.split(r"(?<=\.)\s", text, maxsplit=1)[0] if text else "-"
