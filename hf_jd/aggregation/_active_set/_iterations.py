r"""The exact active-set iterations: solve the subproblems, test optimality, exchange bounds.

Block principal pivoting with Murty's backup rule (Kim & Park, SIAM J. Sci. Comput. 33, 2011,
Alg. 2): all infeasible bounds are exchanged while their number keeps decreasing, with a budget of
non-improving full exchanges, then only the infeasible bound of largest position.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._subproblems import Subproblems

FULL_EXCHANGE_BUDGET = 3  # non-improving full exchanges allowed before Murty's single exchange


def active_set_iterations(
    Us: Tensor, G: Tensor, active: Tensor, systems: Subproblems, tau: float, max_iter: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Run at most ``max_iter`` exact iterations on the equilibrated problem ``(Us, G)``.

    ``active`` (``[k, m]``) holds the starting active sets and is updated in place. Returns the last
    points ``V`` (``[k, m]``), the rows they certify and the iterations of each row.
    """
    k, m = Us.shape
    device = Us.device
    V = torch.zeros_like(Us)
    certified = torch.zeros(k, dtype=torch.bool, device=device)
    iterations = torch.zeros(k, dtype=torch.long, device=device)
    pivoting = _Pivoting(k, m, device)
    todo = torch.arange(k, device=device)
    for _ in range(max_iter):
        A = active[todo]
        U_todo = Us[todo]
        V_todo, failed = systems.solve(todo, U_todo, A)
        infeasible, has_infeasible, optimal = _optimality(U_todo, V_todo, A, G, tau)
        V[todo] = V_todo
        iterations[todo] += 1
        certified[todo] = optimal & ~failed
        go_on = has_infeasible & ~failed
        if not bool(go_on.any()):
            break
        todo = todo[go_on]
        active[todo] = A[go_on] ^ pivoting.exchange(todo, infeasible[go_on])
    return V, certified, iterations


def _optimality(
    U_rows: Tensor, V_rows: Tensor, A: Tensor, G: Tensor, tau: float
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Test the points ``V_rows`` of the active sets ``A`` against the KKT conditions (tolerance ``tau``).

    Returns the infeasible bounds (a free :math:`v_j < u_j` or an active :math:`\lambda_j < 0`), the
    rows that have any, and the rows that are optimal (none, and :math:`\lambda_{\mathcal F} = 0`).
    """
    lam = V_rows @ G
    tol_v = tau * V_rows.abs().amax(dim=1).clamp(min=1.0)
    tol_lam = tau * V_rows.abs().sum(dim=1).clamp(min=1.0)
    infeasible = (~A & (V_rows < U_rows - tol_v[:, None])) | (A & (lam < -tol_lam[:, None]))
    free_multiplier = torch.where(A, torch.zeros_like(lam), lam.abs()).amax(dim=1)
    has_infeasible = infeasible.any(dim=1)
    return infeasible, has_infeasible, ~has_infeasible & (free_multiplier <= tol_lam)


class _Pivoting:
    """Chooses the bounds to exchange: full block exchanges, or Murty's single exchange."""

    def __init__(self, k: int, m: int, device: torch.device) -> None:
        self.best_infeasible = torch.full((k,), m + 1, dtype=torch.long, device=device)
        self.exchange_budget = torch.full((k,), FULL_EXCHANGE_BUDGET, dtype=torch.long, device=device)
        self.positions = torch.arange(1, m + 1, device=device)

    def exchange(self, rows: Tensor, infeasible: Tensor) -> Tensor:
        """The bounds of ``rows`` to exchange (``[n, m]`` mask), given their ``infeasible`` bounds."""
        count = infeasible.sum(dim=1)
        improved = count < self.best_infeasible[rows]
        budget = self.exchange_budget[rows]
        full = improved | (budget >= 1)
        self.best_infeasible[rows] = torch.where(improved, count, self.best_infeasible[rows])
        self.exchange_budget[rows] = torch.where(
            improved, torch.full_like(budget, FULL_EXCHANGE_BUDGET), torch.where(full, budget - 1, budget)
        )
        largest = (infeasible * self.positions).argmax(dim=1, keepdim=True)
        single = torch.zeros_like(infeasible).scatter_(1, largest, True)
        return torch.where(full[:, None], infeasible, single)
