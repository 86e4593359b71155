r"""Entry points of the active-set solver: checks, scaling, the exact iterations, quadprog fallback."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._quadprog_solver import solve_dual_cone_quadprog
from ._iterations import active_set_iterations
from ._kkt import NOT_PD_MESSAGE, KKTResiduals, equilibrate, kkt_tolerance, residuals
from ._preconditioned import preconditioned_active_set, preconditioned_rows
from ._start import ActiveSetState, inexact_active_set_steps, starting_active_set
from ._subproblems import Subproblems
from ._workspace import Workspace

DEFAULT_MAX_ITER = 100
"""Active-set iterations before the remaining right-hand sides go to quadprog."""

DUAL_ROUTE_MAX_COND = 1e8  # above this (estimated) condition number, only the primal route is used


@dataclass(frozen=True)
class ActiveSetInfo:
    """How :func:`solve_dual_cone_active_set_with_info` found its solution (per row: shape ``[k]``).

    Attributes:
        iterations: Active-set iterations of each row (steps of the preconditioned-CG phase
            included).
        certified: Rows certified by the active-set loop.
        fallback: Rows solved by quadprog (the others).
        residuals: Relative KKT residuals of the returned solution (see :func:`~._kkt.kkt_residuals`).
        active: Final active sets (``[k, m]``).
        tolerance: The certificate's tolerance (:func:`~._kkt.kkt_tolerance`).
        warm_start: Whether the starting point came from the caller's :class:`ActiveSetState`.
        factorizations: Systems factorised from scratch, all iterations together.
        cg_certified: Rows certified by the preconditioned-CG phase (no factorisation).
    """

    iterations: Tensor
    certified: Tensor
    fallback: Tensor
    residuals: KKTResiduals
    active: Tensor
    tolerance: float
    warm_start: bool
    factorizations: int
    cg_certified: Tensor


def solve_dual_cone_active_set(
    U: Tensor,
    gramian: Tensor,
    state: ActiveSetState | None = None,
    max_iter: int | None = None,
    *,
    preconditioned_cg: bool = True,
) -> Tensor:
    r"""Solve :math:`\min_v v^\top G v` s.t. :math:`v \succeq u` for every row ``u`` of ``U`` at once.

    Exact: every returned row either carries a KKT certificate (see :func:`~._kkt.kkt_residuals`) or
    was solved by quadprog. Works on CPU and GPU; the arithmetic is float64 whatever the input dtype,
    the result has ``U``'s dtype and device.

    Args:
        U: Right-hand sides, shape ``[k, m]`` (or ``[m]``).
        gramian: Positive-definite ``[m, m]`` matrix (normalised and regularised by the caller).
        state: Warm-start data owned by the caller and kept between calls. The final active sets and
            the (equilibrated) Gramian are stored in it and used as the starting point of the next
            call when the shapes match and the Gramian changed little; on CPU it also keeps the
            solver's work buffers. It never changes the result.
        max_iter: Active-set iterations before falling back to quadprog (default
            :data:`DEFAULT_MAX_ITER`; ``0`` sends every row to quadprog).
        preconditioned_cg: Whether rows with large subproblems start with the preconditioned-CG
            phase (:mod:`._preconditioned`); ``False`` gives the factorisation-only method (kept to
            measure against). It never changes the result.

    Raises:
        ValueError: if ``U`` or ``gramian`` has non-finite entries, the shapes do not match, or the
            Gramian is not (numerically) positive definite.
    """
    return _solve(U, gramian, state, max_iter, preconditioned_cg, with_info=False)[0]


def solve_dual_cone_active_set_with_info(
    U: Tensor,
    gramian: Tensor,
    state: ActiveSetState | None = None,
    max_iter: int | None = None,
    *,
    preconditioned_cg: bool = True,
) -> tuple[Tensor, ActiveSetInfo]:
    """:func:`solve_dual_cone_active_set`, also returning an :class:`ActiveSetInfo` on the solve."""
    V, info = _solve(U, gramian, state, max_iter, preconditioned_cg, with_info=True)
    assert info is not None
    return V, info


def _solve(
    U: Tensor,
    gramian: Tensor,
    state: ActiveSetState | None,
    max_iter: int | None,
    preconditioned_cg: bool,
    with_info: bool,
) -> tuple[Tensor, ActiveSetInfo | None]:
    """The solution at the caller's scale, and the info when ``with_info`` (it costs a product)."""
    m = _check_inputs(U, gramian)
    device = gramian.device
    k = U.numel() // m if m else (U.shape[0] if U.dim() > 1 else 1)
    U64 = U.detach().reshape(k, m).to(device=device, dtype=torch.float64)
    tau = kkt_tolerance(m)
    if k == 0 or m == 0:
        return torch.zeros_like(U), (_empty_info(k, m, tau, U64) if with_info else None)

    G, Us, sqrt_diag, scale_u = equilibrate(gramian.detach().to(torch.float64), U64)
    H = _inverse_if_well_conditioned(G)
    max_iter = DEFAULT_MAX_ITER if max_iter is None else max_iter
    active, warm = starting_active_set(Us, G, state)
    V = torch.zeros_like(Us)
    iterations = torch.zeros(k, dtype=torch.long, device=device)
    # Large subproblems: preconditioned CG first (matrix products only); it certifies most rows.
    cg_rows = torch.zeros(k, dtype=torch.bool, device=device)
    if preconditioned_cg and H is not None and max_iter > 0:
        cg_rows = preconditioned_rows(active, m)
    cg_certified = torch.zeros(k, dtype=torch.bool, device=device)
    if H is not None and bool(cg_rows.any()):
        rows = cg_rows.nonzero().squeeze(1)
        A_cg = active[rows]
        V[rows], cg_certified[rows], iterations[rows], left = preconditioned_active_set(
            Us[rows], G, H, A_cg, tau
        )
        active[rows] = A_cg
        cg_rows[rows[left]] = False  # back to their starting active sets, as if never in the phase
    # The other rows: factorisations, from an improved cold guess (the CG phase's uncertified rows
    # keep the active sets it reached).
    if not warm and bool((~cg_rows).any()):
        cold = (~cg_rows).nonzero().squeeze(1)
        active[cold] = inexact_active_set_steps(Us[cold], G, active[cold])
    exact_rows = (~cg_certified).nonzero().squeeze(1)
    # On CPU the work buffers are kept in the state between calls (None: they are not kept).
    kept_buffers = state.workspace if state is not None and device.type == "cpu" else None
    workspace = Workspace(kept_buffers, device)
    systems = Subproblems(G, H, exact_rows.shape[0], workspace)
    certified = cg_certified.clone()
    if exact_rows.numel():
        A_exact = active[exact_rows]
        V[exact_rows], certified[exact_rows], exact_iterations = active_set_iterations(
            Us[exact_rows], G, A_exact, systems, tau, max_iter
        )
        active[exact_rows] = A_exact
        iterations[exact_rows] += exact_iterations
        systems.release_all()
    fallback = ~certified
    _solve_with_quadprog(Us, G, tau, fallback, V, active)
    if state is not None:
        if device.type == "cpu":
            state.workspace = workspace.trimmed(2 * k * (m // 2 + 1) ** 2)
        state.active = active
        state.gramian = G

    # Back to the caller's scale; the active bounds are copied, so that they hold exactly.
    V_out = torch.where(active, U64, V * scale_u[:, None] / sqrt_diag)
    V_out = V_out.to(dtype=U.dtype, device=U.device).reshape(U.shape)
    if not with_info:
        return V_out, None
    info = ActiveSetInfo(
        iterations,
        certified,
        fallback,
        residuals(Us, V, V @ G),
        active,
        tau,
        warm,
        systems.factorizations,
        cg_certified,
    )
    return V_out, info


def _check_inputs(U: Tensor, gramian: Tensor) -> int:
    """Raise a ``ValueError`` on mismatched shapes or non-finite entries; return ``m``."""
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"Expected a square [m, m] Gramian, got shape {tuple(gramian.shape)}.")
    m = gramian.shape[0]
    if U.dim() == 0 or U.shape[-1] != m:
        raise ValueError(
            f"Right-hand sides of shape {tuple(U.shape)} do not match the Gramian {tuple(gramian.shape)}."
        )
    if not bool(torch.isfinite(gramian).all()):
        raise ValueError("The Gramian passed to the dual-cone solver contains NaN or inf values.")
    if not bool(torch.isfinite(U).all()):
        raise ValueError("The right-hand sides passed to the dual-cone solver contain NaN or inf values.")
    return m


def _inverse_if_well_conditioned(G: Tensor) -> Tensor | None:
    """:math:`G^{-1}` for the dual route, or ``None`` when ``G`` is too ill-conditioned for it.

    Raises a ``ValueError`` when ``G`` is not positive definite.
    """
    chol, chol_info = torch.linalg.cholesky_ex(G)
    if int(chol_info) != 0:
        raise ValueError(NOT_PD_MESSAGE)
    chol_diag = chol.diagonal()
    cond_estimate = float((chol_diag.max() / chol_diag.min()) ** 2)
    return torch.cholesky_inverse(chol) if cond_estimate < DUAL_ROUTE_MAX_COND else None


def _solve_with_quadprog(
    Us: Tensor, G: Tensor, tau: float, rows_mask: Tensor, V: Tensor, active: Tensor
) -> None:
    """Solve the rows of ``rows_mask`` with quadprog, writing their points and active sets in place."""
    if not bool(rows_mask.any()):
        return
    rows = rows_mask.nonzero().squeeze(1)
    V_fb = solve_dual_cone_quadprog(Us[rows], G).to(device=G.device, dtype=torch.float64)
    V[rows] = V_fb
    tol_v = tau * V_fb.abs().amax(dim=1, keepdim=True).clamp(min=1.0)
    active[rows] = V_fb - Us[rows] <= tol_v


def _empty_info(k: int, m: int, tau: float, U64: Tensor) -> ActiveSetInfo:
    """The info of a problem without rows or without objectives (nothing to solve)."""
    device = U64.device
    zeros = U64.new_zeros((k,))
    return ActiveSetInfo(
        iterations=torch.zeros(k, dtype=torch.long, device=device),
        certified=torch.ones(k, dtype=torch.bool, device=device),
        fallback=torch.zeros(k, dtype=torch.bool, device=device),
        residuals=KKTResiduals(primal=zeros, dual=zeros, complementarity=zeros),
        active=torch.zeros((k, m), dtype=torch.bool, device=device),
        tolerance=tau,
        warm_start=False,
        factorizations=0,
        cg_certified=torch.zeros(k, dtype=torch.bool, device=device),
    )
