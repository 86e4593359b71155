"""Per-step state of the engine: the plan of the step, the fallback rows, which parameters are shared."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._tensors import gram
from ..autojac import SHARED_MIN_TASKS
from ._plan import Plan
from ._rule import chunked_rows
from ._use import Use
from ._utils import Context


class StepState:
    """What ``gramian`` leaves for ``accumulate_grad``."""

    def __init__(self, ctx: Context, plan: Plan, params: list[nn.Parameter]) -> None:
        self.ctx = ctx
        #: Every decision of the planning passes (:mod:`hf_jd.gramian._plan`).
        self.plan = plan
        #: The ids of the parameters whose per-row gradients come from batched autograd.
        self.fallback = plan.fallback.keys()
        self.params = params
        #: The calls whose rules serve at least one parameter (the backward captures their ``b``).
        self.active = list(plan.active)
        self.fallback_rows: dict[int, Tensor] = {}
        #: For each parameter id (outside the fallback), the live calls that use it and its name there.
        self.param_uses: dict[int, list[tuple[Use[Any], str]]] = {}
        self.shared: dict[int, bool] = {}
        #: Per-task mode: the shared-parameter contract read from the graph (``None``: decide by value).
        self.shared_by_graph: list[bool] | None = None
        #: The ids of the parameters the losses reach in the autograd graph (the others get no ``.grad``).
        self.reached: set[int] = set()
        #: The number of losses (``ctx.rows`` unless the rows are grouped into objectives).
        self.objectives = ctx.rows
        #: Objectives over groups of rows: the objective of each of the ``ctx.rows`` batch rows (``long``);
        #: the rules' rows are then the batch rows and the fallback's rows the ``objectives`` losses.
        self.row_objective: Tensor | None = None

    def index_uses(self) -> None:
        for use in self.active:
            if not use.live:
                continue
            for name, param in use.rule.params.items():
                if id(param) not in self.fallback:
                    self.param_uses.setdefault(id(param), []).append((use, name))

    def find_shared(self, per_task: bool) -> None:
        """Per example every parameter is shared; per task, those reached by at least two tasks.

        The contract is :mod:`hf_jd.autojac._shared_params`: by the autograd graph when the loss vector
        was stacked from scalars, else by value (a task reaches a parameter when the gradient it sends
        into the parameter's layer, or its fallback per-row gradient, is nonzero on this step).
        """
        if not per_task:
            self.shared = {id(p): True for p in self.params}
            return
        if self.shared_by_graph is not None:
            self.shared = {id(p): shared for p, shared in zip(self.params, self.shared_by_graph)}
            return
        m = self.ctx.rows
        reach: dict[int, Tensor] = {}
        for use in self.active:
            if not use.live:
                continue
            rows = torch.zeros(m, dtype=torch.bool, device=next(g for g in use.grads if g is not None).device)
            for grad in use.grads:
                if grad is not None:
                    rows |= (grad.reshape(m, -1) != 0).any(dim=1)
            for param in use.rule.params.values():
                if id(param) not in self.fallback:
                    reach[id(param)] = reach[id(param)] | rows if id(param) in reach else rows
        for pid, rows in self.fallback_rows.items():
            reach[pid] = (rows.reshape(m, -1) != 0).any(dim=1)
        self.shared = {
            id(p): bool(reach[id(p)].sum() >= SHARED_MIN_TASKS) if id(p) in reach else False
            for p in self.params
        }


def combined_gramian(pairs: list[tuple[Use[Any], str]], param: Tensor, ctx: Context) -> Tensor:
    """Gramian of a parameter used by several calls: per-row gradients summed across calls, by row chunks."""
    total = torch.zeros(ctx.rows, ctx.rows, dtype=ctx.dtype, device=param.device)
    for block in chunked_rows(pairs, param, ctx):
        total += gram(block)
    return total
