"""Small models of the paper benchmarks, each with a rule in hf_jd's Gramian engine (Linear, Conv2d, LayerNorm).

* IWRM (Quinton & Rey, arXiv:2406.16232, Section 5, trains small CNNs): :func:`build_iwrm_model` —
  a two-layer CNN for the image data (1-D sequences as ``1 × L`` images with ``(1, k)`` kernels), an MLP for
  tabular data, and the demo's small ViT (``examples/iwrm_digits.py``) on digits.
* Multi-task: :class:`MultiTaskModel` — a shared encoder and one linear head per task (hard parameter
  sharing, Caruana 1997), returning ``{"loss": {task: loss}}`` as ``JDTrainer`` expects with
  ``jd_objectives="per_task"``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._data import Task


class Classifier(nn.Module):
    """``logits = body(x)``; returns ``{"logits": ...}`` (per-example losses come from the caller)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        return {"logits": self.body(x)}


class ViTClassifier(nn.Module):
    """The demo's ViT (``examples/iwrm_digits.py``: patch 2, hidden 48, 2 layers, 4 heads) on 8×8 digits."""

    def __init__(self, num_labels: int, hidden_size: int = 48, num_layers: int = 2) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=8,
            patch_size=2,
            num_channels=1,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            intermediate_size=2 * hidden_size,
            num_labels=num_labels,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.vit = ViTForImageClassification(config)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> dict[str, Tensor]:
        return {"logits": self.vit(pixel_values=x).logits}


def conv_encoder(input_shape: tuple[int, ...], channels: tuple[int, int] = (16, 32)) -> tuple[nn.Module, int]:
    """Two ReLU convolutions (the second with stride 2), flattened; returns the encoder and its output size.

    Images ``(C, H, W)`` with ``H > 1`` get 3×3 kernels; sequences stored as ``(C, 1, L)`` get ``(1, 5)``
    kernels with stride ``(1, 2)`` in both layers (a 1-D CNN, as in MNIST-1D's baseline).
    """
    c, h, w = input_shape
    if h > 1:
        layers = [
            nn.Conv2d(c, channels[0], 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels[0], channels[1], 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        ]
    else:
        layers = [
            nn.Conv2d(c, channels[0], (1, 5), stride=(1, 2), padding=(0, 2)),
            nn.ReLU(),
            nn.Conv2d(channels[0], channels[1], (1, 5), stride=(1, 2), padding=(0, 2)),
            nn.ReLU(),
            nn.Flatten(),
        ]
    encoder = nn.Sequential(*layers)
    with torch.no_grad():
        size = encoder(torch.zeros(1, *input_shape)).shape[-1]
    return encoder, int(size)


def mlp_encoder(features: int, hidden: int = 32, depth: int = 1) -> tuple[nn.Module, int]:
    """``depth`` ReLU layers of width ``hidden``; returns the encoder and its output size."""
    layers: list[nn.Module] = []
    size = features
    for _ in range(depth):
        layers += [nn.Linear(size, hidden), nn.ReLU()]
        size = hidden
    return nn.Sequential(*layers), size


def build_iwrm_model(
    architecture: str, input_shape: tuple[int, ...], num_labels: int, seed: int
) -> nn.Module:
    """``cnn`` (images and 1-D sequences), ``mlp`` (tabular) or ``vit`` (8×8 images), initialised from ``seed``."""
    torch.manual_seed(seed)
    if architecture == "vit":
        return ViTClassifier(num_labels)
    if architecture == "cnn":
        encoder, size = conv_encoder(input_shape)
    elif architecture == "mlp":
        encoder, size = mlp_encoder(input_shape[0])
    else:
        raise ValueError(f"unknown architecture {architecture!r}: cnn, mlp or vit")
    return Classifier(nn.Sequential(encoder, nn.Linear(size, num_labels)))


def per_example_cross_entropy(outputs: dict[str, Tensor], inputs: dict[str, Any]) -> Tensor:
    """The IWRM loss vector: ``L_i = CE(logits_i, y_i)`` for each example of the batch (``compute_losses_func``)."""
    return F.cross_entropy(outputs["logits"], inputs["labels"], reduction="none")


def task_loss(task: Task, output: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy (classification) or mean squared error (regression) of one task over the batch."""
    if task.is_classification:
        return F.cross_entropy(output, target)
    return F.mse_loss(output.squeeze(-1), target)


class MultiTaskModel(nn.Module):
    """Shared encoder + one linear head per task; ``forward`` returns ``{"loss": {task: L_task}, "outputs": ...}``.

    ``L_task`` is the task's mean loss over the batch, so the loss vector has one entry per task (per-task JD,
    ``jd_objectives="per_task"``). A single-task baseline is the same model with one task.
    """

    def __init__(self, input_shape: tuple[int, ...], tasks: list[Task], seed: int, hidden: int = 64) -> None:
        super().__init__()
        torch.manual_seed(seed)
        if len(input_shape) == 3:
            conv, size = conv_encoder(input_shape)
            self.encoder = nn.Sequential(conv, nn.Linear(size, hidden), nn.ReLU())
        else:
            mlp, _ = mlp_encoder(input_shape[0], hidden, depth=2)
            self.encoder = mlp
        self.tasks = list(tasks)
        self.heads = nn.ModuleDict({task.name: nn.Linear(hidden, task.num_outputs) for task in self.tasks})

    def forward(self, x: Tensor, **targets: Tensor) -> dict[str, Any]:
        features = self.encoder(x)
        outputs = {task.name: self.heads[task.name](features) for task in self.tasks}
        result: dict[str, Any] = {"outputs": outputs}
        if targets:
            result["loss"] = {
                task.name: task_loss(task, outputs[task.name], targets[task.name]) for task in self.tasks
            }
        return result
