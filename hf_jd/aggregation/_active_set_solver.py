r"""Batched exact dual-cone solver: a primal–dual active-set method over all right-hand sides at once.

Problem
-------
For a positive-definite Gramian :math:`G \in \mathbb{R}^{m \times m}` and right-hand sides
:math:`u_1, \dots, u_k \in \mathbb{R}^m` (the rows of ``U``), solve the ``k`` bound-constrained,
strictly convex quadratic programs

.. math:: v_r = \arg\min_v \tfrac12 v^\top G v \quad \text{s.t.} \quad v \succeq u_r .

This is the dual form of the projection onto the dual cone of the rows of a Jacobian (Quinton & Rey,
*Jacobian Descent for Multi-Objective Optimization*, arXiv:2406.16232, Proposition 1): UPGrad uses
:math:`u_i = p_i e_i` (``k = m``), DualProj a single :math:`u = p`.

Optimality (KKT) conditions, with the multiplier :math:`\lambda = G v`:

.. math:: \lambda \succeq 0, \qquad v \succeq u, \qquad \lambda \odot (v - u) = 0 .

For a guess :math:`\mathcal A` of the *active set* (the bounds that hold with equality) and its
complement, the free set :math:`\mathcal F`, the conditions other than the signs are linear:
:math:`v_{\mathcal A} = u_{\mathcal A}` and :math:`\lambda_{\mathcal F} = (G v)_{\mathcal F} = 0`, i.e.

.. math:: G_{\mathcal F \mathcal F}\, v_{\mathcal F} = - G_{\mathcal F \mathcal A}\, u_{\mathcal A}
          \qquad \text{(primal route, a system of size } |\mathcal F|\text{)},

or, equivalently with :math:`H = G^{-1}` and :math:`v = H \lambda`, :math:`\lambda_{\mathcal F} = 0`,

.. math:: H_{\mathcal A \mathcal A}\, \lambda_{\mathcal A} = u_{\mathcal A}
          \qquad \text{(dual route, a system of size } |\mathcal A|\text{)}.

Each right-hand side takes the smaller of the two systems, so no system is larger than ``m / 2``.
The problem is first equilibrated (:math:`G \to D^{-1/2} G D^{-1/2}` with :math:`D = \mathrm{diag}(G)`,
:math:`u \to D^{1/2} u`; bound constraints are invariant under this change of variables), which
makes the tolerances below meaningful for badly scaled Gramians.

Algorithm
---------
The primal–dual active-set method (Hintermüller, Ito & Kunisch, SIAM J. Optim. 13, 2002), which
for this problem is the block principal pivoting method for the linear complementarity problem
:math:`\mathrm{LCP}(G u, G)` in :math:`w = v - u` (Júdice & Pires, Comput. Oper. Res. 21, 1994;
Kim & Park, SIAM J. Sci. Comput. 33, 2011; see also Nocedal & Wright, *Numerical Optimization*,
ch. 16, and Bertsekas' projected Newton method for bound constraints):

1. solve the equality-constrained subproblem of every right-hand side for its current active set:
   a batched factorisation of the gathered systems (padded with the identity, grouped by size), or,
   when the set changed in only a few indices since the last factorisation, a bordered
   (Schur-complement) solve that reuses it (the Schur-complement update of active-set QP methods;
   Gill, Murray, Saunders & Wright, 1990; Nocedal & Wright, §16.5);
2. a free index with :math:`v_j < u_j` or an active index with :math:`\lambda_j < 0` is *infeasible*;
   exchange all of them (full block exchange) while the number of infeasibilities keeps decreasing,
   allow three non-improving full exchanges, then exchange only the infeasible index of largest
   position (Murty's single-pivot rule), which makes the method finite because :math:`G` is a
   P-matrix;
3. stop a right-hand side when its point satisfies the KKT conditions within a tolerance relative
   to :math:`G` and :math:`v` (the *certificate*, see :func:`kkt_residuals`).

Right-hand sides that are not certified within ``max_iter`` iterations (or whose subproblem could not
be factorised) are solved by the exact ``quadprog`` reference, so the result is exact either way.

Starting point. Warm: the previous call's active sets, when the Gramian is close to the previous one
(kept in the caller's ``state`` dict). Cold: one active-set step from :math:`v = u`
(:math:`\mathcal A_0 = \{j : (G u)_j > 0\}`; for UPGrad, the objectives that do not conflict with
objective ``i``), followed by a few cheap *inexact* active-set steps whose subproblems are solved
approximately by a few float32 conjugate-gradient iterations (matrix products only), which usually
leaves one or two exact iterations to do. The starting point only changes the number of iterations,
never the result: the answer is whatever satisfies the certificate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from threading import Lock

import torch
from torch import Tensor

from ._quadprog_solver import solve_dual_cone_quadprog

DEFAULT_MAX_ITER = 100
"""Active-set iterations before the remaining right-hand sides go to quadprog."""

_INEXACT_STEPS = 6  # cold start: at most this many cheap inexact active-set steps ...
_INEXACT_CG_ITERATIONS = 8  # ... each solving its subproblems with this many CG iterations ...
_INEXACT_STOP_FRACTION = 0.005  # ... until fewer than this fraction of all the bounds change in a step
_FULL_EXCHANGE_BUDGET = 3  # non-improving full exchanges allowed before Murty's single exchange
_DUAL_ROUTE_MAX_COND = 1e8  # above this (estimated) condition number, only the primal route is used
_WARM_START_MAX_CHANGE = 0.5  # relative Frobenius change of G below which the warm start is used
_MAX_CHUNK_ELEMENTS = 1 << 25  # entries of one batch of gathered systems (256 MB in float64)
_SCHUR_MIN_CHANGES = 8  # a bordered update may change this many indices of the factorised system...
_SCHUR_CHANGE_FRACTION = 0.1  # ... or this fraction of it, whichever is larger
_ROWS_PER_THREAD = 16  # smallest share of a batched LAPACK call given to a worker thread (CPU)
_EPS = torch.finfo(torch.float64).eps

_NOT_PD_MESSAGE = (
    "The Gramian passed to the dual-cone solver is not positive definite. Normalise it and add a "
    "small ridge first (see hf_jd.aggregation._gramian_utils.regularize_gramian)."
)


def kkt_tolerance(m: int) -> float:
    """Relative tolerance of the KKT certificate for ``m`` objectives (float64 arithmetic).

    See :func:`kkt_residuals` for the quantities it bounds.
    """
    return 64.0 * max(m, 16) * _EPS


def kkt_residuals(U: Tensor, gramian: Tensor, V: Tensor) -> dict[str, Tensor]:
    r"""Relative KKT residuals of ``V`` for :math:`\min_v \tfrac12 v^\top G v` s.t. :math:`v \succeq u`.

    The problem is first brought to the scale the certificate uses, which does not change its
    solution: with :math:`D = \mathrm{diag}(G)`, :math:`\tilde G = D^{-1/2} G D^{-1/2}` (unit
    diagonal), :math:`\tilde v = D^{1/2} v / c` and :math:`\tilde u = D^{1/2} u / c`, where
    :math:`c = \|D^{1/2} u\|_\infty` (``1`` for a zero row). With :math:`\lambda = \tilde G \tilde v`,
    :math:`s_v = \max(1, \|\tilde v\|_\infty)` and :math:`s_\lambda = \max(1, \|\tilde v\|_1)` (a bound
    on :math:`\|\lambda\|_\infty`), per row:

    * ``primal``: :math:`\max_j (\tilde u_j - \tilde v_j)_+ / s_v` (feasibility :math:`v \succeq u`);
    * ``dual``: :math:`\max_j (-\lambda_j)_+ / s_\lambda` (:math:`\lambda \succeq 0`);
    * ``complementarity``: :math:`\max_j |\lambda_j|\,|\tilde v_j - \tilde u_j| / (s_\lambda (1 + s_v))`.

    Stationarity :math:`\tilde G \tilde v - \lambda = 0` holds by the definition of :math:`\lambda`.
    All three are ``0`` at the exact solution; the solver certifies a row when all three are at most
    :func:`kkt_tolerance`.
    """
    m = gramian.shape[0]
    G = gramian.detach().to(torch.float64)
    U64 = U.detach().reshape(-1, m).to(device=G.device, dtype=torch.float64)
    V64 = V.detach().reshape(-1, m).to(device=G.device, dtype=torch.float64)
    Gs, Us, sqrt_diag, scale_u = _equilibrate(G, U64)
    Vs = V64 * sqrt_diag / scale_u[:, None]
    return _residuals(Us, Vs, Vs @ Gs)


def solve_dual_cone_active_set(
    U: Tensor,
    gramian: Tensor,
    state: dict | None = None,
    return_info: bool = False,
    max_iter: int | None = None,
) -> Tensor | tuple[Tensor, dict]:
    r"""Solve :math:`\min_v v^\top G v` s.t. :math:`v \succeq u` for every row ``u`` of ``U`` at once.

    Exact: every returned row either carries a KKT certificate (see :func:`kkt_residuals`) or was
    solved by quadprog. Works on CPU and GPU; the arithmetic is float64 whatever the input dtype, the
    result has ``U``'s dtype and device.

    Args:
        U: Right-hand sides, shape ``[k, m]`` (or ``[m]``).
        gramian: Positive-definite ``[m, m]`` matrix (normalised and regularised by the caller).
        state: Dict owned by the caller and kept between calls. The final active sets and the
            (equilibrated) Gramian are stored in it and used as the starting point of the next call
            when the shapes match and the Gramian changed little; on CPU it also keeps the solver's
            work buffers. It never changes the result.
        return_info: Also return a dict with, per row, ``iterations``, ``certified`` (by the
            active-set loop), ``fallback`` (solved by quadprog), the relative KKT residuals
            ``primal``, ``dual`` and ``complementarity`` of the returned solution (see
            :func:`kkt_residuals`), the final ``active`` sets, and the scalars ``tolerance``,
            ``warm_start`` and ``factorizations`` (systems factorised from scratch, all iterations).
        max_iter: Active-set iterations before falling back to quadprog (default
            :data:`DEFAULT_MAX_ITER`; ``0`` sends every row to quadprog).

    Raises:
        ValueError: if ``U`` or ``gramian`` has non-finite entries, the shapes do not match, or the
            Gramian is not (numerically) positive definite.
    """
    if max_iter is None:
        max_iter = DEFAULT_MAX_ITER
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

    device = gramian.device
    k = U.numel() // m if m else (U.shape[0] if U.dim() > 1 else 1)
    U64 = U.detach().reshape(k, m).to(device=device, dtype=torch.float64)
    tau = kkt_tolerance(m)
    if k == 0 or m == 0:
        V_empty = torch.zeros_like(U)
        zeros = U64.new_zeros((k,))
        info = {
            "iterations": torch.zeros(k, dtype=torch.long, device=device),
            "certified": torch.ones(k, dtype=torch.bool, device=device),
            "fallback": torch.zeros(k, dtype=torch.bool, device=device),
            "primal": zeros,
            "dual": zeros,
            "complementarity": zeros,
            "active": torch.zeros((k, m), dtype=torch.bool, device=device),
            "tolerance": tau,
            "warm_start": False,
            "factorizations": 0,
        }
        return (V_empty, info) if return_info else V_empty

    G, Us, sqrt_diag, scale_u = _equilibrate(gramian.detach().to(torch.float64), U64)
    chol, chol_info = torch.linalg.cholesky_ex(G)
    if int(chol_info) != 0:
        raise ValueError(_NOT_PD_MESSAGE)
    chol_diag = chol.diagonal()
    cond_estimate = float((chol_diag.max() / chol_diag.min()) ** 2)
    H = torch.cholesky_inverse(chol) if cond_estimate < _DUAL_ROUTE_MAX_COND else None

    active, warm = _initial_active_set(Us, G, state)
    if not warm:
        active = _inexact_active_set_steps(Us, G, active)
    keep_workspace = state is not None and device.type == "cpu"
    workspace = _Workspace(state.get("workspace") if keep_workspace else None, device)
    systems = _Subproblems(G, H, k, workspace)

    V = torch.zeros_like(Us)
    certified = torch.zeros(k, dtype=torch.bool, device=device)
    iterations = torch.zeros(k, dtype=torch.long, device=device)
    best_infeasible = torch.full((k,), m + 1, dtype=torch.long, device=device)
    exchange_budget = torch.full((k,), _FULL_EXCHANGE_BUDGET, dtype=torch.long, device=device)
    positions = torch.arange(1, m + 1, device=device)
    todo = torch.arange(k, device=device)
    for _ in range(max_iter):
        A = active[todo]
        U_todo = Us[todo]
        V_todo, failed = systems.solve(todo, U_todo, A)
        lam = V_todo @ G
        tol_v = tau * V_todo.abs().amax(dim=1).clamp(min=1.0)
        tol_lam = tau * V_todo.abs().sum(dim=1).clamp(min=1.0)
        infeasible = (~A & (V_todo < U_todo - tol_v[:, None])) | (A & (lam < -tol_lam[:, None]))
        free_multiplier = torch.where(A, torch.zeros_like(lam), lam.abs()).amax(dim=1)
        has_infeasible = infeasible.any(dim=1)
        ok = ~has_infeasible & (free_multiplier <= tol_lam) & ~failed
        V[todo] = V_todo
        iterations[todo] += 1
        certified[todo] = ok
        go_on = has_infeasible & ~failed
        if not bool(go_on.any()):
            break
        # Block principal pivoting with Murty's backup rule (Kim & Park, 2011, Alg. 2).
        todo = todo[go_on]
        infeasible = infeasible[go_on]
        count = infeasible.sum(dim=1)
        improved = count < best_infeasible[todo]
        budget = exchange_budget[todo]
        full = improved | (budget >= 1)
        best_infeasible[todo] = torch.where(improved, count, best_infeasible[todo])
        exchange_budget[todo] = torch.where(
            improved, torch.full_like(budget, _FULL_EXCHANGE_BUDGET), torch.where(full, budget - 1, budget)
        )
        largest = (infeasible * positions).argmax(dim=1, keepdim=True)
        single = torch.zeros_like(infeasible).scatter_(1, largest, True)
        active[todo] = A[go_on] ^ torch.where(full[:, None], infeasible, single)

    systems.release_all()
    if keep_workspace:
        state["workspace"] = workspace.trimmed(2 * k * (m // 2 + 1) ** 2)

    fallback = ~certified
    if bool(fallback.any()):
        rows = fallback.nonzero().squeeze(1)
        V_fb = solve_dual_cone_quadprog(Us[rows], G).to(device=device, dtype=torch.float64)
        V[rows] = V_fb
        tol_v = tau * V_fb.abs().amax(dim=1, keepdim=True).clamp(min=1.0)
        active[rows] = V_fb - Us[rows] <= tol_v

    if state is not None:
        state["active"] = active
        state["gramian"] = G

    # Back to the caller's scale; the active bounds are copied, so that they hold exactly.
    V_out = torch.where(active, U64, V * scale_u[:, None] / sqrt_diag)
    V_out = V_out.to(dtype=U.dtype, device=U.device).reshape(U.shape)
    if not return_info:
        return V_out
    info = {
        "iterations": iterations,
        "certified": certified,
        "fallback": fallback,
        **_residuals(Us, V, V @ G),
        "active": active,
        "tolerance": tau,
        "warm_start": warm,
        "factorizations": systems.factorizations,
    }
    return V_out, info


def _equilibrate(G: Tensor, U: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Symmetrise and equilibrate: :math:`\tilde G = D^{-1/2} G D^{-1/2}`, rows of :math:`D^{1/2} U`
    divided by their largest magnitude. Returns ``(G~, U~, sqrt(diag G), row scales)``."""
    G = (G + G.T) / 2
    diag = G.diagonal()
    if not bool((diag > 0).all()):
        raise ValueError(_NOT_PD_MESSAGE)
    sqrt_diag = diag.sqrt()
    G = G / sqrt_diag[:, None] / sqrt_diag[None, :]
    U = U * sqrt_diag
    scale_u = U.abs().amax(dim=1)
    scale_u = torch.where(scale_u > 0, scale_u, torch.ones_like(scale_u))
    return G, U / scale_u[:, None], sqrt_diag, scale_u


def _residuals(Us: Tensor, Vs: Tensor, lam: Tensor) -> dict[str, Tensor]:
    """Relative KKT residuals of equilibrated rows (see :func:`kkt_residuals`)."""
    scale_v = Vs.abs().amax(dim=1).clamp(min=1.0)
    scale_lam = Vs.abs().sum(dim=1).clamp(min=1.0)
    gap = Vs - Us
    return {
        "primal": (-gap).clamp(min=0).amax(dim=1) / scale_v,
        "dual": (-lam).clamp(min=0).amax(dim=1) / scale_lam,
        "complementarity": (lam.abs() * gap.abs()).amax(dim=1) / (scale_lam * (1 + scale_v)),
    }


def _initial_active_set(Us: Tensor, G: Tensor, state: dict | None) -> tuple[Tensor, bool]:
    """Previous active sets when usable (same shapes, similar Gramian), else ``{j : (G u)_j > 0}``."""
    if state is not None:
        previous = state.get("active")
        previous_g = state.get("gramian")
        if (
            isinstance(previous, Tensor)
            and isinstance(previous_g, Tensor)
            and previous.shape == Us.shape
            and previous.dtype == torch.bool
            and previous_g.shape == G.shape
        ):
            previous_g = previous_g.to(device=G.device, dtype=G.dtype)
            change = torch.linalg.matrix_norm(G - previous_g) / torch.linalg.matrix_norm(G)
            if bool(change <= _WARM_START_MAX_CHANGE):
                return previous.to(G.device).clone(), True
    return (Us @ G) > 0, False


def _inexact_active_set_steps(Us: Tensor, G: Tensor, A: Tensor) -> Tensor:
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
    for _ in range(_INEXACT_STEPS):
        free = (~A).float()
        V = torch.where(A, U32, V)
        R = (V @ G32).mul_(-free)  # residual of the masked system: -(G v)_F
        P = R.clone()
        rr = torch.einsum("ij,ij->i", R, R)
        floor = 1e-6 * rr  # a row whose residual fell by 1e3 stops moving (enough for a guess)
        for _ in range(_INEXACT_CG_ITERATIONS):
            Q = (P @ G32).mul_(free)
            pq = torch.einsum("ij,ij->i", P, Q)
            moving = (pq > 0) & (rr > floor)
            if not bool(moving.any()):
                break
            alpha = torch.where(
                moving, rr / torch.where(moving, pq, torch.ones_like(pq)), torch.zeros_like(pq)
            )
            V.addcmul_(alpha[:, None], P)
            R.addcmul_(alpha[:, None], Q, value=-1.0)
            rr_next = torch.einsum("ij,ij->i", R, R)
            beta = torch.where(
                moving, rr_next / torch.where(moving, rr, torch.ones_like(rr)), torch.zeros_like(rr)
            )
            P.mul_(beta[:, None]).add_(R)
            rr = rr_next
        lam = V @ G32
        change = (~A & (U32 > V)) | (A & (lam < 0))
        A = A ^ change
        if int(change.sum()) <= _INEXACT_STOP_FRACTION * k * m:
            break
    return A


def _sorted_indices(mask: Tensor, width: int, sink: int) -> Tensor:
    """Per row, the indices where ``mask`` holds, increasing, padded with ``sink`` to ``width``."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device) < mask.sum(dim=1, keepdim=True)
    return torch.where(valid, order, torch.full_like(order, sink))


def _factorize_in_place(device: torch.device) -> bool:
    """Whether to factorise the gathered systems in their own buffer (CPU: saves a copy and fresh
    pages) rather than with the plain out-of-place call (other devices)."""
    return device.type == "cpu"


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = Lock()


def _in_blocks(device: torch.device, count: int, work: Callable[[int, int], None]) -> None:
    """Run ``work(lo, hi)`` over ``range(count)``, split across threads on CPU.

    Batched LAPACK calls run one matrix after the other in torch on CPU; splitting the batch lets
    ``torch.get_num_threads()`` threads factorise at once (torch releases the GIL in its kernels).
    """
    global _POOL, _POOL_SIZE
    threads = min(torch.get_num_threads(), count // _ROWS_PER_THREAD) if device.type == "cpu" else 1
    if threads <= 1:
        work(0, count)
        return
    with _POOL_LOCK:
        if _POOL is None or threads > _POOL_SIZE:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hf_jd_dual_cone")
            _POOL_SIZE = threads
        pool = _POOL
    bounds = [count * t // threads for t in range(threads + 1)]
    futures = [pool.submit(work, bounds[t], bounds[t + 1]) for t in range(threads)]
    for future in futures:
        future.result()


class _Workspace:
    """Pools of flat buffers (by dtype) for the gathered systems and their indices.

    The systems are the largest tensors of the solver; reusing their memory (within a call, and
    across calls through the caller's ``state`` on CPU) avoids paying for fresh pages each time.
    """

    def __init__(self, pool: list[Tensor] | None, device: torch.device) -> None:
        self.free = [b for b in (pool or []) if isinstance(b, Tensor) and b.device == device]
        self.device = device

    def take(self, numel: int, dtype: torch.dtype) -> Tensor:
        fitting = [i for i, b in enumerate(self.free) if b.dtype == dtype and b.numel() >= numel]
        if fitting:
            return self.free.pop(min(fitting, key=lambda i: self.free[i].numel()))
        return torch.empty(numel, dtype=dtype, device=self.device)

    def give(self, buffer: Tensor) -> None:
        self.free.append(buffer)

    def trimmed(self, max_float64_entries: int) -> list[Tensor]:
        """The largest free buffers whose total size stays within that many float64 entries."""
        kept, total = [], 0
        for buffer in sorted(self.free, key=lambda b: b.numel() * b.element_size(), reverse=True):
            size = buffer.numel() * buffer.element_size() // 8
            if total + size <= max_float64_entries:
                kept.append(buffer)
                total += size
        return kept


class _Chunk:
    """Cholesky factors of the gathered systems of a group of rows, stored in a workspace buffer."""

    def __init__(self, idx: Tensor, buffer: Tensor, factor: Tensor, route: Tensor) -> None:
        self.idx = idx  # [n, s] global indices of each system, padded with the sink index m
        self.buffer = buffer  # flat storage of ``factor``
        self.factor = factor  # [n, s, s] upper triangular R (M = R^T R), column-major
        self.route = route  # [n] 0: primal (matrix G), 1: dual (matrix H)


class _Subproblems:
    r"""Solves the equality-constrained subproblems of the active-set iterations.

    For row ``r`` with active set :math:`\mathcal A` the system is :math:`G_{\mathcal F\mathcal F}`
    (primal route) or :math:`H_{\mathcal A\mathcal A}` (dual route), whichever is smaller when the row
    is factorised. The systems are symmetric positive definite; they are gathered into a buffer and
    factorised there in place by Cholesky. Factors are kept: when the system of a later iteration
    differs from the factorised one by removing the indices :math:`R` and adding :math:`D`, the
    bordered system

    .. math:: \begin{pmatrix} K & X_{BD} & E_R \\ X_{DB} & X_{DD} & 0 \\ E_R^\top & 0 & 0
              \end{pmatrix} \begin{pmatrix} y_B \\ y_D \\ \mu \end{pmatrix} =
              \begin{pmatrix} b_B \\ b_D \\ 0 \end{pmatrix}

    (:math:`K = X_{BB}` the factorised system, :math:`E_R` selecting the removed indices, which the
    last block row pins to zero) is solved through its Schur complement of size :math:`|R| + |D|`,
    with the old factor only.
    """

    def __init__(self, G: Tensor, H: Tensor | None, k: int, workspace: _Workspace) -> None:
        m = G.shape[0]
        self.m = m
        self.G = G
        self.H = H
        aug = G.new_zeros((1 if H is None else 2, m + 1, m + 1))
        aug[0, :m, :m] = G
        if H is not None:
            aug[1, :m, :m] = H
        self.aug = aug  # row and column m (the sink index used for padding) are zero
        self.flat = aug.reshape(-1)
        device = G.device
        self.chunk_of = torch.full((k,), -1, dtype=torch.long, device=device)
        self.slot_of = torch.zeros(k, dtype=torch.long, device=device)
        self.base_system = torch.zeros((k, m), dtype=torch.bool, device=device)
        self.base_dual = torch.zeros(k, dtype=torch.bool, device=device)
        self.base_size = torch.zeros(k, dtype=torch.long, device=device)
        self.chunks: dict[int, _Chunk] = {}
        self.next_chunk = 0
        self.factorizations = 0
        self.workspace = workspace

    def solve(self, rows: Tensor, U: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``V`` (``v_A = u_A``, ``v_F`` minimising) for ``rows`` and a mask of failures."""
        n, m = U.shape
        has_base = self.chunk_of[rows] >= 0
        base_dual = self.base_dual[rows]
        changes = (torch.where(base_dual[:, None], A, ~A) ^ self.base_system[rows]).sum(dim=1)
        limit = (self.base_size[rows] * _SCHUR_CHANGE_FRACTION).long().clamp(min=_SCHUR_MIN_CHANGES)
        update = has_base & (changes <= limit)
        # Route: the factorised one for a bordered update, else the smaller system.
        n_active = A.sum(dim=1)
        if self.H is None:
            dual = torch.zeros(n, dtype=torch.bool, device=U.device)
        else:
            dual = torch.where(update, base_dual, n_active < m - n_active)
        system = torch.where(dual[:, None], A, ~A)
        U_active = U * A
        # Right-hand side of each system: u_A (dual route) or -(G u_A)_F (primal route).
        rhs = U.new_zeros((n, m + 1))  # the last entry is the sink's
        rhs[:, :m] = torch.where(dual[:, None], U_active, -(U_active @ self.G))
        Y = U.new_zeros((n, m + 1))
        failed = torch.zeros(n, dtype=torch.bool, device=U.device)

        if bool(update.any()):
            upd = update.nonzero().squeeze(1)
            chunk_ids = self.chunk_of[rows[upd]]
            for cid in torch.unique(chunk_ids).tolist():
                sel = upd[chunk_ids == cid]
                Y[sel], failed[sel] = self._update(self.chunks[cid], rows[sel], system[sel], rhs[sel])
            update = update & ~failed  # rows whose bordered system failed are factorised afresh
            failed.zero_()

        fresh = (~update).nonzero().squeeze(1)
        if fresh.numel():
            self.chunk_of[rows[fresh]] = -1
            self._release_unused()
            Y[fresh], failed[fresh] = self._factorize(rows[fresh], system[fresh], rhs[fresh], dual[fresh])

        Y = Y[:, :m]
        V = U_active + Y  # primal route: Y holds v_F and is zero on the active set
        if self.H is not None and bool(dual.any()):
            V = torch.where(dual[:, None], torch.where(A, U, Y @ self.H), V)  # dual route: Y = lambda
        return V, failed

    def release_all(self) -> None:
        """Return every buffer to the workspace."""
        self.chunk_of.fill_(-1)
        self._release_unused()

    def _release_unused(self) -> None:
        used = set(torch.unique(self.chunk_of).tolist())
        for cid in [c for c in self.chunks if c not in used]:
            self.workspace.give(self.chunks.pop(cid).buffer)

    def _factorize(self, rows: Tensor, system: Tensor, rhs: Tensor, dual: Tensor) -> tuple[Tensor, Tensor]:
        n, m = rhs.shape[0], self.m
        device = rhs.device
        sizes = system.sum(dim=1)
        Y = rhs.new_zeros((n, m + 1))
        failed = torch.zeros(n, dtype=torch.bool, device=device)
        sorted_sizes, order = torch.sort(sizes, descending=True)
        for sel, size in _chunks(order, sorted_sizes.tolist()):
            if size == 0:
                continue  # empty system: the solution is u_A (primal) or lambda = 0 (dual)
            count = sel.shape[0]
            numel = count * size * size
            idx = _sorted_indices(system[sel], size, m)
            route = dual[sel]
            # Flat positions of the entries of each system in the augmented [route, m+1, m+1] matrices
            # (int32: half the memory traffic of int64 indices).
            row_start = ((route.long()[:, None] * (m + 1) + idx) * (m + 1)).to(torch.int32)
            index_buffer = self.workspace.take(numel, torch.int32)
            flat_index = index_buffer[:numel].view(count, size, size)
            torch.add(row_start[:, :, None], idx.to(torch.int32)[:, None, :], out=flat_index)
            buffer = self.workspace.take(numel, torch.float64)
            M = buffer[:numel].view(count, size, size)
            torch.index_select(self.flat, 0, flat_index.view(-1), out=M.view(-1))
            self.workspace.give(index_buffer)
            M.diagonal(dim1=1, dim2=2).add_((idx == m).to(M.dtype))  # identity on the padding
            b = rhs[sel].gather(1, idx)[:, :, None]
            if _factorize_in_place(device):
                # M is symmetric, so its transpose is the same matrix in the column-major layout
                # LAPACK factorises in place: M = R^T R with R upper triangular.
                factor = M.mT
                info = torch.empty(count, dtype=torch.int32, device=device)

                def factor_and_solve(lo: int, hi: int, factor=factor, info=info, b=b) -> None:
                    R = factor[lo:hi]
                    torch.linalg.cholesky_ex(R, upper=True, out=(R, info[lo:hi]))
                    b[lo:hi] = _cholesky_solve(R, b[lo:hi])

                _in_blocks(device, count, factor_and_solve)
            else:
                factor, info = torch.linalg.cholesky_ex(M, upper=True)
                b = _cholesky_solve(factor, b)
            self.factorizations += count
            y = b[:, :, 0]
            fail = (info != 0) | ~torch.isfinite(y).all(dim=1)
            Y[sel] = Y[sel].scatter_(1, idx, torch.where(fail[:, None], torch.zeros_like(y), y))
            failed[sel] = fail
            ok = ~fail
            cid = self.next_chunk
            self.next_chunk += 1
            self.chunks[cid] = _Chunk(idx, buffer, factor, route.long())
            registered = rows[sel][ok]
            self.chunk_of[registered] = cid
            self.slot_of[registered] = torch.arange(count, device=device)[ok]
            self.base_system[registered] = system[sel][ok]
            self.base_dual[registered] = route[ok]
            self.base_size[registered] = sizes[sel][ok]
        return Y, failed

    def _update(self, chunk: _Chunk, rows: Tensor, system: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
        m = self.m
        device = rhs.device
        slots = self.slot_of[rows]
        n_chunk = chunk.idx.shape[0]
        whole = 2 * slots.shape[0] >= n_chunk
        if whole:
            # Work on the whole chunk (cheaper than copying most of its factors); rows of the chunk
            # that are not updated get an empty right-hand side and are dropped afterwards.
            factor, idx, route = chunk.factor, chunk.idx, chunk.route
            full_system = torch.zeros((n_chunk, m), dtype=torch.bool, device=device)
            full_base = torch.zeros((n_chunk, m), dtype=torch.bool, device=device)
            full_rhs = rhs.new_zeros((n_chunk, m + 1))
            full_system[slots], full_rhs[slots] = system, rhs
            full_base[slots] = self.base_system[rows]
            # Rows that are not updated keep their base system (no change, zero right-hand side).
            others = torch.ones(n_chunk, dtype=torch.bool, device=device)
            others[slots] = False
            full_system[others] = full_base[others] = _mask_of(idx[others], m)
            system, base, rhs = full_system, full_base, full_rhs
        else:
            factor, idx, route = chunk.factor[slots], chunk.idx[slots], chunk.route[slots]
            base = self.base_system[rows]
        n, s = idx.shape
        added = system & ~base
        removed = base & ~system
        n_added = int(added.sum(dim=1).max())
        n_removed = int(removed.sum(dim=1).max())
        idx_d = _sorted_indices(added, n_added, m)
        idx_r = _sorted_indices(removed, n_removed, m)
        # Local position of each removed index in the factorised system (s for padding).
        local = torch.full((n, m + 1), s, dtype=torch.long, device=device)
        local.scatter_(1, idx, torch.arange(s, device=device).expand(n, s).contiguous())
        local[:, m] = s
        local_r = local.gather(1, idx_r)
        in_removed = torch.zeros((n, s + 1), dtype=torch.bool, device=device)
        in_removed.scatter_(1, local_r, True)
        in_removed = in_removed[:, :s]
        q = n_added + n_removed
        # Right-hand sides [b_B, X_BD, E_R] of the factorised system, solved together.
        B = rhs.new_zeros((n, s, 1 + q))
        B[:, :, 0] = rhs.gather(1, idx).masked_fill(in_removed, 0.0)
        if n_added:
            B[:, :, 1 : 1 + n_added] = self.aug[route[:, None, None], idx[:, :, None], idx_d[:, None, :]]
        if n_removed:
            E_r = rhs.new_zeros((n, s + 1, n_removed)).scatter_(1, local_r[:, None, :], 1.0)
            B[:, :, 1 + n_added :] = E_r[:, :s]

        # With K = R^T R: T = R^{-T} [b, W], so that W^T K^{-1} W = T_w^T T_w and W^T K^{-1} b =
        # T_w^T T_b; then y_B = R^{-1} (T_b - T_w eta).
        def forward(lo: int, hi: int) -> None:
            B[lo:hi] = torch.linalg.solve_triangular(factor[lo:hi].mT, B[lo:hi], upper=False)

        _in_blocks(device, n, forward)
        T_b, T_w = B[:, :, :1], B[:, :, 1:]
        Y = rhs.new_zeros((n, m + 1))
        if q == 0:
            z, eta_d, info = T_b, None, torch.zeros(n, dtype=torch.int32, device=device)
        else:
            C = rhs.new_zeros((n, q, q))
            C[:, :n_added, :n_added] = self.aug[route[:, None, None], idx_d[:, :, None], idx_d[:, None, :]]
            # Identity on the padding of both blocks (the block of removed indices is zero otherwise).
            C.diagonal(dim1=1, dim2=2).add_(torch.cat((idx_d == m, idx_r == m), dim=1).to(rhs.dtype))
            schur = C - T_w.mT @ T_w
            c = rhs.new_zeros((n, q, 1))
            c[:, :n_added, 0] = rhs.gather(1, idx_d)
            eta, info = torch.linalg.solve_ex(schur, c - T_w.mT @ T_b)
            z = T_b - T_w @ eta
            eta_d = eta[:, :n_added, 0]

        def backward(lo: int, hi: int) -> None:
            z[lo:hi] = torch.linalg.solve_triangular(factor[lo:hi], z[lo:hi], upper=True)

        z = z.contiguous()
        _in_blocks(device, n, backward)
        y = z[:, :, 0]
        y = y.masked_fill(in_removed, 0.0)
        Y.scatter_(1, idx, y)
        if eta_d is not None:
            Y.scatter_(1, idx_d, eta_d)
        failed = (info != 0) | ~torch.isfinite(Y).all(dim=1)
        if whole:
            Y, failed = Y[slots], failed[slots]
        return Y, failed


def _cholesky_solve(R: Tensor, b: Tensor) -> Tensor:
    """Solve ``R^T R y = b`` for upper-triangular ``R`` ([n, s, s]) and ``b`` ([n, s, c])."""
    t = torch.linalg.solve_triangular(R.mT, b, upper=False)
    return torch.linalg.solve_triangular(R, t, upper=True)


def _mask_of(idx: Tensor, m: int) -> Tensor:
    """Boolean ``[n, m]`` mask of the (sink-padded) index lists ``idx``."""
    mask = torch.zeros((idx.shape[0], m + 1), dtype=torch.bool, device=idx.device)
    return mask.scatter_(1, idx, True)[:, :m]


def _chunks(order: Tensor, sorted_sizes: list[int]) -> Iterator[tuple[Tensor, int]]:
    """Split rows (sorted by decreasing system size) into groups of similar size and bounded memory.

    Largest first, so that the buffers of a group can be reused by the next ones.
    """
    n = len(sorted_sizes)
    start = 0
    while start < n:
        size = sorted_sizes[start]
        low = min(int(size / 1.5), size - 8)
        end = start + 1
        while end < n and sorted_sizes[end] >= low:
            end += 1
        per_chunk = max(1, _MAX_CHUNK_ELEMENTS // max(size * size, 1))
        for lo in range(start, end, per_chunk):
            yield order[lo : min(lo + per_chunk, end)], sorted_sizes[lo]
        start = end
