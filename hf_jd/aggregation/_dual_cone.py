r"""Projection onto the dual cone of the rows of a Jacobian, in its dual (weight) form.

For a Gramian :math:`G = J J^\top` and a weight vector :math:`u`, the projection of :math:`J^\top u`
onto the dual cone :math:`\{x : J x \succeq 0\}` is :math:`J^\top v` where (Quinton & Rey,
*Jacobian Descent for Multi-Objective Optimization*, arXiv:2406.16232, Proposition 1)

.. math::  v = \arg\min_{v} \; v^\top G v \quad \text{s.t.} \quad v \succeq u .

Every solver here takes the already normalised and regularised (positive-definite) Gramian and a
batch of right-hand sides ``U`` of shape ``[k, m]``, and returns ``V`` of the same shape, dtype and
device. All of them are exact:

* ``"active_set"`` (:func:`~hf_jd.aggregation._active_set.solve_dual_cone_active_set`): all
  right-hand sides at once in torch (CPU or GPU) by a primal–dual active-set method that stops on a
  KKT certificate and hands any right-hand side it cannot certify to quadprog;
* ``"quadprog"``: one Goldfarb–Idnani QP per right-hand side (the reference; cost ``k m^3``);
* ``"auto"`` (the default of UPGrad and DualProj): quadprog for small problems, where its per-call
  cost is lower than the batched solver's fixed cost, the active-set solver otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ._active_set import ActiveSetState, solve_dual_cone_active_set
from ._quadprog_solver import solve_dual_cone_quadprog

# (U [k, m], positive-definite G [m, m], mutable warm-start state or None) -> V [k, m]
DualConeSolver = Callable[[Tensor, Tensor, "ActiveSetState | None"], Tensor]

__all__ = [
    "ActiveSetState",
    "DualConeSolver",
    "project_weights",
    "resolve_solver",
    "solve_dual_cone_active_set",
    "solve_dual_cone_quadprog",
    "solver_names",
]


_SOLVERS: dict[str, DualConeSolver] = {
    "active_set": solve_dual_cone_active_set,
    "quadprog": solve_dual_cone_quadprog,
}
_DEFAULT_SOLVER = "active_set"
"""The solver ``"auto"`` uses, except on problems small enough for ``_SMALL_SOLVER``."""

_SMALL_SOLVER = "quadprog"
# quadprog costs about k * m^3 (~1.5 ns per unit on one CPU core) while the batched solver has a fixed
# cost of a few milliseconds per call (a handful of iterations of batched torch operations): below
# these sizes quadprog is the faster exact solver (measured crossover: m ~ 56 for k = m right-hand
# sides, m ~ 128 for one).
_SMALL_MAX_WORK = 1 << 21  # k * m^3
_SMALL_MAX_M = 48


def _solve_auto(U: Tensor, gramian: Tensor, state: ActiveSetState | None = None) -> Tensor:
    m = gramian.shape[0]
    k = U.numel() // max(m, 1)
    small = m <= _SMALL_MAX_M or k * m**3 <= _SMALL_MAX_WORK
    return _SOLVERS[_SMALL_SOLVER if small else _DEFAULT_SOLVER](U, gramian, state)


def solver_names() -> tuple[str, ...]:
    """Names accepted by the ``solver`` argument of UPGrad and DualProj (``"auto"`` included)."""
    return ("auto", *_SOLVERS)


def resolve_solver(name: str) -> DualConeSolver:
    """Return the solver called ``name`` (``"auto"`` selects the fastest exact one for each call)."""
    if name == "auto":
        return _solve_auto
    try:
        return _SOLVERS[name]
    except KeyError:
        raise ValueError(
            f"Unknown dual-cone solver {name!r}. Valid solvers: {', '.join(solver_names())}."
        ) from None


def project_weights(
    U: Tensor, gramian: Tensor, solver: str = "auto", state: ActiveSetState | None = None
) -> Tensor:
    r"""Solve :math:`\min_v v^\top G v \text{ s.t. } v \succeq u` for every row ``u`` of ``U``.

    ``gramian`` must already be positive definite (normalised and regularised). ``state`` is an
    :class:`ActiveSetState` owned by the caller (one per weighting) in which the active-set solver
    keeps warm-start data between calls (the other solvers ignore it); it never changes the result,
    only the time to reach it.
    """
    if U.shape[-1] != gramian.shape[0]:
        raise ValueError(
            f"Right-hand sides have {U.shape[-1]} entries but the Gramian is {tuple(gramian.shape)}."
        )
    return resolve_solver(solver)(U, gramian, state)
