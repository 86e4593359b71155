"""What a benchmark measured: the commit and a hash of the ``hf_jd`` sources in the working tree."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def source_fingerprint() -> str:
    """Commit and a hash of the ``hf_jd`` sources measured (the working tree may hold uncommitted work)."""
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "hf_jd").rglob("*.py")):
        digest.update(str(path.relative_to(REPO_ROOT)).encode())
        digest.update(path.read_bytes())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"{commit} + hf_jd sources sha256 {digest.hexdigest()[:12]}"


def write_report(
    out_dir: str, name: str, report: dict[str, Any], markdown: Callable[[dict[str, Any]], str]
) -> None:
    """Write ``<name>.json`` and ``<name>.md`` into ``out_dir`` and print the Markdown table."""
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (directory / f"{name}.md").write_text(table + "\n")
    print(table)
