"""The generic update path of the DDP backend on two real CPU processes (gloo): after the backend's
synchronisation, the backward of ``wᵀL`` gives every rank the gradient the engine's writer gives.

The cases differ in what crosses ranks: local scope (mean of the local steps), per-example global (each
rank's slice of the global weights, summed), per-task global (the engine writes the rank-mean Jacobian's
update; the generic path writes each rank's own, which the backend then averages).
"""

from __future__ import annotations

import os

import pytest
import torch
from _launch import launch_workers

WORKER = os.path.join(os.path.dirname(__file__), "_backend_worker.py")
CASES = [
    f"{objectives}-{scope}" for objectives in ("per_example", "per_task") for scope in ("local", "global")
]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("backends")
    return launch_workers(WORKER, out, 2, ["--out", str(out)], retry_on_signal=True)


@pytest.mark.parametrize("case", CASES)
def test_the_generic_path_equals_the_engine_writer_after_synchronisation(ranks, case):
    for result in ranks:
        writer, generic = result[case]["writer"], result[case]["generic"]
        assert writer.keys() == generic.keys()
        for name, grad in writer.items():
            assert float(grad.abs().max()) > 1e-3, name
            torch.testing.assert_close(generic[name], grad, atol=1e-6, rtol=0, msg=f"{case}: {name}")
    for name, grad in ranks[0][case]["generic"].items():  # synchronised: the same on every rank
        torch.testing.assert_close(ranks[1][case]["generic"][name], grad, atol=0, rtol=0)
