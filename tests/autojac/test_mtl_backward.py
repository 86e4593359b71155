"""`mtl_backward` on a two-head model against brute force."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from hf_jd import autojac


class TwoHeads(nn.Module):
    """Trunk with a weight used twice, two heads, and one parameter shared by both heads only."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.mix = nn.Parameter(torch.randn(5, 5) / 2)
        self.head1 = nn.Linear(5, 1)
        self.head2 = nn.Linear(5, 2)
        self.head_scale = nn.Parameter(torch.tensor(1.5))  # used by both heads, not by the trunk

    def trunk(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        return torch.tanh(torch.tanh(h @ self.mix) @ self.mix)

    def task_losses(self, x: Tensor, y1: Tensor, y2: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.trunk(x)
        out1 = self.head1(features).squeeze(-1) * self.head_scale
        out2 = self.head2(features) * self.head_scale
        return features, [((out1 - y1) ** 2).mean(), ((out2 - y2) ** 2).mean()]

    def shared(self) -> list[Tensor]:
        return [self.inp.weight, self.inp.bias, self.mix]

    def task_params(self) -> list[list[Tensor]]:
        return [
            [self.head1.weight, self.head1.bias, self.head_scale],
            [self.head2.weight, self.head2.bias, self.head_scale],
        ]


def _data() -> tuple[Tensor, Tensor, Tensor]:
    return torch.randn(6, 4), torch.randn(6), torch.randn(6, 2)


def _brute_force(model: TwoHeads, data) -> tuple[list[Tensor], dict[int, Tensor]]:
    _, losses = model.task_losses(*data)
    shared_rows = [torch.autograd.grad(loss, model.shared(), retain_graph=True) for loss in losses]
    shared_jac = [torch.stack([rows[i] for rows in shared_rows]) for i in range(len(model.shared()))]
    task_grads: dict[int, Tensor] = {}
    for loss, params in zip(losses, model.task_params()):
        for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=True)):
            task_grads[id(p)] = task_grads.get(id(p), 0) + g
    return shared_jac, task_grads


@pytest.mark.parametrize("chunk", [None, 1, 2, 3])
@pytest.mark.parametrize("explicit", [False, True])
def test_mtl_backward_matches_brute_force(chunk, explicit):
    model = TwoHeads()
    data = _data()
    shared_jac, task_grads = _brute_force(model, data)
    features, losses = model.task_losses(*data)
    kwargs = {"tasks_params": model.task_params(), "shared_params": model.shared()} if explicit else {}
    autojac.mtl_backward(losses, features, parallel_chunk_size=chunk, **kwargs)

    for p, expected in zip(model.shared(), shared_jac):
        assert p.jac.shape == (2, *p.shape)
        torch.testing.assert_close(p.jac, expected)
        assert p.grad is None
    for params in model.task_params():
        for p in params:
            torch.testing.assert_close(p.grad, task_grads[id(p)])
            assert not hasattr(p, "jac")
    # The head parameter shared by both tasks got the sum of both tasks' gradients.
    assert task_grads[id(model.head_scale)].abs() > 0


def test_mtl_backward_with_grad_tensors_and_several_features():
    trunk_w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(5, 3)
    f1 = torch.tanh(x @ trunk_w)
    f2 = torch.sin(x @ trunk_w)
    head = torch.randn(4, 2, requires_grad=True)
    out1 = f1 @ head  # non-scalar task tensors
    out2 = (f2 * f1).sum(dim=0)
    g1, g2 = torch.randn_like(out1), torch.randn_like(out2)
    row1 = torch.autograd.grad(out1, trunk_w, g1, retain_graph=True)[0]
    row2 = torch.autograd.grad(out2, trunk_w, g2, retain_graph=True)[0]
    head_grad = torch.autograd.grad(out1, head, g1, retain_graph=True)[0]

    autojac.mtl_backward([out1, out2], [f1, f2], grad_tensors=[g1, g2])
    torch.testing.assert_close(trunk_w.jac, torch.stack([row1, row2]))
    torch.testing.assert_close(head.grad, head_grad)


def test_mtl_backward_accumulates_and_retains_graph():
    model = TwoHeads()
    data = _data()
    shared_jac, task_grads = _brute_force(model, data)
    features, losses = model.task_losses(*data)
    autojac.mtl_backward(losses, features, retain_graph=True)
    autojac.mtl_backward(losses, features)
    for p, expected in zip(model.shared(), shared_jac):
        torch.testing.assert_close(p.jac, 2 * expected)
    torch.testing.assert_close(model.head1.weight.grad, 2 * task_grads[id(model.head1.weight)])


def test_mtl_then_jac_to_grad_gives_upgrad_of_the_task_jacobian():
    from hf_jd.aggregation import UPGrad

    model = TwoHeads()
    data = _data()
    shared_jac, _ = _brute_force(model, data)
    features, losses = model.task_losses(*data)
    autojac.mtl_backward(losses, features)
    autojac.jac_to_grad(model.shared(), UPGrad())
    matrix = torch.cat([j.reshape(2, -1) for j in shared_jac], dim=1)
    expected = UPGrad()(matrix)
    got = torch.cat([p.grad.reshape(-1) for p in model.shared()])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
