"""Worker of ``test_backend_update_paths.py``: the generic update path of the DDP backend on two ranks.

For each objective (per example, per task) and scope (local, global) it runs one JD micro-batch with the
DDP backend's engine writer (``DdpBackend()``) and with the generic path (``DdpBackend(update="backward")``:
the explicit-Jacobian engine keeps its graph, then the backward of ``wᵀL``), each followed by the backend's
synchronisation, and saves both synchronised gradients to ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed._fixtures import finish_worker, jd_args  # noqa: E402

from hf_jd.aggregation import UPGrad  # noqa: E402
from hf_jd.trainer._backends import DdpBackend  # noqa: E402
from hf_jd.trainer._jd_step import StepSettings, jd_update  # noqa: E402


class TwoTasks(nn.Module):
    """A shared body and one head per task (task-specific parameters per task)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
        self.head_a = nn.Linear(4, 1)
        self.head_b = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.head_a(h).sum(-1), self.head_b(h).sum(-1)


def losses_of(model: TwoTasks, per_task: bool, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(10 + rank)
    x, y = torch.randn(3 + rank, 5, generator=generator), torch.randn(3 + rank, generator=generator)
    a, b = model(x)
    if per_task:
        return torch.stack([(a - y).pow(2).mean(), (b + y).abs().mean()])
    return (a - y).pow(2) + 0.5 * b.pow(2)


def step(backend: DdpBackend, per_task: bool, scope: str, out: str) -> dict[str, torch.Tensor]:
    rank, world = dist.get_rank(), dist.get_world_size()
    args = jd_args(out, jd_objectives="per_task" if per_task else "per_example", jd_scope=scope)
    model = TwoTasks()
    aggregator = UPGrad()
    (choice,) = [c for c in backend.engine_choices(args, aggregator, world) if c.kind == "jacobian"]
    engine = backend.build_engine(choice, model, args, world)
    with engine.capture():
        losses = losses_of(model, per_task, rank)
    settings = StepSettings(per_task=per_task, global_scope=scope == "global")
    jd_update(engine, aggregator, losses, 0.5, settings, backend)
    backend.after_micro_batch(engine, args, sync_gradients=True)
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    options = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for objectives in ("per_example", "per_task"):
        for scope in ("local", "global"):
            per_task = objectives == "per_task"
            results[f"{objectives}-{scope}"] = {
                "writer": step(DdpBackend(), per_task, scope, options.out),
                "generic": step(DdpBackend(update="backward"), per_task, scope, options.out),
            }
    torch.save(results, os.path.join(options.out, f"rank{dist.get_rank()}.pt"))
    finish_worker()


if __name__ == "__main__":
    main()
