"""The factorisation-free phase of the active-set dual-cone solver (preconditioned CG) against quadprog.

Problem: ``v = argmin vᵀGv s.t. v >= u`` for every row ``u`` of ``U`` (Quinton & Rey, arXiv:2406.16232,
Proposition 1). The phase solves the subproblems by CG preconditioned with ``(G⁻¹)_FF`` in float32 and
refines in float64; quadprog (one Goldfarb–Idnani QP per row) is the oracle, and the
factorisation-only path (``preconditioned_cg=False``) must give the same answer.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import hf_jd.aggregation._active_set._preconditioned as cg_module
from hf_jd.aggregation._active_set import (
    ActiveSetInfo,
    ActiveSetState,
    solve_dual_cone_active_set,
    solve_dual_cone_active_set_with_info,
)
from hf_jd.aggregation._active_set._linalg import sparse_aware_product
from hf_jd.aggregation._gramian_utils import normalize_gramian, regularize_gramian, symmetrize
from hf_jd.aggregation._quadprog_solver import solve_dual_cone_quadprog

F64 = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _prepared(J: Tensor) -> Tensor:
    """The Gramian exactly as UPGrad/DualProj hand it to the solvers (normalised + ridge)."""
    return regularize_gramian(normalize_gramian(symmetrize(J @ J.T), 1e-4), 1e-4)


def _gaussian(m: int, seed: int, n: int | None = None) -> Tensor:
    """Nearly orthogonal rows: about half of the bounds are free, the phase's case."""
    return torch.randn(m, n or 4 * m, generator=_generator(seed), dtype=F64)


def _low_rank(m: int, rank: int, seed: int) -> Tensor:
    g = _generator(seed)
    return torch.randn(m, rank, generator=g, dtype=F64) @ torch.randn(rank, 4 * m, generator=g, dtype=F64)


def _clustered(m: int, seed: int) -> Tensor:
    """Ten class centres plus noise: small free sets and an ill-conditioned Gramian."""
    g = _generator(seed)
    centres = torch.randn(10, 4 * m, generator=g, dtype=F64)
    labels = torch.randint(0, 10, (m,), generator=g)
    return centres[labels] + 0.5 * torch.randn(m, 4 * m, generator=g, dtype=F64)


def _assert_certified(info: ActiveSetInfo) -> None:
    for key in ("primal", "dual", "complementarity"):
        residual = getattr(info.residuals, key)
        assert bool((residual <= info.tolerance).all()), f"{key} residual {residual.max():.3e}"
    assert bool(info.certified.all()) and not bool(info.fallback.any())


def _assert_matches_quadprog(U: Tensor, G: Tensor, V: Tensor, rows: Tensor, rtol: float = 1e-6) -> None:
    expected = solve_dual_cone_quadprog(U[rows], G)
    scale = expected.abs().max().clamp(min=1e-300)
    error = (V[rows] - expected).abs().max()
    assert error <= rtol * scale, f"max |V - V_quadprog| = {error:.3e} (scale {scale:.3e})"


def _some_rows(m: int, count: int = 16) -> Tensor:
    return torch.randperm(m, generator=_generator(m))[:count]


@pytest.fixture
def small_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the phase take every row of small problems (it is meant for m >= 128 and large systems)."""
    monkeypatch.setattr(cg_module, "MIN_M", 8)
    monkeypatch.setattr(cg_module, "SIZE_FACTOR", 0.0)


@pytest.mark.parametrize("m", [192, 256])
def test_nearly_orthogonal_rows_are_certified_without_factorisations(m: int) -> None:
    G = _prepared(_gaussian(m, seed=m))
    U = torch.eye(m, dtype=F64) / m
    V, info = solve_dual_cone_active_set_with_info(U, G)
    _assert_certified(info)
    # (a few rows may leave the phase when their systems come out small)
    assert int(info.cg_certified.sum()) >= 0.9 * m and info.factorizations <= m // 10
    _assert_matches_quadprog(U, G, V, _some_rows(m))
    V_direct, info_direct = solve_dual_cone_active_set_with_info(U, G, preconditioned_cg=False)
    assert not bool(info_direct.cg_certified.any()) and info_direct.factorizations >= m
    assert bool((V[info.active] == U[info.active]).all())  # active bounds hold exactly
    torch.testing.assert_close(V, V_direct, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "J",
    [
        _low_rank(192, 150, seed=1),  # rank-deficient: the ridge alone keeps G definite
        _low_rank(160, 24, seed=2),
        _gaussian(192, seed=3) * torch.logspace(-4, 4, 192, dtype=F64)[:, None],  # badly scaled rows
        _gaussian(160, seed=4, n=170),  # m close to n: ill-conditioned, large free sets
        _clustered(160, seed=5),
    ],
    ids=["rank150", "rank24", "scaled_rows_1e-4_to_1e4", "square", "clustered"],
)
def test_hard_gramians_match_quadprog(J: Tensor) -> None:
    m = J.shape[0]
    G = _prepared(J)
    U = torch.eye(m, dtype=F64) / m
    V, info = solve_dual_cone_active_set_with_info(U, G)
    _assert_certified(info)
    _assert_matches_quadprog(U, G, V, _some_rows(m), rtol=1e-5)
    V_direct = solve_dual_cone_active_set(U, G, preconditioned_cg=False)
    torch.testing.assert_close(V, V_direct, rtol=0, atol=1e-10 * float(V.abs().max()))


@pytest.mark.usefixtures("small_phase")
@pytest.mark.parametrize(
    "J",
    [
        _gaussian(24, seed=6),
        _low_rank(32, 8, seed=7),
        _gaussian(24, seed=8) * torch.logspace(-6, 6, 24, dtype=F64)[:, None],
        _clustered(40, seed=9),
        torch.cat([_gaussian(12, seed=10)] * 2),  # duplicated rows
    ],
    ids=["gaussian", "rank8", "scaled_rows_1e-6_to_1e6", "clustered", "duplicated"],
)
def test_every_row_through_the_phase_matches_quadprog(J: Tensor) -> None:
    m = J.shape[0]
    G = _prepared(J)
    for U in (torch.eye(m, dtype=F64) / m, torch.randn(5, m, generator=_generator(m), dtype=F64)):
        V, info = solve_dual_cone_active_set_with_info(U, G)
        _assert_certified(info)
        _assert_matches_quadprog(U, G, V, torch.arange(U.shape[0]))


@pytest.mark.usefixtures("small_phase")
def test_slow_rows_leave_the_phase_and_are_factorised() -> None:
    # Clustered rows: CG contracts slowly on their systems, so rows leave after one step.
    m = 48
    G = _prepared(_clustered(m, seed=11))
    U = torch.eye(m, dtype=F64) / m
    V, info = solve_dual_cone_active_set_with_info(U, G)
    _assert_certified(info)
    assert bool((~info.cg_certified).any()) and info.factorizations > 0
    _assert_matches_quadprog(U, G, V, torch.arange(m))


@pytest.mark.usefixtures("small_phase")
def test_rows_left_uncertified_by_the_polish_are_finished_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    # No refinement round: the phase certifies only the rows already exact after discovery; the
    # others continue with factorisations from the active sets it reached.
    monkeypatch.setattr(cg_module, "POLISH_ROUNDS", 0)
    m = 40
    G = _prepared(_gaussian(m, seed=12))
    U = torch.eye(m, dtype=F64) / m
    V, info = solve_dual_cone_active_set_with_info(U, G)
    _assert_certified(info)
    assert bool((~info.cg_certified).any())
    _assert_matches_quadprog(U, G, V, torch.arange(m))


def test_single_right_hand_side_dualproj() -> None:
    m = 192
    G = _prepared(_gaussian(m, seed=13))
    u = torch.full((m,), 1.0 / m, dtype=F64)
    v, info = solve_dual_cone_active_set_with_info(u, G)
    _assert_certified(info)
    _assert_matches_quadprog(u[None], G, v[None], torch.arange(1))


def test_float32_inputs() -> None:
    m = 192
    G = _prepared(_gaussian(m, seed=14)).float()
    U = torch.eye(m) / m
    V, info = solve_dual_cone_active_set_with_info(U, G)
    assert V.dtype == torch.float32 and int(info.cg_certified.sum()) >= m // 2
    _assert_matches_quadprog(U.double(), G.double(), V.double(), _some_rows(m), rtol=1e-4)


def test_warm_start_goes_through_the_phase() -> None:
    m = 192
    J = _gaussian(m, seed=15)
    G1 = _prepared(J)
    G2 = _prepared(J + 0.02 * _gaussian(m, seed=16))
    U = torch.eye(m, dtype=F64) / m
    state = ActiveSetState()
    solve_dual_cone_active_set(U, G1, state)
    V, info = solve_dual_cone_active_set_with_info(U, G2, state)
    assert info.warm_start and int(info.cg_certified.sum()) >= m // 2
    _assert_certified(info)
    _assert_matches_quadprog(U, G2, V, _some_rows(m))


def test_no_iteration_budget_sends_every_row_to_quadprog() -> None:
    m = 192
    G = _prepared(_gaussian(m, seed=17))
    U = torch.randn(4, m, generator=_generator(18), dtype=F64)
    V, info = solve_dual_cone_active_set_with_info(U, G, max_iter=0)
    assert bool(info.fallback.all()) and not bool(info.cg_certified.any())
    _assert_matches_quadprog(U, G, V, torch.arange(4))


@pytest.mark.parametrize("density", [0.01, 0.5])
def test_sparse_aware_product_equals_the_dense_product(density: float) -> None:
    X = torch.randn(64, 96, generator=_generator(19), dtype=F64)
    X = X * (torch.rand(64, 96, generator=_generator(20)) < density)
    M = torch.randn(96, 96, generator=_generator(21), dtype=F64)
    torch.testing.assert_close(sparse_aware_product(X, M), X @ M, rtol=1e-12, atol=1e-12)
    assert sparse_aware_product(X[:0], M).shape == (0, 96)
