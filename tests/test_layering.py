"""The layer table of ARCHITECTURE.md and docs/design.md ("Layers"), enforced by imports.

Every module of ``hf_jd/`` is parsed with :mod:`ast` (never imported), and every import of another
``hf_jd`` package — absolute or relative, at module level or inside a function — is checked:

* a package may import only itself and the packages *before* it in :data:`LAYERS`;
* a module may not reach into a private module (``_x``) of *another* package: it goes through that
  package's ``__init__``.

Known exceptions are listed explicitly below; the lists may only shrink (a listed exception that no
longer occurs fails the test, so whoever removes one also removes it here).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "hf_jd"

# One entry per layer, first to last. A package may import only itself and earlier layers. Layers
# absent from the tree (e.g. ``scalarization`` before it lands) are skipped.
LAYERS: list[tuple[str, ...]] = [
    ("aggregation",),
    ("scalarization",),
    ("autojac",),
    ("gramian",),
    ("distributed",),
    ("losses",),
    ("trainer", "training_args"),
    ("cli", "__main__"),  # `python -m hf_jd` is the command line
    ("trl",),  # TRL's trainers by Jacobian descent (optional dependency)
]

# ``hf_jd/__init__.py`` is the public facade and may import anything. The leaf modules (the version, the
# tensor helpers, the name registry, argument checks, the seeded generator) import nothing from hf_jd but
# each other, and anyone may import them.
FACADE = "__init__"
LEAF_ANYWHERE = ("_version", "_tensors", "_name_registry", "_validation", "_seeded", "_objectives")

# Known layer-order violations: (importing module, imported module).
KNOWN_LAYER_VIOLATIONS: set[tuple[str, str]] = set()

# Known imports of another package's private module. Each should go through that package's
# ``__init__`` (or the helper should move); remove the entry when it does.
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imported_modules(path: Path) -> set[str]:
    """Fully qualified ``hf_jd...`` names imported by ``path`` (``from m import n`` gives ``m.n``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "hf_jd")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "hf_jd":
                continue
            found.add(module)
            # ``from hf_jd.x import _y`` may name a submodule; ``from .. import x`` certainly does.
            found.update(f"{module}.{alias.name}" for alias in node.names if alias.name != "*")
    return {m for m in found if _is_module(m)}


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:]) if "." in name else Path()
    target = PACKAGE_ROOT / relative
    return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()


def _top(name: str) -> str:
    """The subpackage (or top-level module) of ``hf_jd`` that ``name`` belongs to."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else FACADE


def _layer_index() -> dict[str, int]:
    present = {_top(_module_name(p)) for p in PACKAGE_ROOT.rglob("*.py")}
    index: dict[str, int] = {}
    for i, layer in enumerate(LAYERS):
        for package in layer:
            if package in present:
                index[package] = i
    return index


def _all_imports() -> list[tuple[str, str]]:
    edges = []
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        source = _module_name(path)
        edges.extend((source, target) for target in sorted(_imported_modules(path)))
    return edges


def test_every_package_is_in_the_layer_table() -> None:
    index = _layer_index()
    unknown = {
        _top(_module_name(p))
        for p in PACKAGE_ROOT.rglob("*.py")
        if _top(_module_name(p)) not in index and _top(_module_name(p)) not in (FACADE, *LEAF_ANYWHERE)
    }
    assert not unknown, (
        f"Add {sorted(unknown)} to LAYERS here and to the layer table of ARCHITECTURE.md and docs/design.md."
    )


def test_the_parser_sees_relative_absolute_and_function_level_imports() -> None:
    edges = set(_all_imports())
    assert ("hf_jd.trainer._guards", "hf_jd.gramian") in edges  # relative, module level
    assert ("hf_jd.trainer._engine_choice", "hf_jd.gramian") in edges  # inside a function
    assert ("hf_jd", "hf_jd.trainer") in edges  # the facade


def test_leaf_modules_import_only_other_leaves() -> None:
    leaves = {f"hf_jd.{leaf}" for leaf in LEAF_ANYWHERE}
    for leaf in LEAF_ANYWHERE:
        path = PACKAGE_ROOT / f"{leaf}.py"
        if path.is_file():
            outside = _imported_modules(path) - leaves
            assert not outside, (
                f"hf_jd/{leaf}.py may import only the other leaf modules, not {sorted(outside)}."
            )


def _layer_violations(edges: list[tuple[str, str]] | None = None) -> set[tuple[str, str]]:
    index = _layer_index()
    bad = set()
    for source, target in _all_imports() if edges is None else edges:
        src, dst = _top(source), _top(target)
        if src in (FACADE, dst) or dst in LEAF_ANYWHERE:
            continue
        if dst == FACADE or index[dst] > index[src] or (index[dst] == index[src] and src == "training_args"):
            # ``training_args`` shares the trainer's layer but must not import the trainer.
            bad.add((source, target))
    return bad


def _private_imports() -> set[tuple[str, str]]:
    bad = set()
    for source, target in _all_imports():
        if _top(source) == _top(target) or _top(target) in LEAF_ANYWHERE:
            continue
        if any(part.startswith("_") for part in target.split(".")[2:]):
            bad.add((source, target))
    return bad


def test_packages_import_only_earlier_layers() -> None:
    violations = _layer_violations()
    new = violations - KNOWN_LAYER_VIOLATIONS
    assert not new, "Imports against the layer order of ARCHITECTURE.md:\n" + "\n".join(
        f"  {s} -> {t}" for s, t in sorted(new)
    )
    fixed = KNOWN_LAYER_VIOLATIONS - violations
    assert not fixed, f"Fixed, remove from KNOWN_LAYER_VIOLATIONS: {sorted(fixed)}"


def test_no_private_module_of_another_package_is_imported() -> None:
    private = _private_imports()
    new = private - KNOWN_PRIVATE_IMPORTS
    assert not new, "Import these through the package's __init__ instead:\n" + "\n".join(
        f"  {s} -> {t}" for s, t in sorted(new)
    )
    fixed = KNOWN_PRIVATE_IMPORTS - private
    assert not fixed, f"Fixed, remove from KNOWN_PRIVATE_IMPORTS: {sorted(fixed)}"


@pytest.mark.parametrize(
    ("source", "target", "ok"),
    [
        ("hf_jd.gramian._engine", "hf_jd.aggregation", True),
        ("hf_jd.aggregation._upgrad", "hf_jd.autojac", False),
        ("hf_jd.losses._per_example", "hf_jd.trainer", False),
        ("hf_jd.training_args", "hf_jd.trainer", False),
        ("hf_jd.trainer._jd_trainer", "hf_jd.training_args", True),
        ("hf_jd.trainer._checkpoint", "hf_jd._version", True),
        ("hf_jd.gramian._engine", "hf_jd", False),
    ],
)
def test_the_rule_itself(source: str, target: str, ok: bool) -> None:
    assert (not _layer_violations([(source, target)])) == ok
