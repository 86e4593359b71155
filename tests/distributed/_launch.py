"""Launching a worker script on real CPU processes (gloo) with ``torch.distributed.run``, and reading back
the results each rank saved as ``<out>/rank<r>.pt``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def launch_workers(
    worker: str, out: Path, nproc: int, args: list[str], *, timeout: int = 300, retry_on_signal: bool = False
) -> list[dict]:
    """Run ``worker *args`` on ``nproc`` processes; one result dict per rank, read from ``out``.

    ``retry_on_signal``: a launch killed by a signal before any Python error (seen once on a loaded
    machine) is retried once; a Python error in a worker never is.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += [worker, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if retry_on_signal and result.returncode != 0 and "Traceback" not in result.stderr:
        for path in out.iterdir():
            path.unlink()
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]
