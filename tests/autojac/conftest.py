"""Small models and brute-force Jacobian oracles shared by the autojac tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn


def row_loop_jacobians(outputs: Sequence[Tensor], inputs: Sequence[Tensor]) -> list[Tensor]:
    """Oracle: one ``torch.autograd.grad`` per element of the flattened, concatenated outputs."""
    flat = torch.cat([o.reshape(-1) for o in outputs])
    rows: list[list[Tensor]] = [[] for _ in inputs]
    for i in range(flat.numel()):
        grads = torch.autograd.grad(flat[i], inputs, retain_graph=True, allow_unused=True)
        for row, g, x in zip(rows, grads, inputs):
            row.append(torch.zeros_like(x) if g is None else g)
    return [torch.stack(r) for r in rows]


class SharedTwiceMLP(nn.Module):
    """MLP whose middle weight is applied twice, plus a parameter the forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.shared = nn.Parameter(torch.randn(4, 4) / 2)
        self.out = nn.Linear(4, 2)
        self.unused = nn.Parameter(torch.randn(5))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(h @ self.shared)
        h = torch.tanh(h @ self.shared.T)
        return self.out(h)


class TiedModules(nn.Module):
    """Two Linear modules holding the very same weight tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(x))))).squeeze(-1)


class TinyGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x)
        return self.head(out[:, -1]).squeeze(-1)


def functional_jacobians(
    model: nn.Module, loss_fn: Callable[[Tensor], Tensor], x: Tensor
) -> dict[str, Tensor]:
    """Oracle: ``torch.func.jacrev`` of the per-example losses w.r.t. every named parameter."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def losses(p: dict[str, Tensor]) -> Tensor:
        return loss_fn(torch.func.functional_call(model, p, (x,)))

    return torch.func.jacrev(losses)(params)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def row_loop() -> Callable[[Sequence[Tensor], Sequence[Tensor]], list[Tensor]]:
    return row_loop_jacobians


@pytest.fixture
def jacrev_oracle() -> Callable[..., dict[str, Tensor]]:
    return functional_jacobians


@pytest.fixture
def models() -> dict[str, type[nn.Module]]:
    return {"shared_twice": SharedTwiceMLP, "tied": TiedModules, "gru": TinyGRU}
