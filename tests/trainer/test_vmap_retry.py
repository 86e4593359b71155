"""The explicit-Jacobian engine on a backward function that ``vmap`` cannot serve (TRL's fused LM head adds the
incoming gradient in place into a buffer of its own: ``aten::add_`` fails under the batched backward): the rows
are computed again one by one, exactly, and the engine keeps doing so, without ``jd_parallel_chunk_size=1``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from hf_jd.aggregation import UPGrad
from hf_jd.autojac import BatchedBackwardError, jac
from hf_jd.trainer._jacobian_backend import JacobianBackend


class InPlaceGradBuffer(torch.autograd.Function):
    """``x @ w`` whose backward accumulates ``∂/∂w`` in place into a zero buffer it creates (unbatched)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        x, w = ctx.saved_tensors
        grad_w = torch.zeros_like(w)
        grad_w.add_(x.transpose(-1, -2) @ grad)  # a batched gradient into an unbatched buffer: vmap refuses
        return grad @ w.transpose(-1, -2), grad_w


class FusedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 6)
        self.head = nn.Parameter(torch.randn(6, 3) * 0.3)

    def forward(self, x: Tensor) -> Tensor:
        return InPlaceGradBuffer.apply(torch.tanh(self.body(x)), self.head)


def losses_of(model: FusedHead, x: Tensor) -> Tensor:
    return model(x).pow(2).sum(dim=1).log1p()


def brute_jacobian(losses: Tensor, params: list[nn.Parameter]) -> Tensor:
    rows = []
    for k in range(losses.numel()):
        grads = torch.autograd.grad(losses[k], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_the_batched_backward_fails_on_this_function():
    model = FusedHead()
    losses = losses_of(model, torch.randn(5, 4))
    with pytest.raises(BatchedBackwardError, match="parallel_chunk_size=1"):
        jac(losses, list(model.parameters()), retain_graph=True)
    assert len(jac(losses, list(model.parameters()), parallel_chunk_size=1)) == 3  # one by one: fine


def test_the_engine_computes_the_rows_again_one_by_one_and_remembers():
    model = FusedHead()
    engine = JacobianBackend(model, per_task=False)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    with engine.capture():
        losses = losses_of(model, x)
    J = brute_jacobian(losses, engine.params)
    with pytest.warns(RuntimeWarning, match="one by one"):
        G = engine.gramian(losses)
    torch.testing.assert_close(G, J @ J.T, rtol=1e-5, atol=1e-6)
    weights = UPGrad().gramian_weighting(G)
    engine.accumulate_grad(weights, 1.0)
    update = torch.cat([p.grad.reshape(-1) for p in engine.params])
    torch.testing.assert_close(update, weights @ J, rtol=1e-5, atol=1e-6)
    assert engine.parallel_chunk_size == 1
    model.zero_grad(set_to_none=True)
    with engine.capture():  # the next step goes one by one straight away: no second warning
        losses = losses_of(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(engine.gramian(losses), G)
    engine.release()


def test_a_model_that_vmap_serves_keeps_the_batched_backward():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    engine = JacobianBackend(model, per_task=False)
    x = torch.randn(5, 4)
    with engine.capture():
        losses = model(x).squeeze(-1) ** 2
    J = brute_jacobian(losses, engine.params)
    torch.testing.assert_close(engine.gramian(losses), J @ J.T, rtol=1e-5, atol=1e-6)
    assert engine.parallel_chunk_size is None and engine._batched_proven
    engine.release()
