"""Exact global JD on two real CPU processes, several configurations per launch (``_multi_worker.py``):

* per example, global scope, the Gramian engine (``hf_jd.gramian._global``) == one process on the
  concatenated batch == the explicit-Jacobian engine, with and without gradient accumulation;
* per task, global scope (task Jacobian reduce-scattered by column shards) == one process;
* bf16 autocast: the Gramian stays float32 and the ranks stay bit-identical;
* ``even_batches=False``: uneven sizes (exact) and uneven counts (no hang, consistent).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from _launch import launch_workers

WORKER = os.path.join(os.path.dirname(__file__), "_multi_worker.py")

TWO = [
    {"name": "gramian", "engine": "auto"},
    {"name": "jacobian", "engine": "jacobian"},
    {"name": "gramian_acc", "engine": "gramian", "batch": 2, "accumulation": 2},
    {"name": "jacobian_acc", "engine": "jacobian", "batch": 2, "accumulation": 2},
    {"name": "per_task", "objectives": "per_task"},
    {"name": "bf16", "bf16": True},
    {"name": "uneven_sizes", "even_batches": False, "dataset_size": 14, "epochs": 2},
    {"name": "uneven_counts", "even_batches": False, "dataset_size": 10, "epochs": 2},
]
ONE = [
    {"name": "gramian", "batch": 8},
    {"name": "gramian_acc", "batch": 4, "accumulation": 2},
    {"name": "per_task", "objectives": "per_task", "batch": 8},
    {"name": "bf16", "bf16": True, "batch": 8},
    {"name": "uneven_sizes", "dataset_size": 14, "batch": 8, "epochs": 2},
]


def launch(out, nproc: int, runs: list[dict]) -> list[dict]:
    out.mkdir()
    return launch_workers(WORKER, out, nproc, ["--out", str(out), "--runs", json.dumps(runs)], timeout=600)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("global")
    return launch(root / "two", 2, TWO), launch(root / "one", 1, ONE)[0]


def close(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=atol, rtol=1e-5, msg=name)


def test_every_run_is_bit_identical_across_ranks(results):
    two, _ = results
    for name in two[0]:
        assert all(rank[name]["identical"] for rank in two), name
        flat = [torch.cat([p.reshape(-1) for p in rank[name]["params"].values()]) for rank in two]
        assert torch.equal(flat[0], flat[1]), name


@pytest.mark.parametrize(("name", "reference"), [("gramian", "jacobian"), ("gramian_acc", "jacobian_acc")])
def test_gramian_engine_global_step_equals_one_process_and_the_jacobian_engine(results, name, reference):
    two, one = results
    assert two[0][name]["engine"] == "gramian" and two[0][reference]["engine"] == "jacobian"
    assert two[0][name]["global_step"] == 3
    close(two[0][name]["params"], one[name]["params"])
    close(two[0][name]["params"], two[0][reference]["params"])
    from distributed._fixtures import tiny_bert

    initial = dict(tiny_bert().named_parameters())
    assert any(not torch.equal(one[name]["params"][n], initial[n].detach()) for n in initial)


def test_per_task_global_by_reduce_scatter_equals_one_process(results):
    two, one = results
    assert two[0]["per_task"]["engine"] == "jacobian"
    close(two[0]["per_task"]["params"], one["per_task"]["params"])


def test_bf16_autocast_keeps_a_float32_gramian_and_identical_ranks(results):
    two, one = results
    run = two[0]["bf16"]
    assert run["engine"] == "gramian" and run["global_step"] == 3
    assert run["gramian_dtypes"] == ["torch.float32"]
    close(run["params"], one["bf16"]["params"], atol=2e-2)


def test_uneven_batches_finish_and_stay_exact(results):
    two, one = results
    sizes = two[0]["uneven_sizes"]  # batches of 4+4 then 4+2 examples: exact against one process
    assert sizes["global_step"] == 4
    close(sizes["params"], one["uneven_sizes"]["params"])
    # 3 batches for 2 ranks: rank 0's extra batch is skipped, every rank takes 1 step per epoch
    assert [rank["uneven_counts"]["global_step"] for rank in two] == [2, 2]
    assert all(torch.isfinite(p).all() for p in two[0]["uneven_counts"]["params"].values())


def test_engine_global_gramian_equals_the_gramian_of_the_whole_batch(tmp_path):
    """Factors (ghost all-gather) and rows (all-to-all) both give the single-process Gramian."""
    out = tmp_path / "engine"
    out.mkdir()
    ranks = launch_workers(os.path.join(os.path.dirname(__file__), "_engine_worker.py"), out, 2, [str(out)])
    for strategy in ("auto", "factors", "rows"):
        assert torch.equal(ranks[0][strategy]["gramian"], ranks[1][strategy]["gramian"])
        assert ranks[0][strategy]["sizes"] == [3, 3]
        torch.testing.assert_close(ranks[0][strategy]["gramian"], ranks[0]["reference"], rtol=1e-4, atol=1e-6)
