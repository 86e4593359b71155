r"""The matrix-product phase: active-set iterations whose subproblems are solved by preconditioned CG.

For a row with active set :math:`\mathcal A` and free set :math:`\mathcal F`, the subproblem is
:math:`G_{\mathcal F\mathcal F}\, v_{\mathcal F} = -G_{\mathcal F\mathcal A}\, u_{\mathcal A}`. A direct
solve costs :math:`|\mathcal F|^3/3` per row: for ``m`` rows whose systems have about ``m / 2``
indices (nearly orthogonal gradients), :math:`m^4/24` in all. Here every row is solved instead by
conjugate gradients preconditioned with :math:`H_{\mathcal F\mathcal F}`, :math:`H = G^{-1}` (shared
by all rows). Since :math:`(G_{\mathcal F\mathcal F})^{-1} = H_{\mathcal F\mathcal F} - H_{\mathcal F
\mathcal A} (H_{\mathcal A\mathcal A})^{-1} H_{\mathcal A\mathcal F}`, the preconditioned operator
:math:`H_{\mathcal F\mathcal F} G_{\mathcal F\mathcal F} = I - H_{\mathcal F\mathcal A} G_{\mathcal A
\mathcal F}` is close to the identity when the rows are nearly orthogonal (measured condition
number 1.6 for Gaussian Gramians, against 4 for :math:`G_{\mathcal F\mathcal F}` alone). One CG
iteration for all rows is two ``[k, m] x [m, m]`` products (:math:`G` and :math:`H`, masked), so the
phase costs a few dozen matrix products, :math:`O(m^3)` each, instead of :math:`O(m^4)`.

Precision. The matrix products of CG run in float32. Two stages:

1. *Discovery*: inexact active-set steps (a few CG iterations from the previous point, multipliers
   :math:`\lambda = G v` tracked in float32, exchange of the bounds that look infeasible) until few
   bounds change;
2. *Polish*: mixed-precision iterative refinement (Wilkinson; Moler, J. ACM 14, 1967; Carson &
   Higham, SIAM J. Sci. Comput. 40, 2018): :math:`\lambda = G v` is recomputed in float64, CG in float32
   solves :math:`G_{\mathcal F\mathcal F}\, d = -\lambda_{\mathcal F}` to a relative accuracy of
   about :math:`10^{-6}`, :math:`v \leftarrow v + d`; each round gains about six digits. Rows are
   certified in float64 with the tolerances of the exact iterations (:func:`~._kkt.kkt_residuals`).

The rows this phase does not certify within its budget (slow CG on an ill-conditioned system, an
active set that keeps changing) go on to the exact iterations from the active set reached here; the
result is exact either way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._linalg import sparse_aware_product

MIN_M = 160  # below this many objectives, direct solves are as cheap as m x m matrix products (measured)
SIZE_FACTOR = 2.0  # a row takes this phase when its system has >= SIZE_FACTOR * m^(2/3) indices
DISCOVERY_CG_ITERATIONS = 2  # CG iterations per discovery step ...
DISCOVERY_STEPS = 8  # ... at most this many steps ...
DISCOVERY_STOP_FRACTION = 5e-4  # ... until at most this fraction of the bounds change in a step
DISCOVERY_TOLERANCE = 1e-5  # relative margin below which a bound is not exchanged during discovery
POLISH_CG_ITERATIONS = 8  # CG iterations per polish round (float32) ...
POLISH_CG_RELATIVE = 1e-6  # ... or fewer, once the preconditioned residual fell by this factor
SLOW_CONTRACTION = 0.25  # a row whose first CG iteration keeps more of r^T z leaves (ill-conditioned)
POLISH_ROUNDS = 4  # refinement rounds before the remaining rows go to the exact iterations


def preconditioned_rows(active: Tensor, m: int) -> Tensor:
    """Rows (mask ``[k]``) whose subproblems are large enough for this phase to pay off.

    A direct solve costs about ``s^3 / 3`` for a system of ``s = min(|F|, |A|)`` indices, this phase
    a few dozen products of a row with an ``m x m`` matrix: it is used when ``s >= SIZE_FACTOR m^(2/3)``
    and ``m >= MIN_M``.
    """
    if m < MIN_M:
        return torch.zeros(active.shape[0], dtype=torch.bool, device=active.device)
    n_active = active.sum(dim=1)
    size = torch.minimum(n_active, m - n_active)
    return size >= SIZE_FACTOR * m ** (2 / 3)


def preconditioned_active_set(
    Us: Tensor, G: Tensor, H: Tensor, active: Tensor, tau: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Run the discovery and polish stages on the equilibrated rows ``Us`` (``[k, m]``).

    ``active`` holds the starting active sets and is updated in place. Returns the points ``V``
    (float64, :math:`v_{\mathcal A} = u_{\mathcal A}` exactly), the rows they certify (same test as
    the exact iterations), the number of steps of each row, and the rows that left the phase during
    discovery (their systems turned out small, or CG converges slowly on them: factorisations suit
    them better); those rows keep their starting active sets.
    """
    k, m = Us.shape
    G32, H32 = G.float(), H.float()
    V = torch.zeros_like(Us)
    steps = torch.zeros(k, dtype=torch.long, device=Us.device)
    rows, V_rows, A_rows = _discover(Us, G32, H32, active.clone(), steps)
    left = torch.ones(k, dtype=torch.bool, device=Us.device)
    left[rows] = False
    certified = torch.zeros(k, dtype=torch.bool, device=Us.device)
    if rows.numel():
        certified[rows] = _polish(Us[rows], G, G32, H32, V_rows, A_rows, steps, rows, tau)
        V[rows], active[rows] = V_rows, A_rows
    return V, certified, steps, left


def _discover(
    Us: Tensor, G32: Tensor, H32: Tensor, active: Tensor, steps: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Inexact active-set steps (float32). Returns the rows that stay, their points and active sets.

    After each step, a row leaves when its system became smaller than the size threshold of
    :func:`preconditioned_rows`, or when its first CG iteration reduced the preconditioned residual
    by less than ``SLOW_CONTRACTION`` (an ill-conditioned system, where CG would need many iterations).
    """
    k, m = Us.shape
    rows = torch.arange(k, device=Us.device)
    V = torch.where(active, Us, torch.zeros_like(Us))
    lam32 = sparse_aware_product(V.float(), G32)
    for _ in range(DISCOVERY_STEPS):
        free = (~active).float()
        D, GD, contraction = _cg(G32, H32, free, (-lam32).mul_(free), DISCOVERY_CG_ITERATIONS, 0.0, True)
        V += D.double()
        lam32 += GD
        steps[rows] += 1
        margin_v = DISCOVERY_TOLERANCE * V.abs().amax(dim=1, keepdim=True).clamp(min=1.0)
        margin_lam = DISCOVERY_TOLERANCE * V.abs().sum(dim=1, keepdim=True).clamp(min=1.0)
        change = (~active & (Us - margin_v > V)) | (active & (lam32 < -margin_lam.float()))
        n_changes = int(change.sum())
        active ^= change
        changed = change.any(dim=1).nonzero().squeeze(1)
        jump = torch.where(change[changed] & active[changed], Us[changed] - V[changed], 0.0)
        V[changed] += jump  # newly active bounds: v_j = u_j
        lam32[changed] += sparse_aware_product(jump.float(), G32)
        stay = preconditioned_rows(active, m) & (contraction <= SLOW_CONTRACTION)
        if not bool(stay.all()):
            rows, Us, V, active, lam32 = rows[stay], Us[stay], V[stay], active[stay], lam32[stay]
        if n_changes <= DISCOVERY_STOP_FRACTION * k * m or rows.numel() == 0:
            break
    return rows, V, active


def _polish(
    Us: Tensor,
    G: Tensor,
    G32: Tensor,
    H32: Tensor,
    V: Tensor,
    active: Tensor,
    steps: Tensor,
    rows: Tensor,
    tau: float,
) -> Tensor:
    """Refinement rounds until the rows are certified; ``V``, ``active`` in place, ``steps[rows]`` counted."""
    k = Us.shape[0]
    certified = torch.zeros(k, dtype=torch.bool, device=Us.device)
    todo = torch.arange(k, device=Us.device)
    V_todo, A_todo, U_todo = V.clone(), active.clone(), Us
    lam = V_todo @ G
    for round_ in range(POLISH_ROUNDS + 1):
        infeasible, optimal = _check(U_todo, V_todo, A_todo, lam, tau)
        certified[todo] = optimal
        V[todo], active[todo] = V_todo, A_todo
        if round_ == POLISH_ROUNDS or bool(optimal.all()):
            break
        keep = ~optimal
        todo, U_todo, infeasible = todo[keep], U_todo[keep], infeasible[keep]
        V_todo, A_todo, lam = V_todo[keep], A_todo[keep] ^ infeasible, lam[keep]
        changed = infeasible.any(dim=1).nonzero().squeeze(1)
        if changed.numel():  # newly active bounds jump to v_j = u_j; update lambda (float64)
            jump = torch.where(infeasible[changed] & A_todo[changed], U_todo[changed] - V_todo[changed], 0.0)
            V_todo[changed] += jump
            lam[changed] += sparse_aware_product(jump, G)
        free = (~A_todo).float()
        residual = (-lam).float().mul_(free)
        D, _, _ = _cg(G32, H32, free, residual, POLISH_CG_ITERATIONS, POLISH_CG_RELATIVE, False)
        V_todo = V_todo + D.double()
        steps[rows[todo]] += 1
        lam = V_todo @ G
    return certified


def _check(U: Tensor, V: Tensor, A: Tensor, lam: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Infeasible bounds and optimal rows, exactly as the exact iterations test them (float64)."""
    tol_v = tau * V.abs().amax(dim=1, keepdim=True).clamp(min=1.0)
    tol_lam = tau * V.abs().sum(dim=1, keepdim=True).clamp(min=1.0)
    infeasible = (~A & (U - tol_v > V)) | (A & (lam < -tol_lam))
    free_multiplier = torch.where(A, torch.zeros_like(lam), lam.abs()).amax(dim=1, keepdim=True)
    optimal = ~infeasible.any(dim=1) & (free_multiplier <= tol_lam).squeeze(1)
    return infeasible, optimal


def _cg(
    G32: Tensor, H32: Tensor, free: Tensor, R: Tensor, iterations: int, relative: float, track: bool
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Preconditioned CG on :math:`G_{\mathcal F\mathcal F}\, d = r_{\mathcal F}` for every row (float32).

    ``free`` is the float mask of :math:`\mathcal F` and ``R`` the right-hand sides (zero off
    :math:`\mathcal F`, overwritten). The preconditioner is :math:`H_{\mathcal F\mathcal F}`. A row
    stops once its preconditioned residual :math:`r^\top z` fell by ``relative**2``. Returns ``D``
    (zero off :math:`\mathcal F`), :math:`G D` on all indices when ``track``, and the contraction
    :math:`r_1^\top z_1 / r_0^\top z_0` of the first iteration (``0`` where not measured).
    """
    D = torch.zeros_like(R)
    GD = torch.zeros_like(R) if track else R.new_zeros(())
    Z = (R @ H32).mul_(free)
    P = Z.clone()
    rz = torch.linalg.vecdot(R, Z)
    floor = rz * relative**2
    contraction = torch.zeros_like(rz)
    for iteration in range(iterations):
        Q = P @ G32
        pq = torch.linalg.vecdot(P, Q)
        moving = (pq > 0) & (rz > floor)
        if not bool(moving.any()):
            break
        alpha = torch.where(moving, rz / torch.where(moving, pq, 1.0), 0.0)[:, None]
        D.addcmul_(alpha, P)
        if track:
            GD.addcmul_(alpha, Q)
        if iteration == iterations - 1:
            break
        R.addcmul_(alpha, Q.mul_(free), value=-1.0)
        Z = (R @ H32).mul_(free)
        rz_next = torch.linalg.vecdot(R, Z)
        beta = torch.where(moving, rz_next / torch.where(moving, rz, 1.0), 0.0)
        if iteration == 0:
            contraction = beta
        P.mul_(beta[:, None]).add_(Z)
        rz = rz_next
    return D, GD, contraction
