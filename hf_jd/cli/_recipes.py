"""``hf-jd recipes``: the shipped training recipes and ``accelerate`` configs, read from the package.

Each recipe row is its name (``hf-jd train --config NAME``), the example it runs (its ``example:`` key)
and its first comment line; each accelerate config row is its name (``--accelerate_config NAME``) and
its first comment line. Nothing here lists them: a recipe added to ``recipes/`` appears with no change.
"""

from __future__ import annotations

from ._aggregators import render
from ._config import load_recipe
from ._paths import accelerate_names, description, recipe_names, shipped


def recipe_rows() -> list[dict[str, str]]:
    """One row per shipped recipe: name, example, description."""
    rows = []
    for name in recipe_names():
        path = shipped("recipes", f"{name}.yaml")
        rows.append(
            {
                "name": name,
                "example": str(load_recipe(path).get("example", "-")),
                "description": description(path),
            }
        )
    return rows


def accelerate_rows() -> list[dict[str, str]]:
    """One row per shipped accelerate config: name, description."""
    return [
        {"name": name, "description": description(shipped("recipes", "accelerate", f"{name}.yaml"))}
        for name in accelerate_names()
    ]


def command(markdown: bool = False) -> int:
    """Print the two tables."""
    print("Recipes (hf-jd train --config NAME; a path to your own YAML file works too):\n")
    print(render(recipe_rows(), ("name", "example", "description"), markdown))
    print("\naccelerate configs (hf-jd train --config NAME --accelerate_config CONFIG):\n")
    print(render(accelerate_rows(), ("name", "description"), markdown))
    print(
        f"\nThe scripts are in {shipped('examples')}, the recipes in {shipped('recipes')}: copy one to adapt it."
    )
    return 0
