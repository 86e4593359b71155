r"""The starting active sets of the exact iterations: warm (kept state) or cold (guess + inexact steps).

Warm: the previous call's active sets, when the shapes match and the Gramian changed little. Cold:
:math:`\mathcal A_0 = \{j : (G u)_j > 0\}` improved by a few inexact active-set steps. The starting
point only changes the number of exact iterations, never the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._linalg import sparse_aware_product

INEXACT_STEPS = 6  # cold start: at most this many cheap inexact active-set steps ...
INEXACT_CG_ITERATIONS = 8  # ... each solving its subproblems with this many CG iterations ...
INEXACT_STOP_FRACTION = 0.005  # ... until fewer than this fraction of all the bounds change in a step
WARM_START_MAX_CHANGE = 0.5  # relative Frobenius change of G below which the warm start is used


@dataclass
class ActiveSetState:
    """Warm-start data of the active-set solver, owned by the caller and kept between calls.

    The solver reads it at the start of a call and overwrites it at the end; it never changes the
    result, only the number of iterations and (on CPU) the memory reused.

    Attributes:
        active: Final active sets of the previous call (``[k, m]`` bool), ``None`` before the first.
        gramian: Equilibrated Gramian of the previous call (``[m, m]``), ``None`` before the first.
        workspace: Free work buffers kept between calls on CPU (see ``_workspace.Workspace``).
    """

    active: Tensor | None = None
    gramian: Tensor | None = None
    workspace: list[Tensor] = field(default_factory=list)


def starting_active_set(Us: Tensor, G: Tensor, state: ActiveSetState | None) -> tuple[Tensor, bool]:
    r"""The starting active sets (warm ones, or the cold guess :math:`(G u)_j > 0`), and whether warm.

    ``Us`` and ``G`` are the equilibrated right-hand sides and Gramian. A cold guess is meant to be
    improved by :func:`inexact_active_set_steps` (or by the matrix-product phase) before the exact
    iterations.
    """
    warm = _warm_active_set(Us, G, state)
    if warm is not None:
        return warm, True
    return sparse_aware_product(Us, G) > 0, False


def _warm_active_set(Us: Tensor, G: Tensor, state: ActiveSetState | None) -> Tensor | None:
    """A copy of the previous active sets when usable (same shapes, similar Gramian), else ``None``."""
    if state is None:
        return None
    previous, previous_g = state.active, state.gramian
    if (
        previous is None
        or previous_g is None
        or previous.shape != Us.shape
        or previous.dtype != torch.bool
        or previous_g.shape != G.shape
    ):
        return None
    previous_g = previous_g.to(device=G.device, dtype=G.dtype)
    change = torch.linalg.matrix_norm(G - previous_g) / torch.linalg.matrix_norm(G)
    if bool(change <= WARM_START_MAX_CHANGE):
        return previous.to(G.device).clone()
    return None


def inexact_active_set_steps(Us: Tensor, G: Tensor, A: Tensor) -> Tensor:
    r"""Improve a cold starting active set with cheap *inexact* active-set steps.

    Each step solves the subproblems :math:`G_{\mathcal F\mathcal F} v_{\mathcal F} = -G_{\mathcal F
    \mathcal A} u_{\mathcal A}` of all rows only approximately, by a few conjugate-gradient
    iterations on the masked systems in float32 (one ``[k, m] x [m, m]`` product each, started from
    the previous step's point), then exchanges the bounds that look infeasible. These truncated
    Newton steps (Dembo, Eisenstat & Steihaug, SIAM J. Numer. Anal. 19, 1982) cost a few matrix
    products where an exact step costs a factorisation per row; they only choose the starting point
    of the exact iterations, so they cannot change the result.
    """
    k, m = Us.shape
    G32, U32 = G.float(), Us.float()
    V = U32 * A
    for _ in range(INEXACT_STEPS):
        free = (~A).float()
        V = torch.where(A, U32, V)
        _conjugate_gradient(G32, free, V)
        lam = V @ G32
        change = (~A & (U32 > V)) | (A & (lam < 0))
        A = A ^ change
        if int(change.sum()) <= INEXACT_STOP_FRACTION * k * m:
            break
    return A


def _conjugate_gradient(G32: Tensor, free: Tensor, V: Tensor) -> None:
    r"""A few CG iterations on :math:`G_{\mathcal F\mathcal F} v_{\mathcal F} = -G_{\mathcal F\mathcal A}
    u_{\mathcal A}` for every row, in place in ``V`` (which holds :math:`u_{\mathcal A}` on
    :math:`\mathcal A` and the starting point on :math:`\mathcal F`); ``free`` is the float mask of
    :math:`\mathcal F`."""
    R = (V @ G32).mul_(-free)  # residual of the masked system: -(G v)_F
    P = R.clone()
    rr = torch.einsum("ij,ij->i", R, R)
    floor = 1e-6 * rr  # a row whose residual fell by 1e3 stops moving (enough for a guess)
    for _ in range(INEXACT_CG_ITERATIONS):
        Q = (P @ G32).mul_(free)
        pq = torch.einsum("ij,ij->i", P, Q)
        moving = (pq > 0) & (rr > floor)
        if not bool(moving.any()):
            break
        alpha = torch.where(moving, rr / torch.where(moving, pq, torch.ones_like(pq)), torch.zeros_like(pq))
        V.addcmul_(alpha[:, None], P)
        R.addcmul_(alpha[:, None], Q, value=-1.0)
        rr_next = torch.einsum("ij,ij->i", R, R)
        beta = torch.where(
            moving, rr_next / torch.where(moving, rr, torch.ones_like(rr)), torch.zeros_like(rr)
        )
        P.mul_(beta[:, None]).add_(R)
        rr = rr_next
