"""The markers of ``tests/_marks.py`` (applied by ``tests/conftest.py``) name existing tests, and ``make test-fast`` deselects them all."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from _marks import MARKS, marked

ROOT = Path(__file__).resolve().parent.parent
FAST_SELECTION = "not slow and not distributed and not zoo"


def test_fast_loop_deselects_every_marker() -> None:
    makefile = (ROOT / "Makefile").read_text()
    target = re.search(r"^test-fast:.*?(?=^\S|\Z)", makefile, flags=re.M | re.S)
    assert target is not None, "the Makefile has no test-fast target"
    assert f'-m "{FAST_SELECTION}"' in target.group(0)
    assert set(MARKS) == {"slow", "distributed", "zoo"}


@pytest.mark.parametrize("prefix", [prefix for prefixes in MARKS.values() for prefix in prefixes])
def test_every_marked_prefix_names_tests(prefix: str) -> None:
    path, _, test = prefix.partition("::")
    target = ROOT / path
    assert target.exists(), f"{path} (marked in tests/conftest.py) does not exist: update MARKS"
    if target.is_dir():
        assert any(target.glob("test_*.py")), f"{path} holds no test file"
        return
    tree = ast.parse(target.read_text())
    names = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    if test:
        assert test in names, f"{prefix} (marked in tests/conftest.py) names no test: update MARKS"
    else:
        assert any(name.startswith("test_") for name in names), f"{path} holds no test"


def test_prefix_matching() -> None:
    prefixes = ("tests/a/", "tests/b.py", "tests/c.py::test_x")
    assert marked("tests/a/test_y.py::test_z", prefixes)
    assert marked("tests/b.py::test_q[p1]", prefixes)
    assert marked("tests/c.py::test_x[p-2]", prefixes)
    assert not marked("tests/c.py::test_xy", prefixes)
    assert not marked("tests/bb.py::test_q", prefixes)
    assert not marked("tests/ab/test_y.py::test_z", prefixes)


def test_test_modules_have_unique_basenames() -> None:
    """The test folders are not packages: two test modules of the same name in two folders cannot both be
    imported in one pytest run (``import file mismatch``), so the whole suite would fail to collect."""
    names = [path.name for path in (ROOT / "tests").rglob("test_*.py")]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f"rename one of each: {duplicates}"
