"""The ``hf-jd`` command (also ``python -m hf_jd``): ``train``, ``recipes``, ``aggregators``, ``env``, ``demo``.

The scripts and recipes it runs ship inside the package (:mod:`._paths`): every command works from any
folder of a wheel install. Missing extras, an unreachable Hub and unusable recipes are one line on stderr
and exit status 1 (:mod:`._errors`), not a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from ._config import load_recipe
from ._errors import RecipeError, missing_extra, one_line
from ._launch import launch_parser, relaunch, split_launch_options, wants_launch
from ._paths import example_script, recipe_path

USAGE = """examples:
  hf-jd recipes                                                   # the shipped recipes and accelerate configs
  hf-jd train --config text_classification --learning_rate 3e-5   # a shipped recipe, by name
  hf-jd train --config text_classification --offline_smoke        # tiny model, no network
  hf-jd train --config my_recipe.yaml                             # your own recipe
  hf-jd train --config multitask --num_processes 2                # accelerate launch, DDP
  hf-jd aggregators
  hf-jd env
  hf-jd demo
  hf-jd demo --offline_smoke                                      # seconds: a tinier ViT, 3 steps
"""


def load_example(path: Path) -> ModuleType:
    """Import an example script by path (its folder first on ``sys.path``, as when run directly)."""
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(f"hf_jd_example_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"Cannot import {path}.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    try:
        spec.loader.exec_module(module)
    except ImportError as error:
        extra = missing_extra(error, f"examples/{path.name}")
        if extra is None:
            raise
        raise extra from error
    return module


def train(argv: list[str]) -> Any:
    """``hf-jd train --config RECIPE [flags]``: run the recipe's (shipped) example, re-launched when asked.

    The recipe and its ``example:`` are checked before anything runs or is launched.
    """
    options, rest = split_launch_options(argv)
    pre = argparse.ArgumentParser(prog="hf-jd train", parents=[launch_parser()], epilog=USAGE, add_help=False)
    pre.add_argument(
        "--config",
        required=True,
        help="A shipped recipe's name (hf-jd recipes lists them) or a YAML file; its `example:` names the script.",
    )
    if not any(flag.startswith("--config") for flag in rest):
        pre.print_help()
        return 2
    known, _ = pre.parse_known_args(rest)
    recipe = recipe_path(known.config)
    example = load_recipe(recipe).get("example")
    if example is None:
        raise RecipeError(
            f"{recipe} has no `example:` key naming the shipped example to run (hf-jd recipes lists them); "
            "to use it with a script, run python the_script.py --config " + str(recipe)
        )
    script = example_script(example, recipe)
    if wants_launch(options):
        return relaunch(options, rest)
    return load_example(script).main(rest)


def demo(argv: list[str]) -> Any:
    """``hf-jd demo``: ERM vs JD on the bundled digits (``examples/iwrm_digits.py``), extra flags passed on."""
    return load_example(example_script("iwrm_digits")).main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-jd",
        description="Jacobian descent for the Hugging Face Trainer.",
        epilog=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="{train,recipes,aggregators,env,demo}")
    commands.add_parser("train", help="Run a recipe (YAML) through its example script.", add_help=False)
    recipes = commands.add_parser("recipes", help="The shipped recipes and accelerate configs, as tables.")
    recipes.add_argument("--markdown", action="store_true", help="Print Markdown tables.")
    listing = commands.add_parser("aggregators", help="The aggregators (--aggregator NAME), as a table.")
    listing.add_argument("--markdown", action="store_true", help="Print a Markdown table.")
    listing.add_argument("--verbose", "-v", action="store_true", help="Add the class and a summary.")
    commands.add_parser("env", help="Versions and device, for bug reports.")
    commands.add_parser(
        "demo", help="ERM vs JD on scikit-learn's digits (the README's main job).", add_help=False
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hf-jd``; returns the exit status (1 with one line on stderr for the errors of
    :func:`~._errors.one_line`: a missing extra, an unreachable Hub, an unusable recipe)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except Exception as error:
        message = one_line(error, _command_name(argv))
        if message is None:
            raise
        print(f"hf-jd: error: {message}", file=sys.stderr)
        return 1


def _command_name(argv: list[str]) -> str:
    """``hf-jd demo``, ``hf-jd train --config NAME``: what a one-line error says needs a package."""
    words = ["hf-jd", *argv[:1]]
    if argv[:1] == ["train"] and "--config" in argv[:-1]:
        words += ["--config", argv[argv.index("--config") + 1]]
    return " ".join(words)


def _run(argv: list[str]) -> int:
    parser = build_parser()
    if argv and argv[0] in ("train", "demo"):  # their flags belong to the example's own parser
        result = (train if argv[0] == "train" else demo)(argv[1:])
        close_process_group()  # only after success: a rank that raised must not wait at the barrier
        return result if isinstance(result, int) else 0
    args = parser.parse_args(argv)
    if args.command == "recipes":
        from ._recipes import command as recipes_command

        return recipes_command(markdown=args.markdown)
    if args.command == "aggregators":
        from ._aggregators import command

        return command(markdown=args.markdown, verbose=args.verbose)
    if args.command == "env":
        from ._env import command as env_command

        return env_command()
    parser.print_help()
    return 0 if not argv else 2


def close_process_group() -> None:
    """Tear the process group down while every rank is still alive (a launched run).

    Left to interpreter exit, gloo's threads can be destroyed in the wrong order and abort one rank
    ("terminate called without an active exception") after training succeeded.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
