"""A parameter reached on any rank gets the synchronised gradient on every rank; one reached on none keeps
``.grad = None`` on every rank (AdamW then leaves it alone everywhere), as with DDP."""

from __future__ import annotations

import os

import pytest
import torch
from _launch import launch_workers

WORKER = os.path.join(os.path.dirname(__file__), "_grad_presence_worker.py")


@pytest.mark.parametrize(("engine", "scope"), [("gramian", "global"), ("jacobian", "local")])
def test_gradients_exist_where_any_rank_reached_the_parameter(tmp_path, engine, scope):
    results = launch_workers(
        WORKER,
        tmp_path,
        2,
        ["--out", str(tmp_path), "--engine", engine, "--scope", scope],
        retry_on_signal=True,
    )
    for result in results:
        reduced = result["reduced"]
        torch.testing.assert_close(reduced["a"], torch.full((3,), 1.0))  # rank 0's gradient, summed
        torch.testing.assert_close(reduced["b"], torch.full((3,), 2.0))  # rank 1's gradient, summed
        assert reduced["c"] is None
    first, second = results
    initial = first["initial"]
    for name, value in first["params"].items():
        assert torch.equal(value, second["params"][name]), f"{name} differs between the ranks"
    for name in ("unused.weight", "unused.bias"):
        assert torch.equal(first["params"][name], initial[name]), f"{name} moved although no rank reached it"
    for name in ("sometimes.weight", "head.weight"):
        assert not torch.equal(first["params"][name], initial[name]), f"{name} did not train"
