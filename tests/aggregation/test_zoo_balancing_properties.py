"""Defining properties of DB-MTL, GradNorm, ExcessMTL, MoCo, MoDo, SDMGrad, CR-MOGM, PCD and IMTL,
each checked against an independent formulation (autograd, quadprog, the paper's recursion written
out), and their argument validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _aggregation_matrices import randn
from quadprog import solve_qp
from torch import Tensor
from torch.testing import assert_close

from hf_jd.aggregation import (
    CRMOGM,
    DBMTL,
    IMTL,
    IMTLG,
    MGDA,
    PCD,
    ExcessMTL,
    GradNorm,
    MoCo,
    MoDo,
    SDMGrad,
    Sum,
    get_aggregator,
)
from hf_jd.aggregation._simplex import project_onto_simplex

F64 = torch.float64


def _qp_simplex_projection(v: np.ndarray) -> np.ndarray:
    """Oracle: argmin ||w - v||² over the simplex, with quadprog."""
    m = v.size
    constraints = np.hstack([np.ones((m, 1)), np.eye(m)])
    return solve_qp(np.eye(m), v, constraints, np.concatenate([[1.0], np.zeros(m)]), 1)[0]


def _qp_simplex_min(Q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Oracle: argmin ½ wᵀQw + cᵀw over the simplex, with quadprog (Q positive definite)."""
    m = c.size
    constraints = np.hstack([np.ones((m, 1)), np.eye(m)])
    return solve_qp(Q, -c, constraints, np.concatenate([[1.0], np.zeros(m)]), 1)[0]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_simplex_projection_matches_quadprog(seed, scale):
    v = scale * randn(seed, 7).numpy()
    assert np.allclose(project_onto_simplex(v), _qp_simplex_projection(v), atol=1e-9)


def test_simplex_projection_keeps_precision_for_huge_entries():
    v = np.array([1e20, 1e20 - 2**20, -1e20, 5.0])
    w = project_onto_simplex(v)
    assert np.array_equal(w, np.array([1.0, 0.0, 0.0, 0.0]))


# --------------------------------------------------------------------------------------- GradNorm


def _gradnorm_step(logits: Tensor, norms: Tensor, ratios: Tensor, alpha: float, lr: float) -> Tensor:
    """One gradient step of the GradNorm loss, differentiated by autograd."""
    s = logits.clone().requires_grad_(True)
    m = s.numel()
    weighted = m * torch.softmax(s, dim=0) * norms
    target = (weighted.mean() * ratios**alpha).detach()
    (weighted - target).abs().sum().backward()
    return (s - lr * s.grad).detach()


def test_gradnorm_first_call_is_the_sum_and_the_weights_follow_the_gradnorm_loss():
    matrix = randn(300, 3, 6) * torch.tensor([[1.0], [3.0], [0.2]], dtype=F64)
    aggregator = GradNorm(alpha=1.5, lr=0.1)
    assert_close(aggregator(matrix), Sum()(matrix))
    norms = matrix.norm(dim=1)
    expected = _gradnorm_step(torch.zeros(3, dtype=F64), norms, torch.ones(3, dtype=F64), 1.5, 0.1)
    assert_close(aggregator.gramian_weighting.logits, expected)
    assert_close(aggregator.weights(matrix), 3 * torch.softmax(expected, dim=0))


def test_gradnorm_training_rates_come_from_the_losses():
    matrix = randn(301, 3, 6)
    aggregator = GradNorm(alpha=2.0, lr=0.05)
    first, second = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.5, 1.8, 1.0])
    aggregator.set_losses(first)
    aggregator(matrix)
    logits = aggregator.gramian_weighting.logits.clone()
    aggregator.set_losses(second)
    aggregator(matrix)
    relative = (second / first).double()
    expected = _gradnorm_step(logits, matrix.norm(dim=1), relative / relative.mean(), 2.0, 0.05)
    assert_close(aggregator.gramian_weighting.logits, expected)
    assert_close(aggregator.gramian_weighting.initial_losses, first.double())


def test_gradnorm_balances_the_weighted_gradient_norms():
    matrix = randn(302, 3, 8) * torch.tensor([[1.0], [2.0], [4.0]], dtype=F64)
    aggregator = GradNorm(lr=0.002)
    for _ in range(3000):
        weights = aggregator.weights(matrix)
    weighted = weights * matrix.norm(dim=1)
    assert weighted.max() / weighted.min() < 1.02


def test_gradnorm_needs_one_loss_per_row():
    aggregator = GradNorm()
    aggregator.set_losses([1.0, 2.0])
    with pytest.raises(ValueError, match="2 loss values"):
        aggregator(randn(303, 3, 4))
    with pytest.raises(ValueError, match="finite loss values"):
        aggregator.set_losses([1.0, float("nan")])


# ------------------------------------------------------------------------------------------- IMTL


@pytest.mark.parametrize("matrix", [randn(310, 3, 7), randn(311, 4, 4), torch.cat([randn(312, 2, 5)] * 2)])
def test_imtl_without_losses_is_imtl_g(matrix):
    aggregator = IMTL()
    for _ in range(3):
        assert_close(aggregator(matrix), IMTLG()(matrix))


def test_imtl_is_imtl_g_on_the_scaled_gradients():
    """After one loss update the log-scales are s = -lr (L - 1); the update is IMTL-G of diag(e^s) J."""
    matrix = randn(313, 3, 6)
    losses = torch.tensor([0.5, 2.0, 4.0], dtype=F64)
    aggregator = IMTL(lr=0.1)
    aggregator.set_losses(losses)
    assert_close(aggregator(matrix), IMTLG()(matrix))
    s = -0.1 * (losses - 1)
    assert_close(aggregator.gramian_weighting.log_scales, s)
    assert_close(aggregator(matrix), IMTLG()(torch.exp(s)[:, None] * matrix))


def test_imtl_scales_converge_to_the_inverse_losses():
    aggregator = IMTL(lr=0.2)
    losses = torch.tensor([0.5, 2.0, 4.0], dtype=F64)
    for _ in range(400):
        aggregator.set_losses(losses)
        aggregator(randn(314, 3, 5))
    assert_close(torch.exp(aggregator.gramian_weighting.log_scales), 1 / losses, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------- DB-MTL


def _db_mtl_update(buffer: Tensor) -> Tensor:
    norms = buffer.norm(dim=1)
    return sum(norms.max() / norms[i] * buffer[i] for i in range(buffer.shape[0]))


def test_db_mtl_follows_its_moving_average_and_max_norm_rescaling():
    first, second = randn(320, 3, 6), randn(321, 3, 6) * torch.tensor([[1e-3], [1.0], [1e3]], dtype=F64)
    aggregator = DBMTL(beta=0.9, beta_sigma=0.5)
    buffer = 0.1 * first  # beta_1 = 0.9: (1 - 0.9) J_1 + 0.9 * 0
    assert_close(aggregator(first), _db_mtl_update(buffer))
    beta_2 = 0.9 / 2**0.5
    buffer = (1 - beta_2) * second + beta_2 * buffer
    update = aggregator(second)
    assert_close(update, _db_mtl_update(buffer))
    # Every averaged row contributes with the largest norm.
    norms = buffer.norm(dim=1)
    assert_close((norms.max() / norms)[:, None].mul(buffer).norm(dim=1), norms.max().expand(3))


def test_db_mtl_with_losses_uses_the_gradients_of_the_log_losses():
    matrix = randn(322, 3, 5)
    losses = torch.tensor([0.1, 1.0, 30.0], dtype=F64)
    aggregator = DBMTL()
    aggregator.set_losses(losses)
    reference = DBMTL()
    assert_close(aggregator(matrix), reference(matrix / (losses[:, None] + 1e-8)))
    assert_close(aggregator(matrix), reference(matrix))  # the losses are used by one call only


# -------------------------------------------------------------------------------------- ExcessMTL


@pytest.mark.parametrize("n_warmup_steps", [0, 2])
def test_excess_mtl_follows_the_paper_recursion(n_warmup_steps):
    """Equations 6-9; without warm-up the first call's raw excess risks drive the first step (the
    authors' code), with warm-up their mean over the warm-up calls is the baseline (Appendix C.1)."""
    matrices = [randn(330 + t, 3, 5) for t in range(5)]
    aggregator = ExcessMTL(robust_step_size=0.5, n_warmup_steps=n_warmup_steps)
    squares, weights, initial, warmup = np.zeros((3, 5)), np.full(3, 1 / 3), None, np.zeros(3)
    for t, matrix in enumerate(matrices):
        J = matrix.numpy()
        squares += J**2
        excess = (J**2 / np.sqrt(squares + 1e-7)).sum(axis=1)
        if t < n_warmup_steps:
            warmup += excess
        else:
            if initial is None:
                initial = warmup / n_warmup_steps if n_warmup_steps else excess
                ratio = excess / initial if n_warmup_steps else excess
            else:
                ratio = excess / initial
            weights = weights * np.exp(0.5 * ratio)
            weights /= weights.sum()
        assert_close(aggregator(matrix), torch.from_numpy(weights) @ matrix)


def test_excess_mtl_moves_weight_to_the_objective_whose_excess_risk_grows():
    base = randn(335, 3, 6)
    aggregator = ExcessMTL(robust_step_size=0.1)
    for t in range(20):
        aggregator.weights(base * torch.tensor([[1.0], [1.0], [1.0 + t]], dtype=F64))
    weights = aggregator.weights(base)
    assert_close(weights.sum(), torch.tensor(1.0, dtype=F64))
    assert weights.argmax() == 2 and (weights > 0).all()


# ------------------------------------------------------------------------------------------- MoCo


def test_moco_follows_algorithm_1():
    matrices = [randn(340 + t, 3, 6) for t in range(4)]
    beta, beta_sigma, gamma, gamma_sigma, rho = 0.5, 0.5, 0.3, 0.5, 0.1
    aggregator = MoCo(beta=beta, beta_sigma=beta_sigma, gamma=gamma, gamma_sigma=gamma_sigma, rho=rho)
    y, lambd = torch.zeros(3, 6, dtype=F64), np.full(3, 1 / 3)
    for t, matrix in enumerate(matrices, start=1):
        y = y - beta / t**beta_sigma * (y - matrix)
        step = lambd - gamma / t**gamma_sigma * ((y @ y.T).numpy() + rho * np.eye(3)) @ lambd
        lambd = _qp_simplex_projection(step)
        assert_close(aggregator(matrix), torch.from_numpy(lambd) @ y, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------- MoDo


def test_modo_takes_one_projected_step_per_call():
    matrix = randn(350, 4, 6)
    G = (matrix @ matrix.T).numpy()
    aggregator = MoDo(gamma=0.05, rho=0.1)
    lambd = np.full(4, 0.25)
    for _ in range(3):
        lambd = _qp_simplex_projection(lambd - 0.05 * (G @ lambd + 0.1 * lambd))
        assert_close(aggregator.weights(matrix), torch.from_numpy(lambd), rtol=1e-9, atol=1e-12)


def test_modo_converges_to_mgda_on_a_fixed_jacobian():
    matrix = randn(351, 3, 5)
    G = (matrix @ matrix.T).numpy()
    aggregator = MoDo(gamma=1.0 / np.linalg.eigvalsh(G).max(), rho=0.0)
    for _ in range(5000):
        weights = aggregator.weights(matrix)
    assert_close(weights, torch.from_numpy(_qp_simplex_min(G, np.zeros(3))), rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------- SDMGrad


@pytest.mark.parametrize("lamda", [0.0, 0.3, 2.0])
def test_sdmgrad_inner_loop_converges_to_the_direction_oriented_problem(lamda):
    matrix = randn(360, 4, 7)
    G = (matrix @ matrix.T).numpy()
    G = G / np.sqrt(G.diagonal()).mean() ** 2
    w = _qp_simplex_min(G, lamda * G.mean(axis=1))
    weights = SDMGrad(lamda=lamda, niter=4000, lr=0.05, momentum=0.5).weights(matrix)
    assert_close(weights, torch.from_numpy((w + lamda / 4) / (1 + lamda)), rtol=0, atol=1e-7)


def test_sdmgrad_warm_starts_from_the_previous_inner_weights():
    """Without momentum (which restarts at every call), 30 calls of one step are one call of 30 steps."""
    matrix = randn(361, 3, 5)
    aggregator = SDMGrad(niter=1, momentum=0.0)
    once = [aggregator.weights(matrix) for _ in range(30)][-1]
    assert_close(once, SDMGrad(niter=30, momentum=0.0).weights(matrix))


# ---------------------------------------------------------------------------------------- CR-MOGM


def test_cr_mogm_averages_the_wrapped_weights():
    matrices = [randn(370 + t, 3, 5) for t in range(4)]
    aggregator = CRMOGM(alpha=0.7)
    lambd = None
    for matrix in matrices:
        current = MGDA().weights(matrix)
        lambd = current if lambd is None else 0.7 * lambd + 0.3 * current
        assert_close(aggregator.weights(matrix), lambd)


def test_cr_mogm_wraps_any_gramian_weighting_by_name_with_its_state():
    aggregator = get_aggregator("cr_mogm", weighting="gradvac", weighting_kwargs={"beta": 0.5}, alpha=0.0)
    reference = get_aggregator("gradvac", beta=0.5)
    for seed in range(3):
        assert_close(aggregator(randn(375 + seed, 3, 5)), reference(randn(375 + seed, 3, 5)))
    assert len(aggregator.state_dict()) == 2  # its average and GradVac's targets
    aggregator.reset()
    assert aggregator.gramian_weighting.weighting.targets is None
    assert repr(aggregator) == "CRMOGM(weighting='gradvac', alpha=0.0, weighting_kwargs={'beta': 0.5})"


# -------------------------------------------------------------------------------------------- PCD


def _pcd_primal(matrix: Tensor, primary: int, tau: float) -> Tensor:
    """Oracle of PCD's first call with beta = 0, eps = 0: the gradients normalised to unit norm,
    min ½||d - g̃_p||² s.t. g̃_i·d >= tau (i != p) solved in parameter space with quadprog, then
    rescaled to ||g_p||."""
    J = matrix.numpy()
    unit = J / np.linalg.norm(J, axis=1, keepdims=True)
    others = [i for i in range(J.shape[0]) if i != primary]
    d = solve_qp(np.eye(J.shape[1]), unit[primary], unit[others].T, np.full(len(others), tau), 0)[0]
    return torch.from_numpy(d * np.linalg.norm(J[primary]) / np.linalg.norm(d))


@pytest.mark.parametrize("tau", [0.0, 0.02, 0.5])
@pytest.mark.parametrize("primary", [0, 2])
@pytest.mark.parametrize("matrix", [randn(380, 4, 9), randn(381, 3, 6), 3.0 * randn(382, 5, 12)])
def test_pcd_solves_the_primal_problem(matrix, primary, tau):
    update = PCD(tau=tau, beta=0.0, eps=0.0, primary=primary)(matrix)
    assert_close(update, _pcd_primal(matrix, primary, tau), rtol=1e-6, atol=1e-8)
    others = [i for i in range(matrix.shape[0]) if i != primary]
    assert (matrix[others] @ update >= -1e-9).all()  # no secondary objective increases


def test_pcd_keeps_the_primary_gradient_when_every_constraint_holds():
    matrix = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.5, 0.0, 2.0]], dtype=F64)
    assert_close(PCD()(matrix), matrix[0])
    assert_close(PCD(primary=1)(matrix), matrix[1])


def test_pcd_drops_infeasible_constraints_and_zero_primary():
    opposite = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]], dtype=F64)
    assert_close(PCD()(opposite), opposite[0])
    zero_primary = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=F64)
    assert_close(PCD()(zero_primary), torch.zeros(2, dtype=F64))


def test_pcd_is_scale_free_per_row_and_checks_the_primary_index():
    matrix = randn(383, 3, 5)
    scaled = matrix * torch.tensor([[1.0], [1e4], [1e-3]], dtype=F64)
    assert_close(PCD(eps=0.0)(scaled), PCD(eps=0.0)(matrix), rtol=1e-9, atol=1e-12)
    assert_close(PCD()(1e4 * matrix), 1e4 * PCD()(matrix))
    with pytest.raises(ValueError, match="primary=3.*rows 0..2"):
        PCD(primary=3)(matrix)
    with pytest.raises(ValueError, match="tau has 3 values but there are 2 secondary"):
        PCD(tau=[0.1, 0.2, 0.3])(matrix)


def test_pcd_moving_average_is_its_state():
    matrices = [randn(384 + k, 3, 5) * (k + 1) for k in range(4)]
    reference = PCD(beta=0.9)
    outputs = [reference(matrix) for matrix in matrices]
    resumed = PCD(beta=0.9)
    resumed(matrices[0])
    state = resumed.state_dict()
    fresh = PCD(beta=0.9)
    fresh.load_state_dict(state)
    for matrix, expected in zip(matrices[1:], outputs[1:]):
        assert_close(fresh(matrix), expected, rtol=0, atol=0)
    fresh.reset()
    assert_close(fresh(matrices[0]), outputs[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="contains NaN or inf"):
        fresh(torch.full((3, 5), float("nan"), dtype=F64))
    assert fresh.gramian_weighting.n_steps == 1


# ------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("db_mtl", {"beta": 1.5}, r"DBMTL's beta must be in \[0.0, 1.0\]"),
        ("db_mtl", {"beta_sigma": -1}, "DBMTL's beta_sigma must be >= 0"),
        ("gradnorm", {"alpha": "x"}, "GradNorm's alpha must be a finite number"),
        ("gradnorm", {"lr": 0}, "GradNorm's lr must be > 0"),
        ("excess_mtl", {"robust_step_size": -1.0}, "ExcessMTL's robust_step_size must be > 0"),
        ("excess_mtl", {"n_warmup_steps": -1}, "ExcessMTL's n_warmup_steps must be >= 0"),
        ("moco", {"beta": 0.0}, "MoCo's beta must be > 0"),
        ("moco", {"gamma": float("inf")}, "MoCo's gamma must be a finite number"),
        ("modo", {"gamma": 0}, "MoDo's gamma must be > 0"),
        ("modo", {"rho": -0.1}, "MoDo's rho must be >= 0"),
        ("sdmgrad", {"niter": 0}, "SDMGrad's niter must be >= 1"),
        ("sdmgrad", {"momentum": 1.0}, "SDMGrad's momentum must be < 1"),
        ("cr_mogm", {"alpha": 1.5}, r"CRMOGM's alpha must be in \[0.0, 1.0\]"),
        ("cr_mogm", {"weighting": "graddrop"}, "must name a Gramian-weighted aggregator"),
        ("cr_mogm", {"weighting": "cr_mogm"}, "must name a Gramian-weighted aggregator other than"),
        ("cr_mogm", {"weighting": "nope"}, "Unknown aggregator 'nope'"),
        ("cr_mogm", {"weighting": 3}, "CRMOGM's weighting must be an aggregator name"),
        ("pcd", {"primary": -1}, "PCD's primary must be >= 0"),
        ("pcd", {"primary": 1.0}, "PCD's primary must be an integer"),
        ("pcd", {"tau": 1.5}, r"PCD's tau must be in \[0.0, 1.0\]"),
        ("pcd", {"beta": 1.0}, "PCD's beta must be < 1"),
        ("pcd", {"eps": -1e-8}, "PCD's eps must be >= 0"),
        ("imtl", {"lr": "0.1"}, "IMTL's lr must be a finite number"),
    ],
)
def test_bad_arguments_fail_at_construction_naming_the_argument(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_aggregator(name, **kwargs)
