"""Arguments from a YAML recipe and the command line, the command line winning (as ``trl sft --config``).

``parse_args_with_config(parser, argv)`` reads ``--config recipe.yaml`` (if given), makes its values the
parser's defaults, and parses the rest of ``argv`` over them. With ``--offline_smoke`` (on the command
line or in the recipe) the smoke settings of :mod:`._smoke` sit between the two: they override the
recipe's schedule, and the command line still overrides them.

``--config`` takes a shipped recipe's name (``text_classification``) or a path to a YAML file
(:func:`~._paths.recipe_path`). A smoke run writes to ``<output_dir>-smoke``, never over the real run's
``output_dir`` (:func:`smoke_path`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from ._errors import RecipeError
from ._paths import recipe_path

# Recipe keys that are not arguments of the example: which example the recipe is for.
RECIPE_KEYS = ("example",)


SMOKE_SUFFIX = "-smoke"


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The mapping held by a YAML (or JSON) recipe: a shipped recipe's name or a path (:func:`recipe_path`).

    :class:`RecipeError` (a ``ValueError``) if it is not valid YAML or not a mapping.
    """
    path = recipe_path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{path} is not valid YAML: {' '.join(str(error).split())}") from error
    if not isinstance(values, dict):
        raise RecipeError(
            f"{path} must hold a mapping of argument names to values, got {type(values).__name__}."
        )
    return values


def smoke_path(path: str, is_file: bool = False) -> str:
    """Where a smoke run writes instead of ``path``: the folder ``outputs/run`` → ``outputs/run-smoke``, the
    file (``is_file``) ``outputs/plot.png`` → ``outputs/plot-smoke.png``; unchanged if already a smoke path.

    >>> smoke_path("outputs/text_classification"), smoke_path("outputs/iwrm_digits.png", is_file=True)
    ('outputs/text_classification-smoke', 'outputs/iwrm_digits-smoke.png')
    """
    path = path.rstrip("/\\") or path
    root, suffix = os.path.splitext(path) if is_file else (path, "")
    return path if root.endswith(SMOKE_SUFFIX) else f"{root}{SMOKE_SUFFIX}{suffix}"


def _flag_value(argv: list[str], flag: str) -> tuple[str | None, list[str]]:
    """Remove ``flag VALUE`` / ``flag=VALUE`` from ``argv``; return the value and the rest."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(flag, default=None)
    known, rest = pre.parse_known_args(argv)
    return getattr(known, flag.lstrip("-")), rest


def _default(parser: HfArgumentParser, dest: str) -> Any:
    return next((action.default for action in parser._actions if action.dest == dest), None)


def _smoke_requested(argv: list[str], recipe: dict[str, Any]) -> bool:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--offline_smoke", nargs="?", const="true", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.offline_smoke is not None:
        return str(known.offline_smoke).lower() in ("true", "1", "yes")
    return bool(recipe.get("offline_smoke", False))


def parse_args_with_config(
    parser: HfArgumentParser,
    argv: list[str],
    smoke_defaults: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
) -> tuple[Any, ...]:
    """Parse ``argv`` into ``parser``'s dataclasses over the values of ``--config FILE`` (if any).

    Precedence, lowest first: the dataclass defaults, the example's ``defaults``, ``smoke_defaults``
    (the fields the example shrinks under ``--offline_smoke``), the recipe, the generic smoke settings
    (:data:`SMOKE_TRAINING_OVERRIDES`, under ``--offline_smoke``), then the command line. Unknown recipe
    keys are refused with the valid names.
    """
    from ._smoke import SMOKE_TRAINING_OVERRIDES, cpu_defaults

    config_path, argv = _flag_value(list(argv), "--config")
    if config_path:
        config_path = str(recipe_path(config_path))
    recipe = load_recipe(config_path) if config_path else {}
    for key in RECIPE_KEYS:
        recipe.pop(key, None)
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise RecipeError(
            f"{config_path}: unknown setting(s) {', '.join(unknown)}. Valid settings are the flags of --help "
            "(model, data and JDTrainingArguments fields)."
        )
    merged: dict[str, Any] = {**cpu_defaults(), **(defaults or {})}
    smoke = _smoke_requested(argv, recipe)
    if smoke:
        merged.update({**(smoke_defaults or {}), **recipe, **SMOKE_TRAINING_OVERRIDES})
    else:
        merged.update(recipe)
    if smoke and "output_dir" in known:
        output_dir, argv = _flag_value(argv, "--output_dir")
        output_dir = output_dir or merged.get("output_dir") or _default(parser, "output_dir")
        if output_dir:
            merged["output_dir"] = smoke_path(str(output_dir))
    merged = {key: value for key, value in merged.items() if key in known}
    for action in parser._actions:
        if action.dest in merged:
            action.required = False
    parser.set_defaults(**merged)
    if "config" not in known:  # listed by --help; already taken out of argv
        parser.add_argument(
            "--config",
            help="A recipe: a shipped one's name (hf-jd recipes lists them) or a YAML file; flags override it.",
        )
    outputs = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return tuple(outputs[: len(list(parser.dataclass_types))])
