"""Properties of the added aggregators (CAGrad, ConFIG, Aligned-MTL, GradVac, Krum, GradDrop,
Nash-MTL, FairGrad): robustness on edge cases, the defining property of each method against an
independent formulation, and argument validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _aggregation_matrices import edge_matrices, ill_conditioned, randn
from torch import Tensor
from torch.testing import assert_close

from hf_jd.aggregation import (
    IMTLG,
    AlignedMTL,
    CAGrad,
    ConFIG,
    FairGrad,
    GradDrop,
    GradVac,
    GramianWeightedAggregator,
    Krum,
    Mean,
    NashMTL,
    PCGrad,
    aggregator_specs,
    get_aggregator,
)

# Every built-in aggregator (its spec), built with the spec's example arguments.
SPECS = {spec.name: spec for spec in aggregator_specs()}
ZOO_NAMES = list(SPECS)
GRAMIAN_NAMES = [name for name, spec in SPECS.items() if not spec.needs_jacobian]


def _build(name: str, m: int):
    return get_aggregator(name, **SPECS[name].example_kwargs(m))


def _scaled_matrices() -> dict[str, Tensor]:
    """Edge matrices plus whole-matrix scales 1e-10 ... 1e10 and rank-deficient ones, float32 and float64."""
    matrices = dict(edge_matrices())
    base = randn(60, 4, 6)
    for scale in (1e-10, 1e-5, 1e5, 1e10):
        for dtype in (torch.float32, torch.float64):
            name = f"{scale:g}_x_4x6_{str(dtype)[6:]}"
            matrices[name] = (scale * base).to(dtype)
    matrices["duplicated_rank2_float32"] = torch.cat([randn(61, 3, 2) @ randn(62, 2, 7)] * 2).float()
    matrices["zero_float32"] = torch.zeros(3, 5)
    return matrices


SCALED = _scaled_matrices()


@pytest.mark.parametrize("name", ZOO_NAMES)
@pytest.mark.parametrize("key", list(SCALED))
def test_shape_dtype_device_and_finiteness(name, key):
    matrix = SCALED[key]
    m, n = matrix.shape
    aggregator = _build(name, m)
    update = aggregator(matrix)
    assert update.shape == (n,) and update.dtype == matrix.dtype and update.device == matrix.device
    assert torch.isfinite(update).all(), update
    if isinstance(aggregator, GramianWeightedAggregator):
        weights = _build(name, m).weights(matrix)
        assert weights.shape == (m,) and weights.dtype == matrix.dtype
        assert torch.isfinite(weights).all(), weights
    for _ in range(3):  # stateful methods: the state built from such a matrix stays usable
        later = aggregator(matrix)
        assert later.shape == (n,) and later.dtype == matrix.dtype and torch.isfinite(later).all(), later


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zero_matrix_gives_zero_update(name):
    for dtype in (torch.float32, torch.float64):
        assert_close(_build(name, 4)(torch.zeros(4, 3, dtype=dtype)), torch.zeros(3, dtype=dtype))


@pytest.mark.parametrize("name", GRAMIAN_NAMES)
def test_gramian_methods_depend_on_the_gramian_only(name):
    """Two Jacobians with the same Gramian (J and J Q for an orthogonal Q) get the same weights."""
    matrix = randn(63, 4, 6)
    Q = torch.linalg.qr(randn(64, 6, 6)).Q
    aggregator = _build(name, 4)
    assert isinstance(aggregator, GramianWeightedAggregator)
    assert_close(_build(name, 4).weights(matrix @ Q), aggregator.weights(matrix), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("cls", [CAGrad, ConFIG, AlignedMTL])
@pytest.mark.parametrize("factor", [0.05, 0.5, 10.0, 1e4])
def test_scale_equivariance(cls, factor):
    """Their weights do not depend on the scale of J, so A(cJ) = c A(J) (CAGrad: while the trace of
    the Gramian exceeds norm_eps)."""
    matrix = randn(65, 4, 7)
    assert (factor * matrix).pow(2).sum() > 1e-4
    assert_close(cls()(factor * matrix), factor * cls()(matrix), rtol=1e-7, atol=0)


# --------------------------------------------------------------------------------------- CAGrad


def _cagrad_matrices() -> list[Tensor]:
    return [randn(70, 2, 3), randn(71, 3, 5), randn(72, 5, 8), torch.cat([randn(73, 3, 6)] * 2)]


@pytest.mark.parametrize("c", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("matrix", _cagrad_matrices(), ids=lambda t: f"{t.shape[0]}x{t.shape[1]}")
def test_cagrad_solves_its_primal_problem(matrix, c):
    r"""The update lies on the sphere :math:`\|d - g_0\| = c \|g_0\|` and no random point of that
    ball improves the worst objective :math:`\min_i g_i^\top d` more (strong duality)."""
    d = CAGrad(c=c)(matrix)
    g0 = matrix.mean(dim=0)
    radius = c * g0.norm()
    assert_close((d - g0).norm(), radius, rtol=1e-8, atol=0)
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(20000, matrix.shape[1], generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)
    radii = torch.rand(20000, 1, generator=generator, dtype=torch.float64) ** (1 / matrix.shape[1])
    candidates = g0 + radius * radii * directions
    best_sampled = (candidates @ matrix.T).min(dim=1).values.max()
    assert (matrix @ d).min() >= best_sampled - 1e-9


@pytest.mark.parametrize("matrix", _cagrad_matrices(), ids=lambda t: f"{t.shape[0]}x{t.shape[1]}")
def test_cagrad_dual_objective_is_minimal(matrix):
    """The dual objective at the solver's weights is below its value at many random simplex points."""
    G = matrix @ matrix.T
    G = (G / G.trace()).numpy()
    m = G.shape[0]
    b = G @ np.full(m, 1 / m)
    s = 0.5 * np.sqrt(np.full(m, 1 / m) @ b)
    weights = CAGrad(c=0.5).weights(matrix).numpy()
    w = (weights - 1 / m) / (weights - 1 / m).sum()  # the dual solution, up to its scale

    def objective(x):
        return x @ b + s * np.sqrt(max(x @ G @ x, 0.0))

    samples = np.random.default_rng(0).dirichlet(np.full(m, 0.3), size=50000)
    assert objective(w) <= min(objective(x) for x in samples) + 1e-12


def test_cagrad_with_c_zero_is_the_mean():
    matrix = randn(74, 4, 6)
    assert_close(CAGrad(c=0.0)(matrix), Mean()(matrix))


def test_cagrad_single_row_is_returned_unchanged_up_to_the_ball_scale():
    row = randn(75, 1, 5)
    assert_close(CAGrad(c=0.5)(row), 1.5 * row[0])


# --------------------------------------------------------------------------------------- ConFIG


def _config_reference(matrix: Tensor, pref: Tensor | None = None) -> Tensor:
    """Equation 2 of arXiv:2408.11104 with the explicit Jacobian and an SVD-based pseudo-inverse."""
    p = torch.ones(matrix.shape[0], dtype=matrix.dtype) if pref is None else pref
    units = matrix / matrix.norm(dim=1, keepdim=True)
    direction = torch.linalg.pinv(units) @ p
    unit = direction / direction.norm()
    return (matrix @ unit).sum() * unit


@pytest.mark.parametrize(
    "matrix",
    [randn(76, 2, 3), randn(77, 4, 7), randn(78, 6, 6), torch.cat([randn(79, 3, 5)] * 2), randn(80, 7, 3)],
    ids=["2x3", "4x7", "6x6", "duplicated_6x5", "tall_7x3"],
)
def test_config_matches_the_jacobian_formula(matrix):
    """Through the Gramian the conditioning is squared: compare up to 1e-7 of the update's norm."""
    expected = _config_reference(matrix)
    assert_close(ConFIG()(matrix), expected, rtol=0, atol=1e-7 * expected.norm())
    pref = torch.linspace(0.5, 2.0, matrix.shape[0], dtype=torch.float64)
    expected = _config_reference(matrix, pref)
    assert_close(ConFIG(pref_vector=pref.tolist())(matrix), expected, rtol=0, atol=1e-7 * expected.norm())


def test_config_has_equal_positive_projections_on_unit_gradients():
    matrix = randn(81, 4, 9)
    update = ConFIG()(matrix)
    projections = (matrix @ update) / matrix.norm(dim=1)
    assert (projections > 0).all()
    assert_close(projections, projections.mean().expand_as(projections), rtol=1e-9, atol=0)


def test_config_preference_scale_does_not_matter():
    matrix = randn(82, 3, 5)
    assert_close(ConFIG(pref_vector=[2.0, 2.0, 2.0])(matrix), ConFIG()(matrix))


# ---------------------------------------------------------------------------------- Aligned-MTL


@pytest.mark.parametrize(
    "matrix", [randn(83, 3, 6), randn(84, 5, 5), randn(85, 2, 9)], ids=["3x6", "5x5", "2x9"]
)
def test_aligned_mtl_matches_svd_formula_and_aligns(matrix):
    r"""With :math:`J = U S V^\top` (full row rank), the update is
    :math:`\sigma_{\min} V U^\top p`, and the balance transformation makes :math:`B G B =
    \lambda_{\min} I`."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    p = torch.full((matrix.shape[0],), 1 / matrix.shape[0], dtype=torch.float64)
    assert_close(AlignedMTL()(matrix), S.min() * Vh.T @ U.T @ p, rtol=1e-8, atol=1e-12)
    G = matrix @ matrix.T
    basis = torch.stack([AlignedMTL(pref_vector=row.tolist()).weights(matrix) for row in torch.eye(len(p))])
    assert_close(basis @ G @ basis, S.min() ** 2 * torch.eye(len(p), dtype=torch.float64), rtol=0, atol=1e-9)


def test_aligned_mtl_scale_modes():
    matrix = randn(86, 4, 6)
    eigenvalues = torch.linalg.eigvalsh(matrix @ matrix.T)
    base = AlignedMTL(scale_mode="min")(matrix) / eigenvalues.min().sqrt()
    assert_close(AlignedMTL(scale_mode="median")(matrix), eigenvalues.median().sqrt() * base)
    assert_close(AlignedMTL(scale_mode="rmse")(matrix), eigenvalues.mean().sqrt() * base)


def test_aligned_mtl_ignores_round_off_of_duplicated_rows():
    """Duplicated rows: the rank is that of the distinct rows, not the round-off's."""
    duplicated = torch.cat([randn(87, 3, 6)] * 2)
    p = torch.full((6,), 1 / 6, dtype=torch.float64)
    # J has rank 3: keep its 3 non-zero singular triplets in the SVD formula.
    U2, S2, Vh2 = torch.linalg.svd(duplicated, full_matrices=False)
    U2, S2, Vh2 = U2[:, :3], S2[:3], Vh2[:3]
    assert_close(AlignedMTL()(duplicated), S2.min() * Vh2.T @ U2.T @ p, rtol=1e-7, atol=1e-12)


def _aligned_mtl_by_hand(matrix: Tensor) -> np.ndarray:
    r"""Brute force in float64 with numpy: :math:`J^\top B p`, :math:`B = \sqrt{\lambda_{\min}} V \Lambda^{-1/2} V^\top`
    over *all* the eigenvalues of :math:`G = J J^\top` (the matrices below have full row rank)."""
    J = matrix.double().numpy()
    eigenvalues, V = np.linalg.eigh(J @ J.T)
    p = np.full(len(eigenvalues), 1 / len(eigenvalues))
    B = np.sqrt(eigenvalues.min()) * (V / np.sqrt(eigenvalues)) @ V.T
    return J.T @ (B @ p)


@pytest.mark.parametrize(
    ("m", "n", "condition", "dtype", "rtol"),
    [
        (3, 6, 1e5, torch.float32, 2e-3),
        (4, 10, 1e5, torch.float32, 2e-3),
        (16, 64, 1e5, torch.float32, 2e-3),
        (6, 12, 1e10, torch.float64, 1e-5),
    ],
    ids=["3x6-float32", "4x10-float32", "16x64-float32", "6x12-float64-cond1e10"],
)
def test_aligned_mtl_keeps_the_smallest_eigenvalue_of_an_ill_conditioned_full_rank_gramian(
    m, n, condition, dtype, rtol
):
    """A full-rank Gramian of condition ``1e5`` in float32 (``1e10`` in float64): every eigenvalue is
    above the official rank tolerance ``λ_max · m · eps``, so ``λ_min`` is ``λ⋆``. (With the former
    ``√eps · λ_max`` tolerance it was dropped and the update was 3.7-17x too long.)"""
    matrix = ill_conditioned(m, m, n, condition, dtype=dtype)
    expected = torch.from_numpy(_aligned_mtl_by_hand(matrix))
    result = AlignedMTL()(matrix)
    assert result.dtype == dtype
    assert_close(result.double(), expected, rtol=rtol, atol=rtol * expected.norm().item() / n**0.5)


def _imtlg_by_hand(matrix: Tensor) -> np.ndarray:
    r""":math:`J^\top w`, :math:`w = v / \mathbf 1^\top v`, :math:`v = G^{-1} \delta`, :math:`\delta_i = \|g_i\|` (full rank)."""
    J = matrix.double().numpy()
    v = np.linalg.solve(J @ J.T, np.linalg.norm(J, axis=1))
    return J.T @ (v / v.sum())


def _config_by_hand(matrix: Tensor) -> np.ndarray:
    r"""ConFIG with :math:`U = D^{-1} J`: :math:`g_v = U^+ \mathbf 1`, :math:`\hat g = g_v / \|g_v\|`,
    update :math:`(\sum_i g_i^\top \hat g)\, \hat g` (numpy's SVD pseudo-inverse of the full-rank U)."""
    J = matrix.double().numpy()
    direction = np.linalg.pinv(J / np.linalg.norm(J, axis=1, keepdims=True)) @ np.ones(len(J))
    unit = direction / np.linalg.norm(direction)
    return (J @ unit).sum() * unit


@pytest.mark.parametrize(
    ("cls", "by_hand"), [(IMTLG, _imtlg_by_hand), (ConFIG, _config_by_hand)], ids=["IMTLG", "ConFIG"]
)
@pytest.mark.parametrize(("m", "n"), [(3, 6), (4, 10), (8, 32)], ids=["3x6", "4x10", "8x32"])
def test_pseudo_inverses_keep_every_eigenvalue_of_an_ill_conditioned_full_rank_float32_gramian(
    cls, by_hand, m, n
):
    """IMTL-G and ConFIG invert (pseudo-invert) a Gramian: with the tolerance ``m · eps · λ_max``
    (``torch.linalg.pinv``'s default, TorchJD's) a full-rank float32 Gramian of condition ``1e5`` is
    inverted whole. (With the former ``√eps · λ_max`` its smallest eigenvalue was dropped: 3.7-20x off.)"""
    matrix = ill_conditioned(m, m, n, 1e5, dtype=torch.float32)
    expected = torch.from_numpy(by_hand(matrix))
    assert_close(cls()(matrix).double(), expected, rtol=2e-3, atol=2e-3 * expected.norm().item() / n**0.5)


def test_aligned_mtl_rank_tolerance_is_lambda_max_times_m_times_eps():
    """Eigenvalues just above ``λ_max · m · eps`` are kept, those just below are dropped."""
    m, eps = 4, torch.finfo(torch.float64).eps
    V, _ = torch.linalg.qr(randn(88, m, m))
    p = torch.full((m,), 1 / m, dtype=torch.float64)
    for factor, rank in [(2.0, m), (0.5, m - 1)]:
        eigenvalues = torch.tensor([1.0, 0.5, 0.25, factor * m * eps], dtype=torch.float64)
        gramian = (V * eigenvalues) @ V.T
        kept, basis = eigenvalues[:rank], V[:, :rank]
        expected = kept.min().sqrt() * (basis / kept.sqrt()) @ basis.T @ p
        assert_close(AlignedMTL().gramian_weighting(gramian), expected, rtol=1e-6, atol=0)


# -------------------------------------------------------------------------------------- GradVac


@pytest.mark.parametrize("matrix", [randn(88, 4, 6), randn(89, 6, 3), torch.cat([randn(90, 2, 5)] * 2)])
def test_gradvac_with_zero_rate_stays_pcgrad(matrix):
    aggregator = GradVac(beta=0.0)
    for _ in range(3):
        assert_close(aggregator(matrix), PCGrad()(matrix))


def test_gradvac_raises_similarity_to_the_target():
    """Two rows, targets set to 0.5: each adjusted row has cosine 0.5 with the other row (Eq. 2)."""
    matrix = torch.stack([randn(91, 5), randn(92, 5)])
    g0, g1 = matrix
    assert torch.cosine_similarity(g0, g1, dim=0) < 0.5
    aggregator = GradVac()
    targets = torch.full((2, 2), 0.5, dtype=torch.float64)
    aggregator.load_state_dict({"gramian_weighting._extra_state": {"targets": targets}})
    w = aggregator.weights(matrix)
    adjusted_0 = g0 + (w[1] - 1) * g1  # w = (1 + k_1, 1 + k_0) with g'_i = g_i + k_i g_j
    adjusted_1 = g1 + (w[0] - 1) * g0
    assert_close(torch.cosine_similarity(adjusted_0, g1, dim=0), torch.tensor(0.5, dtype=torch.float64))
    assert_close(torch.cosine_similarity(adjusted_1, g0, dim=0), torch.tensor(0.5, dtype=torch.float64))


def test_gradvac_targets_follow_the_moving_average():
    matrix = torch.stack([randn(93, 5), randn(94, 5)])
    cosine = torch.cosine_similarity(matrix[0], matrix[1], dim=0)
    aggregator = GradVac(beta=0.25)
    aggregator(matrix)
    targets = aggregator.state_dict()["gramian_weighting._extra_state"]["targets"]
    assert_close(targets, 0.25 * cosine * (1 - torch.eye(2, dtype=torch.float64)))


def test_gradvac_restarts_with_a_warning_when_the_number_of_objectives_changes():
    aggregator = GradVac()
    aggregator(randn(95, 3, 4))
    with pytest.warns(UserWarning, match="number of objectives changed from 3 to 2"):
        aggregator(randn(96, 2, 4))


# ----------------------------------------------------------------------------------------- Krum


def _krum_oracle(matrix: Tensor, f: int, q: int) -> Tensor:
    """Krum scores from explicit pairwise distances of the rows; average of the q best rows."""
    m = matrix.shape[0]
    distances = torch.cdist(matrix, matrix) ** 2
    scores = torch.stack(
        [
            torch.sort(torch.cat([distances[i, :i], distances[i, i + 1 :]])).values[: m - f - 2].sum()
            for i in range(m)
        ]
    )
    return matrix[torch.argsort(scores)[:q]].mean(dim=0)


@pytest.mark.parametrize(("f", "q"), [(0, 1), (1, 1), (2, 1), (2, 3)])
def test_krum_matches_brute_force_and_rejects_outliers(f, q):
    honest = randn(97, 7, 5)
    outliers = 50 + 10 * randn(98, 2, 5)
    matrix = torch.cat([honest[:3], outliers[:1], honest[3:], outliers[1:]])
    update = Krum(n_byzantine=f, n_selected=q)(matrix)
    assert_close(update, _krum_oracle(matrix, f, q), rtol=1e-10, atol=1e-12)
    if f == 2:
        weights = Krum(n_byzantine=f, n_selected=q).weights(matrix)
        assert weights[3] == 0 and weights[-1] == 0


def test_krum_with_too_few_rows_averages_everything():
    matrix = randn(99, 2, 4)
    assert_close(Krum(n_byzantine=0)(matrix), matrix.mean(dim=0))
    with pytest.raises(ValueError, match="needs at least 3 rows"):
        Krum(n_byzantine=0, n_selected=3)(matrix)


# ------------------------------------------------------------------------------------- GradDrop


def test_graddrop_keeps_one_sign_per_coordinate():
    matrix = randn(100, 5, 40)
    update = GradDrop(seed=1)(matrix)
    positive = matrix.clamp(min=0).sum(dim=0)
    negative = matrix.clamp(max=0).sum(dim=0)
    assert (torch.isclose(update, positive) | torch.isclose(update, negative)).all()
    assert torch.isclose(update, positive).any() and torch.isclose(update, negative).any()


def test_graddrop_keeps_the_sign_with_the_purity_probability():
    """A column with purity P keeps its positive entries with probability P."""
    column = torch.tensor([3.0, 1.0, -1.0], dtype=torch.float64)  # P = (1 + 3/5) / 2 = 0.8
    matrix = column[:, None].expand(3, 20000).clone()
    kept_positive = (GradDrop(seed=2)(matrix) == 4.0).double().mean()
    assert abs(kept_positive - 0.8) < 0.01


def test_graddrop_full_leak_is_the_sum_and_leak_is_validated():
    matrix = randn(101, 3, 6)
    assert_close(GradDrop(leak=[1.0, 1.0, 1.0], seed=0)(matrix), matrix.sum(dim=0))
    partial = GradDrop(leak=[1.0, 0.0, 0.0], seed=0)(matrix)
    # Row 0 always passes through, rows 1-2 are masked with the same draws as without leak.
    masked = GradDrop(seed=0)(matrix) - GradDrop(leak=[0.0, 0.0, 0.0], seed=0)(matrix)
    assert_close(masked, torch.zeros(6, dtype=torch.float64))
    assert partial.shape == (6,) and torch.isfinite(partial).all()
    with pytest.raises(ValueError, match="3 leak values but there are 2 objectives"):
        GradDrop(leak=[0.0, 0.0, 0.0])(matrix[:2])


def test_graddrop_f_is_applied_to_the_purity():
    matrix = randn(102, 4, 30)
    always_positive = GradDrop(f=lambda purity: torch.ones_like(purity), seed=0)(matrix)
    assert_close(always_positive, matrix.clamp(min=0).sum(dim=0))


def test_graddrop_seed_reproducibility():
    matrix = randn(103, 4, 30)
    assert torch.equal(GradDrop(seed=5)(matrix), GradDrop(seed=5)(matrix))
    assert not torch.equal(GradDrop(seed=5)(matrix), GradDrop(seed=6)(matrix))


# ------------------------------------------------------------------------------ Nash-MTL, FairGrad


NASH_MATRICES = [randn(104, 2, 3), randn(105, 4, 7), randn(106, 6, 10), torch.cat([randn(107, 3, 6)] * 2)]


@pytest.mark.parametrize("matrix", NASH_MATRICES, ids=lambda t: f"{t.shape[0]}x{t.shape[1]}")
def test_nash_mtl_solves_the_bargaining_system(matrix):
    """G α = 1/α (up to the 1e-8 relative ridge), α > 0: every objective gets α_i g_i·d = 1."""
    alpha = NashMTL(max_norm=0.0).weights(matrix)
    assert (alpha > 0).all()
    assert_close((matrix @ matrix.T) @ alpha * alpha, torch.ones_like(alpha), rtol=0, atol=1e-6)


def test_nash_mtl_clips_the_update_norm():
    """The bargaining update has a scale-free norm (α_i g_i·d = 1); max_norm caps it."""
    matrix = 100 * randn(108, 3, 5)
    unclipped = NashMTL(max_norm=0.0)(matrix)
    for max_norm in (0.5, 1.0, 1e3):
        update = NashMTL(max_norm=max_norm)(matrix)
        assert_close(update, unclipped * min(1.0, max_norm / unclipped.norm()))
        assert update.norm() <= max_norm * (1 + 1e-12)


def test_nash_mtl_reuses_its_weights_between_updates():
    first, second = randn(109, 3, 5), randn(110, 3, 5)
    aggregator = NashMTL(max_norm=0.0, update_weights_every=2)
    reference = NashMTL(max_norm=0.0)
    assert_close(aggregator.weights(first), reference.weights(first))
    assert_close(aggregator.weights(second), reference.weights(first))  # reused
    assert_close(aggregator.weights(second), reference.weights(second))  # recomputed


def test_nash_mtl_checks_n_tasks():
    with pytest.raises(ValueError, match="n_tasks=3"):
        NashMTL(n_tasks=3)(randn(111, 2, 4))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("matrix", NASH_MATRICES, ids=lambda t: f"{t.shape[0]}x{t.shape[1]}")
def test_fairgrad_solves_its_fairness_system(matrix, alpha):
    w = FairGrad(alpha=alpha).weights(matrix)
    assert (w > 0).all()
    assert_close((matrix @ matrix.T) @ w * w ** (1 / alpha), torch.ones_like(w), rtol=0, atol=1e-6)


@pytest.mark.parametrize("matrix", NASH_MATRICES, ids=lambda t: f"{t.shape[0]}x{t.shape[1]}")
def test_fairgrad_with_alpha_one_is_nash_mtl(matrix):
    assert_close(FairGrad(alpha=1.0)(matrix), NashMTL(max_norm=0.0)(matrix), rtol=1e-10, atol=1e-12)


def test_fairgrad_zero_rows_get_zero_weight():
    matrix = torch.cat([torch.zeros(1, 4, dtype=torch.float64), randn(112, 2, 4)])
    w = FairGrad().weights(matrix)
    assert w[0] == 0 and (w[1:] > 0).all()


# ------------------------------------------------------------------------------------ Validation


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: CAGrad(c=-0.1), ValueError, "CAGrad's c must be >= 0"),
        (lambda: CAGrad(c="0.5"), TypeError, "CAGrad's c must be a finite number"),
        (lambda: CAGrad(norm_eps=0), ValueError, "norm_eps must be > 0"),
        (lambda: ConFIG(pref_vector=[[1.0]]), ValueError, "pref_vector"),
        (lambda: AlignedMTL(scale_mode="max"), ValueError, "scale_mode must be one of"),
        (lambda: AlignedMTL(pref_vector=[1.0, float("nan")]), ValueError, "pref_vector"),
        (lambda: GradVac(beta=1.5), ValueError, "GradVac's beta must be in"),
        (lambda: GradVac(eps=-1.0), ValueError, "GradVac's eps must be > 0"),
        (lambda: Krum(n_byzantine=-1), ValueError, "n_byzantine must be >= 0"),
        (lambda: Krum(n_selected=0), ValueError, "n_selected must be >= 1"),
        (lambda: Krum(n_selected=1.5), TypeError, "n_selected must be an integer"),
        (lambda: GradDrop(f=3), TypeError, "GradDrop's f must be a callable"),
        (lambda: GradDrop(leak=[0.5, 2.0]), ValueError, "leak values must be in"),
        (lambda: GradDrop(leak=[[0.5]]), ValueError, "leak must be a non-empty 1-D list"),
        (lambda: GradDrop(seed=1.5), TypeError, "GradDrop's seed must be an integer"),
        (lambda: NashMTL(n_tasks=0), ValueError, "n_tasks must be >= 1"),
        (lambda: NashMTL(max_norm=-1.0), ValueError, "max_norm must be >= 0"),
        (lambda: NashMTL(update_weights_every=0), ValueError, "update_weights_every"),
        (lambda: NashMTL(optim_niter=True), TypeError, "optim_niter must be an integer"),
        (lambda: FairGrad(alpha=0.0), ValueError, "FairGrad's alpha must be > 0"),
        (lambda: FairGrad(alpha=float("inf")), ValueError, "alpha must be a finite number"),
    ],
)
def test_invalid_arguments_name_the_argument(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    "aggregator",
    [
        CAGrad(c=0.4, norm_eps=0.001),
        ConFIG(pref_vector=[1.0, 2.0]),
        AlignedMTL(scale_mode="median"),
        GradVac(beta=0.5, eps=1e-06),
        Krum(n_byzantine=2, n_selected=3),
        GradDrop(leak=[0.5, 0.0], seed=3),
        NashMTL(n_tasks=3, max_norm=2.0, update_weights_every=5, optim_niter=10),
        FairGrad(alpha=2.0, max_norm=0.0, max_iter=50),
    ],
    ids=lambda a: type(a).__name__,
)
def test_repr_is_evaluable(aggregator):
    namespace = {
        cls.__name__: cls for cls in (CAGrad, ConFIG, AlignedMTL, GradVac, Krum, GradDrop, NashMTL, FairGrad)
    }
    assert repr(eval(repr(aggregator), namespace)) == repr(aggregator)
