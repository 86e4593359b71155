"""Aggregators against independent formulations of the same problems (brute force / closed forms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _aggregation_matrices import randn
from quadprog import solve_qp
from torch import Tensor
from torch.testing import assert_close

from hf_jd.aggregation import IMTLG, MGDA, DualProj, PCGrad, UPGrad


def _project_in_primal(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """argmin_x ||x - vector||² s.t. matrix @ x >= 0, solved over x (one constraint per row)."""
    n = matrix.shape[1]
    return solve_qp(np.eye(n), vector, matrix.T.copy(), np.zeros(matrix.shape[0]), 0)[0]


def _primal_dual_cone_weights(matrix: Tensor, rhs: Tensor, reg_eps: float) -> Tensor:
    r"""Weights of the projection of :math:`J^\top u` for every row ``u`` of ``rhs``, via the primal.

    The weightings solve :math:`\min_v v^\top (G/t + \varepsilon I) v` s.t. :math:`v \ge u` with
    :math:`t = \mathrm{tr}(G)`. That Gramian is the one of the augmented matrix
    :math:`\tilde J = [J/\sqrt t,\ \sqrt\varepsilon I_m]`, so the same problem is the Euclidean
    projection of :math:`\tilde J^\top u` onto :math:`\{x : \tilde J x \ge 0\}` in
    :math:`\mathbb{R}^{n+m}`, whose solution is :math:`x = \tilde J^\top v`: the last ``m``
    coordinates of ``x`` give :math:`\sqrt\varepsilon\, v`.
    """
    J = matrix.numpy()
    m, n = J.shape
    augmented = np.hstack([J / np.sqrt((J**2).sum()), np.sqrt(reg_eps) * np.eye(m)])
    weights = [_project_in_primal(augmented, augmented.T @ u)[n:] / np.sqrt(reg_eps) for u in rhs.numpy()]
    return torch.from_numpy(np.stack(weights))


ORACLE_MATRICES = {
    "2x3": randn(0, 2, 3),
    "3x5": randn(1, 3, 5),
    "5x7": randn(2, 5, 7),
    "6x10": randn(3, 6, 10),
    "tall_7x4": randn(4, 7, 4),
    "rank2_6x8": randn(5, 6, 2) @ randn(6, 2, 8),
    "duplicated_6x4": torch.cat([randn(7, 3, 4)] * 2),
    "scaled_rows_4x5": randn(8, 4, 5) * torch.tensor([1e-3, 1.0, 10.0, 1e3], dtype=torch.float64)[:, None],
}
FULL_ROW_RANK = ["2x3", "3x5", "5x7", "6x10"]


@pytest.mark.parametrize("pref_vector", [None, [1.0, 3.0, 0.5, 2.0, 1.0, 1.5, 0.7]])
@pytest.mark.parametrize("name", list(ORACLE_MATRICES))
def test_upgrad_matches_primal_projection_of_each_row(name, pref_vector):
    matrix = ORACLE_MATRICES[name]
    m = matrix.shape[0]
    pref = None if pref_vector is None else pref_vector[:m]
    aggregator = UPGrad(pref_vector=pref)
    p = (
        torch.full((m,), 1 / m, dtype=torch.float64)
        if pref is None
        else torch.tensor(pref, dtype=torch.float64)
    )
    expected = _primal_dual_cone_weights(matrix, torch.diag(p), aggregator.gramian_weighting.reg_eps).sum(0)
    weights = aggregator.weights(matrix)
    assert_close(weights, expected, rtol=1e-5, atol=1e-7 * expected.abs().max())
    assert_close(aggregator(matrix), expected @ matrix, rtol=1e-5, atol=1e-7 * matrix.abs().max())


@pytest.mark.parametrize("pref_vector", [None, [1.0, 3.0, 0.5, 2.0, 1.0, 1.5, 0.7]])
@pytest.mark.parametrize("name", list(ORACLE_MATRICES))
def test_dualproj_matches_primal_projection_of_the_mean(name, pref_vector):
    matrix = ORACLE_MATRICES[name]
    m = matrix.shape[0]
    pref = None if pref_vector is None else pref_vector[:m]
    aggregator = DualProj(pref_vector=pref)
    p = (
        torch.full((m,), 1 / m, dtype=torch.float64)
        if pref is None
        else torch.tensor(pref, dtype=torch.float64)
    )
    expected = _primal_dual_cone_weights(matrix, p[None], aggregator.gramian_weighting.reg_eps)[0]
    weights = aggregator.weights(matrix)
    assert_close(weights, expected, rtol=1e-5, atol=1e-7 * expected.abs().max())
    assert_close(aggregator(matrix), expected @ matrix, rtol=1e-5, atol=1e-7 * matrix.abs().max())


@pytest.mark.parametrize("name", FULL_ROW_RANK)
def test_unregularised_projections_match_the_plain_primal_problem(name):
    """With reg_eps=0 (valid for full row rank), the updates are exact projections onto {x : Jx >= 0}."""
    matrix = ORACLE_MATRICES[name]
    J = matrix.numpy()
    m = J.shape[0]
    dualproj_expected = torch.from_numpy(_project_in_primal(J, J.mean(axis=0)))
    upgrad_expected = torch.from_numpy(sum(_project_in_primal(J, row / m) for row in J))
    tolerance = {"rtol": 1e-6, "atol": 1e-9 * float(np.abs(J).max())}
    assert_close(DualProj(reg_eps=0.0)(matrix), dualproj_expected, **tolerance)
    assert_close(UPGrad(reg_eps=0.0)(matrix), upgrad_expected, **tolerance)
    # The projections leave no conflict at all.
    assert (matrix @ upgrad_expected >= -1e-9).all() and (matrix @ dualproj_expected >= -1e-9).all()


def _min_norm_in_convex_hull(matrix: Tensor) -> Tensor:
    """argmin ||Jᵀα|| over the simplex, by quadprog on α (tiny ridge for rank-deficient Gramians)."""
    G = (matrix @ matrix.T).numpy()
    m = G.shape[0]
    constraints = np.hstack([np.ones((m, 1)), np.eye(m)])
    bounds = np.r_[1.0, np.zeros(m)]
    alpha = solve_qp(G + 1e-12 * np.trace(G) * np.eye(m), np.zeros(m), constraints, bounds, 1)[0]
    return torch.from_numpy(alpha) @ matrix


@pytest.mark.parametrize("epsilon", [1e-2, 1e-4])
@pytest.mark.parametrize("name", list(ORACLE_MATRICES))
def test_mgda_matches_quadprog_min_norm_point(name, epsilon):
    r"""Frank–Wolfe stops when :math:`\gamma = \mathrm{gap}/\mathrm{curv} < \epsilon`; then
    :math:`f(\alpha) - f^* \le 2\,\mathrm{gap} \le 8 \epsilon \max_i\|g_i\|^2`, and since
    :math:`d^*` is the min-norm point of a convex set, :math:`\|d - d^*\|^2 \le \|d\|^2 - \|d^*\|^2`."""
    matrix = ORACLE_MATRICES[name]
    update = MGDA(epsilon=epsilon, max_iters=1_000_000)(matrix)
    optimum = _min_norm_in_convex_hull(matrix)
    bound = 8 * epsilon * (matrix**2).sum(dim=1).max()
    excess = update @ update - optimum @ optimum
    assert -1e-10 * bound <= excess <= bound
    assert (update - optimum).pow(2).sum() <= bound


def _pcgrad_in_primal(matrix: Tensor) -> Tensor:
    """PCGrad run on the gradient vectors themselves, visiting the most conflicting rows first."""
    rows = list(matrix)
    total = torch.zeros_like(rows[0])
    for i, g_i in enumerate(rows):
        others = [j for j in range(len(rows)) if j != i and rows[j].norm() > 0]
        others.sort(key=lambda j: float(g_i @ rows[j] / rows[j].norm()))
        projected = g_i.clone()
        for j in others:
            inner = projected @ rows[j]
            if inner < 0:
                projected = projected - inner / (rows[j] @ rows[j]) * rows[j]
        total += projected
    return total


@pytest.mark.parametrize("name", list(ORACLE_MATRICES))
def test_pcgrad_matches_the_algorithm_run_on_the_gradients(name):
    matrix = ORACLE_MATRICES[name]
    assert_close(PCGrad()(matrix), _pcgrad_in_primal(matrix), rtol=1e-8, atol=1e-10 * matrix.abs().max())


def _imtlg_closed_form(matrix: Tensor) -> Tensor:
    r"""The closed form of Liu et al. (ICLR 2021, Sec. 3.2): with :math:`u_t = g_t/\|g_t\|`,
    :math:`U = [u_1 - u_t]_{t \ge 2}`, :math:`D = [g_1 - g_t]_{t \ge 2}`,
    :math:`\alpha_{2:k} = g_1 U^\top (D U^\top)^{-1}`, :math:`\alpha_1 = 1 - \sum_t \alpha_t`."""
    g = matrix
    u = g / g.norm(dim=1, keepdim=True)
    U = u[:1] - u[1:]
    D = g[:1] - g[1:]
    alpha_rest = g[:1] @ U.T @ torch.linalg.inv(D @ U.T)
    alpha = torch.cat([1 - alpha_rest.sum(dim=1), alpha_rest[0]])
    return alpha @ g


@pytest.mark.parametrize("name", FULL_ROW_RANK)
def test_imtlg_matches_the_closed_form_of_the_paper(name):
    matrix = ORACLE_MATRICES[name]
    assert_close(IMTLG()(matrix), _imtlg_closed_form(matrix), rtol=1e-8, atol=1e-10)
