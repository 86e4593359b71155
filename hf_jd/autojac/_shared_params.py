r"""Which parameters are *shared* between tasks: the one definition every engine uses in per-task mode.

Contract (per-task Jacobian descent, :func:`~hf_jd.autojac.mtl_backward` semantics):

* a parameter is **shared** when at least two task losses depend on it; it gets a Jacobian row per
  task, enters the Gramian :math:`G = J J^\top` and receives the aggregated update :math:`J^\top w`;
* any other parameter is **task-specific** (a head): it receives the plain sum of its task gradients,
  :math:`\sum_k \partial L_k / \partial p`, and stays out of :math:`G`.

"Depends on" is decided by the **autograd graph** whenever the loss vector was stacked from scalar
task losses (``torch.stack([l_1, …, l_k])``, which is what :func:`hf_jd.losses.task_losses` and the
usual model code build): task ``k`` depends on ``p`` when ``p`` is reachable from ``l_k``'s graph. The
answer is then a property of the model, the same on every step, whatever the gradient values are — a
shared encoder stays shared on a step where one task's gradient happens to be exactly zero (a dead
ReLU, a zero loss).

When the vector was produced by one operation (so that its entries have no separate graphs), the
graph cannot tell the tasks apart and the engines fall back to the values of this step, a per-step
approximation: task ``k`` reaches ``p`` when the gradient it sends to ``p`` is nonzero. The
explicit-Jacobian engine reads it on ``∂l_k/∂p`` (:func:`is_shared_by_value`); the Gramian engine,
which never forms that, on the gradient task ``k`` sends into ``p``'s layer. Stack the task losses to
get the exact, step-independent answer. ``mtl_backward`` needs neither: its caller names the shared
``features`` explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._graph import leaves_of_nodes

#: A parameter reached by at least this many task losses is shared.
SHARED_MIN_TASKS = 2


def shared_by_graph(losses: Tensor, params: Sequence[Tensor]) -> list[bool] | None:
    """Per parameter, whether the graphs of at least two entries of ``losses`` reach it.

    Returns ``None`` when ``losses`` was not built by ``torch.stack`` of scalars, so that its entries
    have no separate graphs (use :func:`is_shared_by_value` on the gradients instead).
    """
    per_task = leaves_per_task(losses)
    if per_task is None:
        return None
    shared = shared_leaves(per_task)
    return [id(p) in shared for p in params]


def shared_leaves(per_task: Sequence[dict[int, Tensor]]) -> dict[int, Tensor]:
    """The leaves (by ``id``) that at least :data:`SHARED_MIN_TASKS` of the per-task leaf sets hold (those of
    :func:`leaves_per_task`)."""
    counts: dict[int, int] = {}
    for leaves in per_task:
        for key in leaves:
            counts[key] = counts.get(key, 0) + 1
    every = {key: leaf for leaves in per_task for key, leaf in leaves.items()}
    return {key: every[key] for key, count in counts.items() if count >= SHARED_MIN_TASKS}


def leaves_per_task(losses: Tensor, stop: Sequence[Tensor] = ()) -> list[dict[int, Tensor]] | None:
    """Per entry of a stacked loss vector, the leaves (by ``id``) its graph reaches without going through the
    tensors of ``stop``; ``None`` when ``losses`` was not built by ``torch.stack`` of scalars."""
    roots = stacked_roots(losses)
    if roots is None:
        return None
    excluded = {t.grad_fn for t in stop if t.grad_fn is not None}
    return [{id(leaf): leaf for leaf in leaves_of_nodes([root], excluded)} for root in roots]


def reached_by_graph(losses: Tensor, params: Sequence[Tensor]) -> list[bool]:
    """Per parameter, whether the autograd graph of ``losses`` reaches it.

    This is exactly when ``torch.autograd.grad(losses.sum(), p, allow_unused=True)`` is not ``None``
    (up to autograd functions that return ``None`` for an input they received), i.e. when the stock
    ``loss.backward()`` would create ``p.grad``. The trainer's engines write no gradient into an
    unreached parameter, so that it keeps ``.grad = None`` and the optimizer skips it (AdamW applies no
    weight decay or momentum to it), as with the stock ``Trainer``.
    """
    node = losses.grad_fn
    if node is None:
        reached = {id(losses)} if losses.requires_grad else set()
    else:
        reached = {id(leaf) for leaf in leaves_of_nodes([node])}
    return [id(p) in reached for p in params]


def is_shared_by_value(per_row_gradients: Tensor) -> bool:
    """The by-value rule: at least two rows of the ``[m, ...]`` per-row gradients have a nonzero entry."""
    flat = per_row_gradients.reshape(per_row_gradients.shape[0], -1)
    return int((flat != 0).any(dim=1).sum()) >= SHARED_MIN_TASKS


def stacked_roots(vector: Tensor) -> list | None:
    """The autograd nodes of each entry of a vector built by ``torch.stack`` of scalars, else ``None``.

    An entry that does not require grad (a constant task loss) has no node: it reaches nothing.
    """
    node = vector.grad_fn
    if node is None or type(node).__name__ != "StackBackward0":
        return None
    roots = [next_node for next_node, _ in node.next_functions]
    return roots if len(roots) == vector.numel() else None
