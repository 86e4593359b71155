"""The batched active-set dual-cone solver against the quadprog reference.

Problem: ``v = argmin vᵀGv s.t. v >= u`` for every row ``u`` of ``U`` (Quinton & Rey, arXiv:2406.16232,
Proposition 1). quadprog (Goldfarb–Idnani, one QP per row) is the oracle.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import hf_jd.aggregation._active_set._linalg as linalg_module
import hf_jd.aggregation._active_set._start as start_module
import hf_jd.aggregation._dual_cone as dual_cone
from hf_jd.aggregation import DualProj, UPGrad, UPGradWeighting, project_weights, solver_names
from hf_jd.aggregation._active_set import (
    ActiveSetInfo,
    ActiveSetState,
    KKTResiduals,
    kkt_residuals,
    kkt_tolerance,
    solve_dual_cone_active_set,
    solve_dual_cone_active_set_with_info,
)
from hf_jd.aggregation._gramian_utils import normalize_gramian, regularize_gramian, symmetrize
from hf_jd.aggregation._quadprog_solver import solve_dual_cone_quadprog

F64 = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _jacobian(m: int, rank: int, seed: int, n: int | None = None) -> Tensor:
    """An ``m x n`` Jacobian of the given rank with a shared component (so rows both agree and conflict)."""
    g = _generator(seed)
    n = n or max(2 * m, 4)
    basis = torch.randn(rank, n, generator=g, dtype=F64)
    mean = torch.randn(1, rank, generator=g, dtype=F64) * 0.5
    return (torch.randn(m, rank, generator=g, dtype=F64) + mean) @ basis


def _prepared(J: Tensor) -> Tensor:
    """The Gramian exactly as UPGrad/DualProj hand it to the solvers (normalised + ridge)."""
    return regularize_gramian(normalize_gramian(symmetrize(J @ J.T), 1e-4), 1e-4)


def _upgrad_rhs(m: int, dtype: torch.dtype = F64) -> Tensor:
    return torch.eye(m, dtype=dtype) / m


def _assert_matches_quadprog(U: Tensor, G: Tensor, V: Tensor, rtol: float = 1e-6) -> None:
    expected = solve_dual_cone_quadprog(U.double(), G.double())
    scale = expected.abs().max().clamp(min=1e-300)
    error = (V.double() - expected).abs().max()
    assert error <= rtol * scale, f"max |V - V_quadprog| = {error:.3e} (scale {scale:.3e})"


RESIDUALS = ("primal", "dual", "complementarity")


def _residual(residuals: KKTResiduals, key: str) -> Tensor:
    return getattr(residuals, key)


def _assert_certified(info: ActiveSetInfo) -> None:
    tol = info.tolerance
    for key in RESIDUALS:
        residual = _residual(info.residuals, key)
        assert bool((residual <= tol).all()), f"{key} residual {residual.max():.3e} > {tol:.3e}"


# ---------------------------------------------------------------------------------------------- exactness


SIZES_AND_RANKS = [(1, 1), (2, 1), (2, 2), (3, 1), (3, 3), (5, 2), (5, 5), (8, 1), (8, 3), (8, 8),
                   (16, 4), (16, 16), (32, 5), (32, 32), (64, 10), (64, 64), (128, 128)]  # fmt: skip


@pytest.mark.parametrize(("m", "rank"), SIZES_AND_RANKS)
def test_upgrad_weights_equal_quadprog(m: int, rank: int) -> None:
    G = _prepared(_jacobian(m, rank, seed=m * 1000 + rank))
    U = _upgrad_rhs(m)
    V, info = solve_dual_cone_active_set_with_info(U, G)
    _assert_matches_quadprog(U, G, V)
    assert (V.sum(0) - solve_dual_cone_quadprog(U, G).sum(0)).abs().max() <= 1e-6
    _assert_certified(info)
    assert not bool(info.fallback.any())


def test_m256_matches_quadprog_on_a_subset_of_rows() -> None:
    # quadprog takes seconds for all 256 rows; the batched solver solves all, quadprog checks 24.
    m = 256
    G = _prepared(_jacobian(m, 200, seed=7))
    U = _upgrad_rhs(m)
    V, info = solve_dual_cone_active_set_with_info(U, G)
    rows = torch.randperm(m, generator=_generator(0))[:24]
    _assert_matches_quadprog(U[rows], G, V[rows])
    _assert_certified(info)
    assert not bool(info.fallback.any())


@pytest.mark.parametrize("m", [8, 32, 96])
def test_single_right_hand_side_dualproj(m: int) -> None:
    G = _prepared(_jacobian(m, m // 2, seed=m))
    u = torch.full((m,), 1.0 / m, dtype=F64)
    v, info = solve_dual_cone_active_set_with_info(u, G)
    assert v.shape == (m,)
    _assert_matches_quadprog(u[None], G, v[None])
    _assert_certified(info)


@pytest.mark.parametrize("scale", [1e-8, 1e-4, 1.0, 1e4, 1e8])
def test_scales_with_upgrad_preparation(scale: float) -> None:
    m = 24
    G = _prepared(_jacobian(m, 12, seed=3) * scale)
    U = _upgrad_rhs(m)
    V, info = solve_dual_cone_active_set_with_info(U, G)
    _assert_matches_quadprog(U, G, V)
    _assert_certified(info)


@pytest.mark.parametrize("scale", [1e-8, 1e-4, 1.0, 1e4, 1e8])
def test_raw_positive_definite_matrices(scale: float) -> None:
    m = 20
    A = torch.randn(m, m, generator=_generator(11), dtype=F64)
    G = scale * (A @ A.T + 0.1 * torch.eye(m, dtype=F64))
    U = torch.randn(m, m, generator=_generator(12), dtype=F64)  # general right-hand sides, mixed signs
    V, info = solve_dual_cone_active_set_with_info(U, G)
    # The solution does not depend on the scale of G; quadprog itself fails on G at 1e8 ("constraints
    # are inconsistent"), so it is given the unscaled matrix.
    _assert_matches_quadprog(U, G / scale, V)
    _assert_certified(info)


def test_raw_matrix_with_badly_scaled_rows() -> None:
    # Row norms from 1e-4 to 1e4: the equilibration makes this as easy as the unscaled problem.
    m = 16
    J = _jacobian(m, m, seed=5) * torch.logspace(-4, 4, m, dtype=F64)[:, None]
    G = J @ J.T + 1e-6 * torch.eye(m, dtype=F64)
    U = _upgrad_rhs(m)
    V, info = solve_dual_cone_active_set_with_info(U, G)
    _assert_certified(info)
    _assert_matches_quadprog(U, G, V, rtol=1e-5)


def test_duplicated_and_zero_rows() -> None:
    base = _jacobian(6, 6, seed=21, n=10)
    J = torch.cat([base, base[:3], torch.zeros(2, 10, dtype=F64), -base[:1]])
    G = _prepared(J)
    U = _upgrad_rhs(J.shape[0])
    V, info = solve_dual_cone_active_set_with_info(U, G)
    _assert_matches_quadprog(U, G, V)
    _assert_certified(info)


def test_all_zero_jacobian() -> None:
    G = _prepared(torch.zeros(5, 7, dtype=F64))  # normalisation gives 0, the ridge gives eps * I
    U = _upgrad_rhs(5)
    V = solve_dual_cone_active_set(U, G)
    torch.testing.assert_close(V, U)  # all rows are trivially non-conflicting: v_i = u_i


def test_zero_right_hand_side_gives_zero() -> None:
    G = _prepared(_jacobian(6, 3, seed=2))
    U = torch.zeros(2, 6, dtype=F64)
    assert bool((solve_dual_cone_active_set(U, G) == 0).all())


def test_float32_inputs_return_float32_close_to_quadprog() -> None:
    m = 40
    G = _prepared(_jacobian(m, 20, seed=9)).float()
    U = _upgrad_rhs(m, torch.float32)
    V = solve_dual_cone_active_set(U, G)
    assert V.dtype == torch.float32
    _assert_matches_quadprog(U, G, V, rtol=1e-4)


def test_ill_conditioned_gramian_uses_primal_route_only() -> None:
    # cond ~1e10: the dual route (through G^{-1}) is disabled; the answer is still certified.
    m = 12
    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=_generator(4), dtype=F64))
    G = Q @ torch.diag(torch.logspace(0, -10, m, dtype=F64)) @ Q.T
    U = _upgrad_rhs(m)
    V, info = solve_dual_cone_active_set_with_info(U, G)
    _assert_certified(info)
    _assert_matches_quadprog(U, G, V, rtol=1e-4)


def test_out_of_place_factorisation_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # The path other devices (CUDA) take, exercised on CPU.
    asked: list[torch.device] = []
    monkeypatch.setattr(linalg_module, "factorize_in_place", lambda device: asked.append(device) or False)
    m = 64
    G = _prepared(_jacobian(m, 40, seed=34))
    U = _upgrad_rhs(m)
    V, info = solve_dual_cone_active_set_with_info(U, G)
    assert asked  # the patched choice was consulted
    _assert_matches_quadprog(U, G, V)
    _assert_certified(info)


def test_factorisations_split_across_threads() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        m = 80
        G = _prepared(_jacobian(m, 80, seed=35, n=300))
        U = _upgrad_rhs(m)
        V, info = solve_dual_cone_active_set_with_info(U, G, ActiveSetState())
    finally:
        torch.set_num_threads(threads)
    _assert_matches_quadprog(U, G, V)
    _assert_certified(info)


# ---------------------------------------------------------------------------------- KKT certificate


def test_reported_residuals_match_an_independent_computation() -> None:
    m = 48
    G = _prepared(_jacobian(m, 30, seed=13))
    U = _upgrad_rhs(m)
    V, info = solve_dual_cone_active_set_with_info(U, G)
    recomputed = kkt_residuals(U, G, V)
    for key in RESIDUALS:
        torch.testing.assert_close(
            _residual(info.residuals, key), _residual(recomputed, key), rtol=0, atol=1e-15
        )
    assert info.tolerance == kkt_tolerance(m)
    # The certified active sets are those of the solution: v_j = u_j exactly where active.
    assert bool((V[info.active] == U[info.active]).all())


def test_residuals_detect_a_wrong_solution() -> None:
    m = 16
    G = _prepared(_jacobian(m, 16, seed=14))
    U = _upgrad_rhs(m)
    V = solve_dual_cone_active_set(U, G)
    tol = kkt_tolerance(m)
    assert bool((kkt_residuals(U, G, V).primal <= tol).all())
    infeasible = V.clone()
    infeasible[0, 0] -= 0.1 / m  # violates v >= u
    assert kkt_residuals(U, G, infeasible).primal[0] > 1e3 * tol
    not_optimal = U.clone()  # feasible, but not optimal where rows conflict: some lambda < 0
    residuals = kkt_residuals(U, G, not_optimal)
    assert bool((residuals.dual > 1e3 * tol).any())


def test_quadprog_fallback_with_a_tiny_iteration_budget() -> None:
    m = 32
    G = _prepared(_jacobian(m, 32, seed=15))
    U = _upgrad_rhs(m)
    V1, info1 = solve_dual_cone_active_set_with_info(U, G, max_iter=1)
    assert bool(info1.fallback.any()) and bool((~info1.fallback).any())
    assert bool((info1.fallback == ~info1.certified).all())
    _assert_matches_quadprog(U, G, V1)
    V0, info0 = solve_dual_cone_active_set_with_info(U, G, max_iter=0)
    assert bool(info0.fallback.all())
    _assert_matches_quadprog(U, G, V0)
    # quadprog's answers also satisfy the certificate (up to its own round-off).
    assert bool((info0.residuals.primal <= 1e-12).all()) and bool((info0.residuals.dual <= 1e-12).all())


def test_inexact_start_saves_exact_iterations(monkeypatch: pytest.MonkeyPatch) -> None:
    m = 96
    G = _prepared(_jacobian(m, 96, seed=16, n=400))
    U = _upgrad_rhs(m)
    V, info = solve_dual_cone_active_set_with_info(U, G)
    monkeypatch.setattr(start_module, "INEXACT_STEPS", 0)
    V_exact_start, info_exact_start = solve_dual_cone_active_set_with_info(U, G)
    assert int(info.iterations.sum()) < int(info_exact_start.iterations.sum())
    assert info.factorizations < info_exact_start.factorizations
    for solution, details in ((V, info), (V_exact_start, info_exact_start)):
        _assert_matches_quadprog(U, G, solution)
        _assert_certified(details)


def test_bordered_updates_are_used_and_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the inexact start, later iterations change few indices: the factorisations of the
    # first one are reused through bordered solves instead of factorising again.
    monkeypatch.setattr(start_module, "INEXACT_STEPS", 0)
    m = 96
    G = _prepared(_jacobian(m, 96, seed=16, n=400))
    U = _upgrad_rhs(m)
    V, info = solve_dual_cone_active_set_with_info(U, G)
    assert int(info.iterations.max()) >= 3
    assert info.factorizations < int(info.iterations.sum())
    _assert_matches_quadprog(U, G, V)
    _assert_certified(info)


# ------------------------------------------------------------------------------------------ warm start


def test_warm_start_on_a_nearby_gramian_is_exact_and_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    m = 64
    J = _jacobian(m, 40, seed=17)
    G1 = _prepared(J)
    G2 = _prepared(J + 0.05 * torch.randn(J.shape, generator=_generator(18), dtype=F64))
    U = _upgrad_rhs(m)
    state = ActiveSetState()
    _, cold = solve_dual_cone_active_set_with_info(U, G1, state)
    assert not cold.warm_start
    V2, warm = solve_dual_cone_active_set_with_info(U, G2, state)
    assert warm.warm_start
    _assert_matches_quadprog(U, G2, V2)
    _assert_certified(warm)
    # From the previous active sets, a row needs one or two exact iterations; from the plain cold
    # guess (without the inexact steps a warm start skips) it needs more.
    assert int(warm.iterations.max()) <= 2
    monkeypatch.setattr(start_module, "INEXACT_STEPS", 0)
    _, cold2 = solve_dual_cone_active_set_with_info(U, G2)
    assert int(warm.iterations.sum()) < int(cold2.iterations.sum())


def test_warm_start_from_wrong_active_sets_is_still_exact() -> None:
    m = 48
    G = _prepared(_jacobian(m, 24, seed=19))
    U = _upgrad_rhs(m)
    state = ActiveSetState()
    solve_dual_cone_active_set(U, G, state)
    state.active = torch.rand(m, m, generator=_generator(20)) < 0.5  # garbage starting point
    V, info = solve_dual_cone_active_set_with_info(U, G, state)
    assert info.warm_start
    _assert_matches_quadprog(U, G, V)
    _assert_certified(info)


def test_warm_start_from_another_gramian_is_exact() -> None:
    m = 40
    U = _upgrad_rhs(m)
    state = ActiveSetState()
    solve_dual_cone_active_set(U, _prepared(_jacobian(m, 40, seed=22)), state)
    G = _prepared(_jacobian(m, 40, seed=23))  # unrelated: the warm start is not used, the answer exact
    V, info = solve_dual_cone_active_set_with_info(U, G, state)
    _assert_matches_quadprog(U, G, V)
    # Forcing the other Gramian's active sets onto this one still gives the exact answer.
    assert state.active is not None
    previous_active = state.active.clone()
    solve_dual_cone_active_set(U, G, state)
    state.active = previous_active
    V_forced, info_forced = solve_dual_cone_active_set_with_info(U, G, state)
    assert info_forced.warm_start
    torch.testing.assert_close(V_forced, V, rtol=1e-9, atol=1e-12)


def test_warm_start_ignored_when_shapes_change() -> None:
    state = ActiveSetState()
    solve_dual_cone_active_set(_upgrad_rhs(10), _prepared(_jacobian(10, 10, seed=24)), state)
    G = _prepared(_jacobian(12, 12, seed=25))
    V, info = solve_dual_cone_active_set_with_info(_upgrad_rhs(12), G, state)
    assert not info.warm_start
    _assert_matches_quadprog(_upgrad_rhs(12), G, V)


# ------------------------------------------------------------------------------------------- errors


def test_non_finite_inputs_raise() -> None:
    G = _prepared(_jacobian(4, 4, seed=26))
    bad = G.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        solve_dual_cone_active_set(_upgrad_rhs(4), bad)
    U = _upgrad_rhs(4)
    U[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        solve_dual_cone_active_set(U, G)


@pytest.mark.parametrize(
    "G",
    [
        -torch.eye(3, dtype=F64),
        torch.zeros(3, 3, dtype=F64),
        torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64),  # indefinite
    ],
)
def test_not_positive_definite_raises(G: Tensor) -> None:
    with pytest.raises(ValueError, match="not positive definite"):
        solve_dual_cone_active_set(_upgrad_rhs(G.shape[0]), G)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="do not match"):
        solve_dual_cone_active_set(torch.ones(2, 3, dtype=F64), torch.eye(4, dtype=F64))


def test_empty_problems() -> None:
    no_rows = solve_dual_cone_active_set(torch.zeros(0, 3, dtype=F64), torch.eye(3, dtype=F64))
    no_objectives = solve_dual_cone_active_set(torch.zeros(2, 0, dtype=F64), torch.zeros(0, 0, dtype=F64))
    assert no_rows.shape == (0, 3) and no_objectives.shape == (2, 0)
    _, info = solve_dual_cone_active_set_with_info(torch.zeros(2, 0, dtype=F64), torch.zeros(0, 0, dtype=F64))
    assert info.active.shape == (2, 0) and bool(info.certified.all()) and info.factorizations == 0
    _assert_certified(info)


def test_with_info_returns_the_same_solution_and_per_row_info() -> None:
    m = 40
    G = _prepared(_jacobian(m, 20, seed=36))
    U = _upgrad_rhs(m)
    V, info = solve_dual_cone_active_set_with_info(U, G)
    assert torch.equal(solve_dual_cone_active_set(U, G), V)
    residuals = [_residual(info.residuals, key) for key in RESIDUALS]
    for per_row in (info.iterations, info.certified, info.fallback, *residuals):
        assert per_row.shape == (m,)
    assert info.active.shape == (m, m) and not info.warm_start and info.factorizations > 0


# -------------------------------------------------------------------------------------- registration


def test_solver_registry() -> None:
    assert set(solver_names()) == {"auto", "active_set", "quadprog"}
    assert dual_cone._DEFAULT_SOLVER == "active_set"
    G = _prepared(_jacobian(20, 10, seed=27))
    U = _upgrad_rhs(20)
    expected = solve_dual_cone_quadprog(U, G)
    for name in solver_names():
        torch.testing.assert_close(
            project_weights(U, G, name, ActiveSetState()), expected, rtol=1e-8, atol=1e-12
        )


def test_auto_picks_quadprog_for_small_and_active_set_for_large(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("active_set", "quadprog"):
        solver = dual_cone._SOLVERS[name]
        monkeypatch.setitem(
            dual_cone._SOLVERS, name, lambda U, G, s, _n=name, _f=solver: (calls.append(_n), _f(U, G, s))[1]
        )
    project_weights(_upgrad_rhs(8), _prepared(_jacobian(8, 8, seed=28)))
    project_weights(_upgrad_rhs(80), _prepared(_jacobian(80, 80, seed=29)))
    assert calls == ["quadprog", "active_set"]


def test_unknown_solver_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="Unknown dual-cone solver 'cvxpy'") as error:
        UPGrad(solver="cvxpy")
    for name in solver_names():
        assert name in str(error.value)


@pytest.mark.parametrize("m", [6, 70])
def test_upgrad_default_agrees_with_quadprog(m: int) -> None:
    J = _jacobian(m, min(m, 30), seed=30 + m, n=50)
    reference = UPGrad(solver="quadprog")(J)
    torch.testing.assert_close(UPGrad()(J), reference, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(UPGrad(solver="active_set")(J), reference, rtol=1e-7, atol=1e-10)


def test_upgrad_weighting_keeps_warm_start_state_and_stays_exact() -> None:
    m = 72
    weighting = UPGradWeighting(solver="active_set")
    reference = UPGradWeighting(solver="quadprog")
    J = _jacobian(m, 40, seed=31)
    for step in range(3):
        J_step = J + 0.02 * step * torch.randn(J.shape, generator=_generator(step), dtype=F64)
        G = J_step @ J_step.T
        torch.testing.assert_close(weighting(G), reference(G), rtol=1e-7, atol=1e-10)
    active = weighting._solver_state.active
    assert active is not None and active.shape == (m, m)


def test_dualproj_solvers_agree() -> None:
    J = _jacobian(150, 60, seed=32)
    torch.testing.assert_close(
        DualProj(solver="active_set")(J), DualProj(solver="quadprog")(J), rtol=1e-7, atol=1e-10
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_quadprog(dtype: torch.dtype) -> None:
    m = 96
    G = _prepared(_jacobian(m, 60, seed=33)).to("cuda", dtype)
    U = _upgrad_rhs(m, dtype).to("cuda")
    V, info = solve_dual_cone_active_set_with_info(U, G)
    assert V.device.type == "cuda" and V.dtype == dtype
    _assert_matches_quadprog(U.cpu(), G.cpu(), V.cpu(), rtol=1e-6 if dtype == F64 else 1e-4)
    _assert_certified(info)
