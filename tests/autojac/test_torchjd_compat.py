"""Same model, same losses: hf_jd.autojac against TorchJD's torchjd.autojac (skipped when absent)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from hf_jd import autojac
from hf_jd.aggregation import Mean, UPGrad

torchjd = pytest.importorskip("torchjd")
from torchjd import aggregation as tj_aggregation  # noqa: E402
from torchjd import autojac as tj_autojac  # noqa: E402


def _quadprog_upgrad():
    """TorchJD's UPGrad with a plain-quadprog projector (its default one needs the absent qpsolvers)."""
    quadprog = pytest.importorskip("quadprog")
    import numpy as np
    from torchjd.linalg import DualConeProjector

    class QuadprogProjector(DualConeProjector):
        # v = argmin v^T G v  s.t. v >= u, on G normalised by its trace plus a 1e-4 ridge.
        def __call__(self, U: Tensor, G: Tensor) -> Tensor:
            trace = float(G.diagonal().sum())
            g = (G / trace if trace >= 1e-4 else torch.zeros_like(G)).double().numpy()
            g = g + 1e-4 * np.eye(len(g))
            rows = [quadprog.solve_qp(g, np.zeros(len(g)), np.eye(len(g)), u)[0] for u in U.double().numpy()]
            return torch.as_tensor(np.stack(rows), dtype=G.dtype)

    return tj_aggregation.UPGrad(projector=QuadprogProjector())


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 1), nn.Flatten(0)
    )


def _take_jacs(params: list[Tensor]) -> list[Tensor]:
    jacs = [p.jac for p in params]
    for p in params:
        del p.jac
    return jacs


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_backward_and_jac_match_torchjd(chunk):
    model = _model()
    params = list(model.parameters())
    x, y = torch.randn(7, 4), torch.randn(7)

    tj_autojac.backward((model(x) - y) ** 2, parallel_chunk_size=chunk)
    theirs = _take_jacs(params)
    autojac.backward((model(x) - y) ** 2, parallel_chunk_size=chunk)
    ours = _take_jacs(params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)

    out = model(x)
    losses = [(out - y) ** 2, out.sum()]
    seeds = [torch.randn(3, 7), torch.randn(3)]
    theirs = tj_autojac.jac(losses, params, jac_outputs=seeds, retain_graph=True, parallel_chunk_size=chunk)
    ours = autojac.jac(losses, params, jac_outputs=seeds, parallel_chunk_size=chunk)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("ours_cls", "make_theirs"), [(UPGrad, _quadprog_upgrad), (Mean, tj_aggregation.Mean)]
)
def test_jac_to_grad_matches_torchjd(ours_cls, make_theirs):
    their_aggregator = make_theirs()
    model = _model()
    params = list(model.parameters())
    x, y = torch.randn(8, 4), torch.randn(8)
    losses = (model(x) - y) ** 2 * torch.linspace(-1, 1, 8)  # some losses decrease: rows conflict
    autojac.backward(losses, retain_graph=True)
    our_weights = autojac.jac_to_grad(params, ours_cls())
    ours = [p.grad for p in params]
    model.zero_grad(set_to_none=True)
    tj_autojac.backward(losses)
    their_weights = tj_autojac.jac_to_grad(params, their_aggregator)
    for a, b in zip(ours, [p.grad for p in params]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(our_weights, their_weights, rtol=1e-4, atol=1e-5)


def test_mtl_backward_matches_torchjd():
    trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
    heads = nn.ModuleList([nn.Linear(5, 1), nn.Linear(5, 1), nn.Linear(5, 1)])
    x = torch.randn(6, 4)
    all_params = [*trunk.parameters(), *heads.parameters()]

    def run(fn) -> list[Tensor]:
        features = trunk(x)
        losses = [(h(features) ** 2).mean() for h in heads]
        fn(losses, features)
        result = [p.jac if hasattr(p, "jac") else p.grad for p in all_params]
        for p in all_params:
            p.grad = None
            if hasattr(p, "jac"):
                del p.jac
        return result

    theirs = run(tj_autojac.mtl_backward)
    ours = run(autojac.mtl_backward)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert ours[0].shape == (3, 5, 4)


@pytest.mark.parametrize("name", ["backward", "jac", "jac_to_grad", "mtl_backward"])
def test_every_torchjd_keyword_is_accepted(name):
    """Code written for TorchJD runs with only the import changed: every keyword argument of TorchJD's
    function exists in hf_jd's, with the same default where TorchJD gives one."""
    import inspect

    theirs = inspect.signature(getattr(tj_autojac, name)).parameters
    ours = inspect.signature(getattr(autojac, name)).parameters
    missing = [p for p in theirs if p not in ours]
    assert not missing, f"hf_jd.autojac.{name} lacks TorchJD's {missing}"
    for parameter in theirs.values():
        if parameter.default is not inspect.Parameter.empty:
            assert ours[parameter.name].default == parameter.default, parameter.name
