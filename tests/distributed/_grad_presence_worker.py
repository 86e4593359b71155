"""Worker of ``test_grad_presence.py``: which parameters get a ``.grad`` when the ranks reach different ones.

1. ``all_reduce_grads_`` directly: ``a`` has a gradient on rank 0 only, ``b`` on rank 1 only, ``c`` on none.
2. ``JDTrainer`` on a model whose branch ``sometimes`` is used by rank 0's batch only and whose ``unused``
   layer no batch uses, one AdamW step with weight decay.
Writes ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed._fixtures import finish_worker, jd_args  # noqa: E402

from hf_jd import JDTrainer  # noqa: E402
from hf_jd.distributed import all_reduce_grads_, rank  # noqa: E402


class Branches(nn.Module):
    """``sometimes`` is applied when the batch's first label is 0; ``unused`` never."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 8)
        self.sometimes = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x, labels=None):  # noqa: ANN001, ANN201
        hidden = torch.tanh(self.fc1(x))
        if labels is not None and int(labels[0]) == 0:
            hidden = hidden + torch.tanh(self.sometimes(hidden))
        return {"logits": self.head(hidden)}


def cross_entropy(outputs, inputs):  # noqa: ANN001, ANN201
    return F.cross_entropy(outputs["logits"], inputs["labels"], reduction="none")


def direct_reduction() -> dict[str, torch.Tensor | None]:
    params = {name: nn.Parameter(torch.zeros(3)) for name in ("a", "b", "c")}
    mine = params["a"] if rank() == 0 else params["b"]
    mine.grad = torch.full((3,), float(rank() + 1))
    all_reduce_grads_(list(params.values()), op="sum")
    return {name: None if p.grad is None else p.grad.clone() for name, p in params.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--engine", default="gramian")
    parser.add_argument("--scope", default="global")
    options = parser.parse_args()
    torch.set_num_threads(1)

    generator = torch.Generator().manual_seed(0)
    labels = [0, 1, 2, 1, 1, 2, 0, 2]  # rank 0's batch starts with label 0, rank 1's with label 1
    dataset = Dataset.from_dict({"x": torch.randn(8, 4, generator=generator).tolist(), "labels": labels})
    model = Branches()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = jd_args(
        options.out,
        per_device_train_batch_size=4,
        max_steps=1,
        optim="adamw_torch",
        weight_decay=0.1,
        max_grad_norm=0.0,
        jd_engine=options.engine,
        jd_scope=options.scope,
    )
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset, compute_losses_func=cross_entropy)
    trainer.train()
    reduced = direct_reduction()  # the process group exists once the Trainer has set Accelerate up
    torch.save(
        {
            "reduced": reduced,
            "initial": initial,
            "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        },
        os.path.join(options.out, f"rank{rank()}.pt"),
    )
    finish_worker()


if __name__ == "__main__":
    main()
