"""``JDSFTTrainer`` with ``jd_scope="global"`` on two real CPU processes (gloo): one objective per sequence
of padded batches, UPGrad, SGD, two steps. The oracle is one process on the global batch (the same
sequences, twice the per-device batch): the parameters agree to 1e-5, and the two ranks end bit-identical.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from _launch import launch_workers

pytest.importorskip("trl")

WORKER = os.path.join(os.path.dirname(__file__), "_trl_sft_worker.py")


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
    root = tmp_path_factory.mktemp("trl_sft")
    two = launch(root / "two", 2, [{"name": "upgrad", "batch": 2, "steps": 2}])
    one = launch(root / "one", 1, [{"name": "upgrad", "batch": 4, "steps": 2}])[0]
    return two, one


def test_global_sft_on_two_processes_equals_one_process_on_the_global_batch(results):
    two, one = results
    for rank in two:
        run = rank["upgrad"]
        assert run["global_step"] == 2 and run["engine"] == "gramian"
        assert relative_error(run["params"], one["upgrad"]["params"]) <= 1e-5
        for name, value in one["upgrad"]["params"].items():
            torch.testing.assert_close(run["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    # the update is not trivially zero: the parameters moved
    from distributed._trl_sft_worker import tiny_llama

    initial = {name: p.detach() for name, p in tiny_llama().named_parameters()}
    moved = relative_error(one["upgrad"]["params"], initial)
    assert moved > 1e-3


def test_the_ranks_end_bit_identical(results):
    two, _ = results
    assert all(rank["upgrad"]["identical"] for rank in two)
    flat = [torch.cat([p.reshape(-1) for p in rank["upgrad"]["params"].values()]) for rank in two]
    assert torch.equal(flat[0], flat[1])
