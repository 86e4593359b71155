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


def _modules_in_the_map() -> set[str]:
    """The modules ``ARCHITECTURE.md``'s module map names: full paths, names listed under a package's heading
    (``**`hf_jd/gramian/`** — `_engine.py` ...``) and under a sub-package (``_backends/` (`_base.py`, ...)``)."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    named: set[str] = set()
    for paragraph in section.split("\n\n"):
        heading = re.match(r"\*\*`(hf_jd/[\w/]+/)`\*\*", paragraph)
        prefix = heading.group(1) if heading else ""
        for package, modules in re.findall(r"`(_\w+/)`\s*\(([^)]*)\)", paragraph):
            named.update(prefix + package + token for token in re.findall(r"`([\w.]+\.py)`", modules))
        paragraph = re.sub(r"`(_\w+/)`\s*\(([^)]*)\)", "", paragraph)
        for token in re.findall(r"`([\w/.]+\.py)`", paragraph):
            if token.startswith("hf_jd/"):
                named.add(token)
            elif "/" not in token and prefix:
                named.add(prefix + token)
    return named


def test_the_module_map_lists_every_module_of_the_package():
    tree = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "hf_jd").rglob("*.py")
        if not {"examples", "recipes"} & set(path.relative_to(ROOT / "hf_jd").parts)
    }
    named = _modules_in_the_map()
    assert not tree - named, f"ARCHITECTURE.md's module map misses: {sorted(tree - named)}"
    gone = {path for path in named if path not in tree and not path.endswith("/__init__.py")}
    assert not gone, f"ARCHITECTURE.md's module map lists modules that do not exist: {sorted(gone)}"
