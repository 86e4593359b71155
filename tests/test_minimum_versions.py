"""The declared minimum versions are the tested ones.

``constraints/minimum.txt`` pins every dependency of pyproject.toml's ``dependencies`` to its lower
bound; ``make test-min`` installs under it and runs the suite. These tests keep the two files in step,
and, inside that environment (``HF_JD_MINIMUM_VERSIONS=1``), check that the minimums are what is installed.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints" / "minimum.txt"


def _lower_bounds() -> dict[str, Version]:
    """``name -> X`` for each ``name>=X`` of pyproject.toml's ``[project] dependencies``."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {}
    for line in dependencies:
        requirement = Requirement(line)
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        assert len(lower) == 1, f"{line!r}: every dependency needs exactly one lower bound (>=)"
        bounds[canonicalize_name(requirement.name)] = Version(lower[0])
    return bounds


def _pins() -> dict[str, Version]:
    """``name -> X`` for each ``name==X`` line of constraints/minimum.txt."""
    pins = {}
    for raw in CONSTRAINTS.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)\s*==\s*([^\s;]+)", line)
        assert match, f"{CONSTRAINTS.name}: {raw!r} is not a `name==version` pin"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"{CONSTRAINTS.name}: {name} is pinned twice"
        pins[name] = Version(match.group(2))
    return pins


def test_the_constraints_pin_every_dependency_to_its_declared_minimum():
    assert _pins() == _lower_bounds()


@pytest.mark.skipif(
    os.environ.get("HF_JD_MINIMUM_VERSIONS") != "1", reason="only in the environment `make test-min` builds"
)
def test_the_minimum_environment_has_the_minimum_versions():
    installed = {}
    for name in _pins():
        version = Version(importlib.metadata.version(name))
        installed[name] = Version(version.base_version)  # torch 2.13.0+cpu is torch 2.13.0
    assert installed == _pins()
