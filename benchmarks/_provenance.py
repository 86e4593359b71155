"""What a benchmark measured: the commit and a hash of the ``hf_jd`` sources in the working tree."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def source_fingerprint() -> str:
    """Commit and a hash of the ``hf_jd`` sources measured (the working tree may hold uncommitted work)."""
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "hf_jd").rglob("*.py")):
        digest.update(str(path.relative_to(REPO_ROOT)).encode())
        digest.update(path.read_bytes())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=REPO_ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"{commit} + hf_jd sources sha256 {digest.hexdigest()[:12]}"
