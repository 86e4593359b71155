"""The project carries its own design: every file its docs point to exists in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted(
    [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *(ROOT / "benchmarks").glob("*.md")],
    key=lambda path: str(path),
)
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
OUTSIDE_NOTES = "DESIGN" + ".md"  # split, so that this file does not name it
REPO_PATH = re.compile(r"`((?:hf_jd|tests|examples|recipes|benchmarks|docs)/[\w./-]+)`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(doc):
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if "://" in target or target.startswith("mailto:"):
            continue
        resolved = (doc.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
        assert resolved.exists(), f"{doc.name} links to a missing file: {target}"


@pytest.mark.parametrize("doc", ["ARCHITECTURE.md", "CONTRIBUTING.md"])
def test_the_paths_a_maintainer_is_pointed_to_exist(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    missing = [path for path in REPO_PATH.findall(text) if not (ROOT / path.rstrip("/.")).exists()]
    assert not missing, f"{doc} names paths that do not exist: {missing}"


def test_nothing_refers_to_design_notes_outside_the_repository():
    offenders = []
    for path in ROOT.rglob("*"):
        relative = path.relative_to(ROOT)
        if (
            not path.is_file()
            or relative.parts[0].startswith(".")
            or path.suffix not in {".py", ".md", ".yaml", ".sh"}
        ):
            continue
        if OUTSIDE_NOTES in path.read_text(encoding="utf-8", errors="replace"):
            offenders.append(str(relative))
    assert not offenders, (
        f"these files refer to a {OUTSIDE_NOTES} (the design lives in docs/design.md): {offenders}"
    )
