"""Toy modules that each isolate one mechanism of the JD step (broadcast, in-batch losses, NaN, BN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn

FEATURES, HIDDEN, CLASSES = 4, 8, 3


class ToyClassifier(nn.Module):
    """``fc2(dropout(tanh(fc1(x))))``; ``middle`` is applied to the hidden layer (identity by default)."""

    def __init__(self, dropout: float = 0.0, middle: nn.Module | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, HIDDEN)
        self.middle = middle or nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x, labels=None):  # noqa: ANN001, ANN201
        hidden = self.middle(torch.tanh(self.fc1(x.to(self.fc1.weight.dtype))))
        return {"logits": self.fc2(self.drop(hidden)), "hidden": hidden}


class RowBias(nn.Module):
    """Returns its ``[1, H]`` table, meant to be broadcast over the batch by the caller."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, HIDDEN) * 0.1)

    def forward(self, reference: torch.Tensor) -> torch.Tensor:
        return self.table * 1.0


class RepeatsItsBias(ToyClassifier):
    """Repeats a ``[1, H]`` module output to the batch itself (as DeBERTa/Swin do with their tables):
    the same code crashes when that output arrives already expanded to ``[B, H]``."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__(dropout)
        self.bias = RowBias()

    def forward(self, x, labels=None):  # noqa: ANN001, ANN201
        hidden = torch.tanh(self.fc1(x))
        hidden = hidden + self.bias(x).repeat(x.shape[0], 1)
        return {"logits": self.fc2(self.drop(hidden)), "hidden": hidden}


class NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: finite losses with a non-finite Jacobian."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad * float("nan")


class NaNBackward(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NaNGradient.apply(x)


def per_example_cross_entropy(outputs, inputs):  # noqa: ANN001, ANN201
    return F.cross_entropy(outputs["logits"], inputs["labels"], reduction="none")


def in_batch_contrastive(outputs, inputs):  # noqa: ANN001, ANN201
    """Each example's loss is a softmax over its similarity to every example of the batch."""
    z = outputs["hidden"]
    return F.cross_entropy(z @ z.T, torch.arange(z.shape[0]), reduction="none")


def toy_dataset(n: int = 16, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict(
        {
            "x": torch.randn(n, FEATURES, generator=generator).tolist(),
            "labels": torch.randint(0, CLASSES, (n,), generator=generator).tolist(),
        }
    )


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}
