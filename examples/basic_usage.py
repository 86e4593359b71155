"""Jacobian descent on a small regression, with the explicit-Jacobian engine.

Instead of back-propagating the mean of the per-example losses, every step forms the Jacobian of the
16 per-example losses (one row per example, one column per parameter) and lets UPGrad aggregate it
into the update written to ``.grad``: instance-wise risk minimisation (Quinton & Rey,
arXiv:2406.16232). The loop is TorchJD's, with hf_jd imports.

Run: ``python examples/basic_usage.py``
"""

from __future__ import annotations

import torch
from torch.nn import Flatten, Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD
from torch.utils.data import DataLoader, TensorDataset

from hf_jd import autojac
from hf_jd.aggregation import UPGrad


def make_data(n: int = 512, dim: int = 10, seed: int = 0) -> TensorDataset:
    """Synthetic regression: ``y = sin(x @ a) + 0.5 * x @ b + noise``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator)
    a, b = torch.randn(dim, generator=generator) / dim**0.5, torch.randn(dim, generator=generator) / dim**0.5
    y = torch.sin(x @ a) + 0.5 * (x @ b) + 0.05 * torch.randn(n, generator=generator)
    return TensorDataset(x, y)


def main(epochs: int = 3, log_every: int = 8, seed: int = 0) -> list[float]:
    """Train for ``epochs`` epochs; return the mean loss of every step."""
    torch.manual_seed(seed)
    model = Sequential(Linear(10, 32), ReLU(), Linear(32, 1), Flatten(start_dim=0))
    optimizer = SGD(model.parameters(), lr=0.05)
    dataloader = DataLoader(
        make_data(seed=seed), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    loss_fn = MSELoss(reduction="none")
    aggregator = UPGrad()

    history: list[float] = []
    for _ in range(epochs):
        for input, target in dataloader:
            losses = loss_fn(model(input), target)  # shape [16]: one loss per example
            autojac.backward(losses)  # .jac of each parameter: [16, *param.shape]
            autojac.jac_to_grad(model.parameters(), aggregator)  # .grad = UPGrad(J)
            optimizer.step()
            optimizer.zero_grad()

            history.append(losses.mean().item())
            if len(history) % log_every == 0:
                print(f"step {len(history):4d}  loss {history[-1]:.4f}")
    return history


if __name__ == "__main__":
    main()
