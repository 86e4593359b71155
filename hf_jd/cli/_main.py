"""The ``hf-jd`` command (also ``python -m hf_jd``): ``train``, ``aggregators``, ``env``, ``demo``."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from ._config import load_recipe
from ._launch import launch_parser, relaunch, split_launch_options, wants_launch
from ._paths import example_script

USAGE = """examples:
  hf-jd train --config recipes/text_classification.yaml --learning_rate 3e-5
  hf-jd train --config recipes/text_classification.yaml --offline_smoke      # tiny model, no network
  hf-jd train --config recipes/multitask.yaml --num_processes 2              # accelerate launch, DDP
  hf-jd aggregators
  hf-jd env
  hf-jd demo
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
    spec.loader.exec_module(module)
    return module


def train(argv: list[str]) -> Any:
    """``hf-jd train --config RECIPE [flags]``: run the recipe's example, re-launched when asked."""
    options, rest = split_launch_options(argv)
    if wants_launch(options):
        return relaunch(options, rest)
    pre = argparse.ArgumentParser(prog="hf-jd train", parents=[launch_parser()], epilog=USAGE, add_help=False)
    pre.add_argument(
        "--config", required=True, help="A recipe: recipes/<name>.yaml (its `example:` names the script)."
    )
    if not any(flag.startswith("--config") for flag in rest):
        pre.print_help()
        return 2
    known, _ = pre.parse_known_args(rest)
    recipe_path = Path(known.config)
    example = load_recipe(recipe_path).get("example")
    if not example:
        raise ValueError(
            f"{recipe_path} has no `example:` key naming the script to run (e.g. text_classification)."
        )
    return load_example(example_script(str(example), recipe_path)).main(rest)


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
    commands = parser.add_subparsers(dest="command", metavar="{train,aggregators,env,demo}")
    commands.add_parser("train", help="Run a recipe (YAML) through its example script.", add_help=False)
    listing = commands.add_parser("aggregators", help="The aggregators (--aggregator NAME), as a table.")
    listing.add_argument("--markdown", action="store_true", help="Print a Markdown table.")
    listing.add_argument("--verbose", "-v", action="store_true", help="Add the class and a summary.")
    commands.add_parser("env", help="Versions and device, for bug reports.")
    commands.add_parser(
        "demo", help="ERM vs JD on scikit-learn's digits (the README's main job).", add_help=False
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``hf-jd``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in ("train", "demo"):  # their flags belong to the example's own parser
        result = (train if argv[0] == "train" else demo)(argv[1:])
        close_process_group()  # only after success: a rank that raised must not wait at the barrier
        return result if isinstance(result, int) else 0
    args = parser.parse_args(argv)
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
