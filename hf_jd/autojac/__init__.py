r"""Explicit-Jacobian engine: Jacobian descent by materialising the Jacobian of a vector of losses.

- :func:`jac` returns Jacobians :math:`J_{ij} = \partial f_i / \partial \theta_j` as values;
- :func:`backward` accumulates them into the ``.jac`` field of each parameter (like ``.grad``);
- :func:`mtl_backward` does the same for multi-task models: plain gradients for task heads, one
  Jacobian row per task for the shared parameters;
- :func:`jac_to_grad` aggregates the ``.jac`` fields into ``.grad`` with an
  :class:`~hf_jd.aggregation.Aggregator` (e.g. UPGrad), ready for ``optimizer.step()``;
- :func:`shared_by_graph` / :func:`is_shared_by_value`: which parameters are shared between tasks,
  the one definition both JD engines use in per-task mode; :func:`reached_by_graph`: which parameters
  the losses reach at all (the others keep ``.grad = None``); :func:`leaves_per_task` /
  :func:`shared_leaves`: the graph walks behind them (each task's leaves, optionally stopping at given
  tensors; the leaves two tasks reach).

The API (names, signatures, ``.jac`` fields) follows TorchJD's ``torchjd.autojac``, from Quinton &
Rey, *Jacobian Descent for Multi-Objective Optimization* (arXiv:2406.16232).

Example:
    >>> from hf_jd import autojac
    >>> from hf_jd.aggregation import UPGrad
    >>> losses = loss_fn(model(x), y)  # shape [batch], reduction="none"  # doctest: +SKIP
    >>> autojac.backward(losses)  # doctest: +SKIP
    >>> autojac.jac_to_grad(model.parameters(), UPGrad())  # doctest: +SKIP
    >>> optimizer.step(); optimizer.zero_grad()  # doctest: +SKIP
"""

from ._backward import backward
from ._jac import jac
from ._jac_to_grad import jac_to_grad
from ._mtl_backward import mtl_backward
from ._rows import BatchedBackwardError
from ._shared_params import (
    SHARED_MIN_TASKS,
    is_shared_by_value,
    leaves_per_task,
    reached_by_graph,
    shared_by_graph,
    shared_leaves,
)

__all__ = [
    "SHARED_MIN_TASKS",
    "BatchedBackwardError",
    "backward",
    "is_shared_by_value",
    "jac",
    "leaves_per_task",
    "jac_to_grad",
    "mtl_backward",
    "reached_by_graph",
    "shared_by_graph",
    "shared_leaves",
]
