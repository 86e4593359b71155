"""JD on FSDP2 (``fully_shard``) models: two real CPU processes (gloo), compared with the unsharded step.

One launch of ``_fsdp_worker.py`` runs every case (a small MLP and a tiny BERT; per example and per
task; local and global scope) and the refusals; the tests below read its results.
"""

from __future__ import annotations

import os

import pytest
from _launch import launch_workers

WORKER = os.path.join(os.path.dirname(__file__), "_fsdp_worker.py")

CASES = [
    f"{model}-{objectives}-{scope}"
    for model in ("mlp", "bert")
    for objectives in ("per_example", "per_task")
    for scope in ("local", "global")
] + ["trainer-local", "trainer-global"]


def launch(out, nproc: int = 2) -> list[dict]:
    return launch_workers(WORKER, out, nproc, ["--out", str(out)])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("fsdp"))


@pytest.mark.parametrize("case", CASES)
def test_sharded_step_equals_the_unsharded_step(ranks, case):
    # Per rank: its gradient shard equals the matching rows of the unsharded step's gradient (global
    # scope: one process on the concatenated batch; local scope: the mean of every rank's own step).
    for result in ranks:
        assert result[case]["scale"] > 1e-3
        assert result[case]["error"] <= 1e-5 * max(1.0, result[case]["scale"]), result[case]["error"]


@pytest.mark.parametrize("case", CASES)
def test_each_rank_holds_only_its_shards(ranks, case):
    for result in ranks:
        assert result[case]["full_size_local"] == []
        assert result[case]["unsharded_bytes"] == 0  # FSDP freed every all-gathered parameter
    for name, (local, full) in ranks[0][case]["shards"].items():
        other = ranks[1][case]["shards"][name][0]
        assert local[0] + other[0] == full[0] and local[1:] == other[1:] == full[1:], name


def test_unsupported_setups_are_refused(ranks):
    messages = ranks[0]["refusals"]
    assert "no specialised Gramian rule" in messages["generic"]
    assert "root module" in messages["root"]
    assert "needs a model sharded with FSDP2" in messages["unsharded"]


def test_a_stock_layer_with_its_own_forward_is_served_at_its_op(ranks):
    # OwnForwardNorm overrides LayerNorm.forward: recorded at F.layer_norm, where FSDP2 passes the
    # unsharded weight (a generic-rule module would be refused under FSDP2).
    for result in ranks:
        assert result["coverage"]["body.2.weight"] == result["coverage"]["body.2.bias"] == "norm"
        assert set(result["coverage"].values()) == {"linear", "norm"}


@pytest.mark.parametrize("scope", ["local", "global"])
def test_jdtrainer_routes_a_fully_shard_model_to_the_fsdp_engine(ranks, scope):
    # JDTrainer.training_step on a fully_shard BERT (per example): the FSDP2 engine, no Jacobian fallback,
    # and the gradient shards of the unsharded step (compared in test_sharded_step_equals_the_unsharded_step).
    for result in ranks:
        assert result[f"trainer-{scope}"]["engine"] == "FSDPGramianEngine"
        assert all("Jacobian" not in choice for choice in result[f"trainer-{scope}"]["choices"])
