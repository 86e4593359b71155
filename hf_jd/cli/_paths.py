"""Where the example scripts and recipes live: the repository next to the package, or the working directory.

``hf-jd train`` runs the example a recipe names (``example: text_classification`` runs
``examples/text_classification.py``), and ``--accelerate_config multi_gpu`` reads
``recipes/accelerate/multi_gpu.yaml``. Both are looked up next to the recipe, in the working directory
and in the clone that holds ``hf_jd`` (an editable install, as ``make install`` makes).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def _roots(near: Path | None = None) -> list[Path]:
    roots = [] if near is None else [near.resolve().parent, near.resolve().parent.parent]
    return [*roots, Path.cwd(), PACKAGE_ROOT]


def find_file(relative: str, near: Path | None = None) -> Path:
    """The first ``root/relative`` that exists, ``near``'s folders first; ``FileNotFoundError`` naming the places tried."""
    tried = []
    for root in _roots(near):
        candidate = root / relative
        if candidate.is_file():
            return candidate
        tried.append(str(candidate))
    raise FileNotFoundError(
        f"{relative} not found (tried {', '.join(dict.fromkeys(tried))}). The examples and recipes ship with the "
        "repository: run hf-jd from a clone (pip install -e .), or give a path."
    )


def example_script(name: str, near: Path | None = None) -> Path:
    """The script of example ``name`` (``examples/<name>.py``); a path to a ``.py`` file is taken as is."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_absolute() and near is not None and not path.is_file():
            path = near.resolve().parent / path
        if not path.is_file():
            raise FileNotFoundError(f"Example script {name} not found.")
        return path
    return find_file(f"examples/{name}.py", near)


def accelerate_config(name: str) -> Path:
    """``multi_gpu`` / ``single_gpu`` / ``multi_node`` / ``fsdp`` → ``recipes/accelerate/<name>.yaml``; a path as is."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"accelerate config {name} not found.")
        return path
    return find_file(f"recipes/accelerate/{name}.yaml")
