r"""Projection onto the dual cone of the rows of a Jacobian, in its dual (weight) form.

For a Gramian :math:`G = J J^\top` and a weight vector :math:`u`, the projection of :math:`J^\top u`
onto the dual cone :math:`\{x : J x \succeq 0\}` is :math:`J^\top v` where (Quinton & Rey,
*Jacobian Descent for Multi-Objective Optimization*, arXiv:2406.16232, Proposition 1)

.. math::  v = \arg\min_{v} \; v^\top G v \quad \text{s.t.} \quad v \succeq u .

Every solver here takes the already normalised and regularised (positive-definite) Gramian and a
batch of right-hand sides ``U`` of shape ``[k, m]``, and returns ``V`` of the same shape.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from quadprog import solve_qp
from torch import Tensor

# (U [k, m], positive-definite G [m, m], mutable warm-start state or None) -> V [k, m]
DualConeSolver = Callable[[Tensor, Tensor, "dict | None"], Tensor]


def solve_dual_cone_quadprog(U: Tensor, gramian: Tensor, state: dict | None = None) -> Tensor:
    """Exact reference: one Goldfarb–Idnani QP per right-hand side with ``quadprog`` (float64, CPU).

    Cost grows as ``k * m^3``; it is the oracle the fast solvers are tested against.
    """
    G = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    G = np.ascontiguousarray((G + G.T) / 2)
    m = G.shape[0]
    constraints = np.eye(m)
    linear = np.zeros(m)
    U_np = U.detach().to(device="cpu", dtype=torch.float64).numpy().reshape(-1, m)
    V = np.empty_like(U_np)
    for i, u in enumerate(U_np):
        V[i] = solve_qp(G, linear, constraints, u, 0)[0]
    return torch.from_numpy(V).reshape(U.shape).to(device=U.device, dtype=U.dtype)


_SOLVERS: dict[str, DualConeSolver] = {"quadprog": solve_dual_cone_quadprog}
_DEFAULT_SOLVER = "quadprog"


def solver_names() -> tuple[str, ...]:
    """Names accepted by the ``solver`` argument of UPGrad and DualProj (``"auto"`` included)."""
    return ("auto", *_SOLVERS)


def resolve_solver(name: str) -> DualConeSolver:
    """Return the solver called ``name`` (``"auto"`` selects the fastest exact one)."""
    if name == "auto":
        name = _DEFAULT_SOLVER
    try:
        return _SOLVERS[name]
    except KeyError:
        raise ValueError(
            f"Unknown dual-cone solver {name!r}. Valid solvers: {', '.join(solver_names())}."
        ) from None


def project_weights(U: Tensor, gramian: Tensor, solver: str = "auto", state: dict | None = None) -> Tensor:
    r"""Solve :math:`\min_v v^\top G v \text{ s.t. } v \succeq u` for every row ``u`` of ``U``.

    ``gramian`` must already be positive definite (normalised and regularised). ``state`` is a
    dict owned by the caller (one per weighting) in which a solver may keep warm-start data between
    calls; it never changes the result, only the time to reach it.
    """
    if U.shape[-1] != gramian.shape[0]:
        raise ValueError(
            f"Right-hand sides have {U.shape[-1]} entries but the Gramian is {tuple(gramian.shape)}."
        )
    return resolve_solver(solver)(U, gramian, state)
