"""``JDDPOTrainer`` with ``jd_scope="global"`` on two real CPU processes (gloo): one objective per preference
pair (``ObjectiveLosses``: pair ``k`` owns rows ``k`` and ``B + k``), UPGrad, SGD, two steps.

The Gramian engine does not form the global Gramian of objectives over groups of rows across processes yet
(it refuses, ``GramianEngine.global_gramian``), so ``jd_engine="auto"`` moves to the explicit-Jacobian engine,
which is exact in the global scope. The oracle is one process on the global batch (the same pairs, twice the
per-device batch; there the Gramian engine serves the pairs): the parameters agree to 1e-5, and the two ranks
end bit-identical.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from _launch import launch_workers

pytest.importorskip("trl")

WORKER = os.path.join(os.path.dirname(__file__), "_trl_dpo_worker.py")


def launch(out, nproc: int, runs: list[dict]) -> list[dict]:
    out.mkdir()
    return launch_workers(
        WORKER, out, nproc, ["--out", str(out), "--runs", json.dumps(runs)], timeout=600, retry_on_signal=True
    )


def relative_error(actual: dict, expected: dict) -> float:
    diff = torch.cat([(actual[name] - expected[name]).flatten() for name in expected])
    return float(diff.norm() / torch.cat([value.flatten() for value in expected.values()]).norm())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl_dpo")
    two = launch(
        root / "two",
        2,
        [
            {"name": "global", "batch": 2, "steps": 2},
            {"name": "local", "batch": 2, "steps": 2, "scope": "local"},
        ],
    )
    one = launch(root / "one", 1, [{"name": "global", "batch": 4, "steps": 2}])[0]
    return two, one


def test_global_dpo_on_two_processes_switches_to_the_jacobian_engine_and_equals_one_process(results):
    two, one = results
    assert one["global"]["engine"] == "gramian"  # one process: the per-pair Gramian P G_rows Pᵀ
    expected = one["global"]["params"]
    for rank in two:
        run = rank["global"]
        assert run["global_step"] == 2 and run["engine"] == "jacobian"
        assert relative_error(run["params"], expected) <= 1e-5
        for name, value in expected.items():
            torch.testing.assert_close(run["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_the_local_scope_keeps_the_gramian_engine_and_is_a_different_step(results):
    two, one = results
    assert all(rank["local"]["engine"] == "gramian" for rank in two)
    # the mean of the per-rank UPGrad updates is not the global UPGrad update: the comparison above can fail
    assert relative_error(two[0]["local"]["params"], one["global"]["params"]) > 1e-3


def test_the_ranks_end_bit_identical(results):
    two, _ = results
    for name in ("global", "local"):
        assert all(rank[name]["identical"] for rank in two), name
        flat = [torch.cat([p.reshape(-1) for p in rank[name]["params"].values()]) for rank in two]
        assert torch.equal(flat[0], flat[1]), name
