r"""Exact solver of the alpha-fair bargaining system :math:`G w = w^{-1/\alpha}`, :math:`w > 0`.

Shared by Nash-MTL (:math:`\alpha = 1`, Navon et al., arXiv:2202.01017) and FairGrad (Ban & Ji,
arXiv:2402.15638). Pure numpy, float64, CPU.
"""

from __future__ import annotations

import numpy as np

# Ridge, relative to each diagonal entry, that guarantees a solution also when the rows are
# Pareto-stationary (a non-negative combination of them vanishes), where the system has none.
RIDGE = 1e-8
# Stop when every equation holds to this relative precision: |(G w)_i w_i^{1/alpha} - 1| <= RTOL.
RTOL = 1e-12


def _utility(w: np.ndarray, alpha: float) -> float:
    if alpha == 1.0:
        return float(np.log(w).sum())
    power = 1.0 - 1.0 / alpha
    return float((w**power).sum() / power)


def solve_alpha_fair(
    G: np.ndarray, alpha: float, max_iter: int, start: np.ndarray | None = None
) -> np.ndarray:
    r"""Weights :math:`w \ge 0` with :math:`(\tilde G w)_i = w_i^{-1/\alpha}` on the non-zero rows.

    :math:`\tilde G = G + \varepsilon\,\mathrm{diag}(G)` (:math:`\varepsilon` = ``RIDGE``). The system
    is the stationarity condition of the strictly convex problem

    .. math:: \min_{w > 0}\ \tfrac12 w^\top \tilde G w - \sum_i u_\alpha(w_i), \qquad
              u_\alpha(x) = \log x \ (\alpha = 1), \quad
              u_\alpha(x) = \frac{x^{1 - 1/\alpha}}{1 - 1/\alpha} \ (\alpha \ne 1),

    solved by Newton's method with a backtracking line search that keeps :math:`w > 0` (a step is
    accepted when it decreases the objective enough, Armijo, or the largest relative residual),
    with the Newton system scaled by the diagonal (so that rows of very different norms do not
    harm its conditioning). It stops when every equation holds to ``RTOL`` (relative) or after
    ``max_iter`` steps. Rows with a zero norm get weight 0 (they do not change the update). The
    start is ``start`` when given and positive on the non-zero rows, else
    :math:`w_i = (G_{ii} \sum_j |\cos(g_i, g_j)|)^{-\alpha/(1+\alpha)}`, the solution when the
    rows are orthogonal or all collinear.
    """
    m = G.shape[0]
    diagonal = np.clip(np.diag(G), 0.0, None)
    active = diagonal > 0
    weights = np.zeros(m)
    if not active.any():
        return weights
    A = G[np.ix_(active, active)]
    d = diagonal[active]
    A = (A + A.T) / 2 + RIDGE * np.diag(d)
    scale = 1.0 / np.sqrt(d)  # Jacobi scaling of the Newton system
    cosines = A * scale[:, None] * scale[None, :]
    if start is not None and start.shape == (m,) and np.all(start[active] > 0) and np.all(np.isfinite(start)):
        w = start[active].astype(np.float64).copy()
    else:
        w = (d * np.abs(cosines).sum(axis=1)) ** (-alpha / (1.0 + alpha))

    def objective(x: np.ndarray) -> float:
        return 0.5 * float(x @ A @ x) - _utility(x, alpha)

    def residual(x: np.ndarray) -> float:
        return float(np.max(np.abs((A @ x) * x ** (1.0 / alpha) - 1.0)))

    value, error = objective(w), residual(w)
    for _ in range(max_iter):
        if error <= RTOL:
            break
        gradient = A @ w - w ** (-1.0 / alpha)
        hessian_diagonal = (1.0 / alpha) * w ** (-1.0 / alpha - 1.0)
        scaled_hessian = cosines + np.diag(hessian_diagonal * scale * scale)
        step = -scale * np.linalg.solve(scaled_hessian, scale * gradient)
        slope = float(gradient @ step)
        if not slope < 0:
            break
        t = 1.0
        negative = step < 0
        if negative.any():
            t = min(1.0, 0.99 * float(np.min(-w[negative] / step[negative])))
        # Armijo on the objective, or a decrease of the relative residual: the latter still sees
        # progress when the objective's changes are below its round-off (very different row norms).
        for _ in range(60):
            candidate = w + t * step
            candidate_value, candidate_error = objective(candidate), residual(candidate)
            if candidate_value <= value + 1e-4 * t * slope or candidate_error <= (1.0 - 1e-4 * t) * error:
                break
            t *= 0.5
        else:
            break
        w, value, error = candidate, candidate_value, candidate_error
    weights[active] = w
    return weights
