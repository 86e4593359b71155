"""Properties every aggregator must have, and the behaviours specific to each method."""

from __future__ import annotations

import pytest
import torch
from _aggregation_matrices import randn
from torch import Tensor
from torch.testing import assert_close

from hf_jd.aggregation import (
    IMTLG,
    MGDA,
    Constant,
    ConstantWeighting,
    DualProj,
    GramianWeightedAggregator,
    Mean,
    MGDAWeighting,
    PCGrad,
    Random,
    Sum,
    UPGrad,
    WeightedAggregator,
    aggregator_class,
    aggregator_names,
)

ALL_NAMES = aggregator_names()
GRAMIAN_NAMES = [name for name in ALL_NAMES if issubclass(aggregator_class(name), GramianWeightedAggregator)]
# Constant and PCD (its primary row) depend on the index of each row by design; Random draws new
# weights at each call.
DETERMINISTIC_NAMES = [name for name in ALL_NAMES if name not in ("constant", "random", "pcd")]
PAPER_J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


@pytest.mark.parametrize("name", ALL_NAMES)
def test_shape_dtype_and_finiteness(name, edge_matrix, build_aggregator):
    m, n = edge_matrix.shape
    aggregator = build_aggregator(name, m)
    update = aggregator(edge_matrix)
    assert update.shape == (n,)
    assert update.dtype == edge_matrix.dtype
    assert torch.isfinite(update).all(), update
    if isinstance(aggregator, GramianWeightedAggregator):
        weights = build_aggregator(name, m).weights(edge_matrix)  # fresh: Random draws at each call
        assert weights.shape == (m,)
        assert weights.dtype == edge_matrix.dtype
        assert torch.isfinite(weights).all(), weights
        assert_close(weights @ edge_matrix, update)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_zero_matrix_gives_zero_update(name, build_aggregator):
    matrix = torch.zeros(3, 4, dtype=torch.float64)
    assert_close(build_aggregator(name, 3)(matrix), torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize(
    ("aggregator", "expected"),
    [
        (UPGrad(), [0.2929, 1.9004, 1.9004]),
        (DualProj(), [0.5563, 1.1109, 1.1109]),
        (MGDA(), [0.0, 1.0, 1.0]),
        (PCGrad(), [0.5848, 3.8012, 3.8012]),
        (IMTLG(), [0.0767, 1.0, 1.0]),
        (Mean(), [1.0, 1.0, 1.0]),
        (Sum(), [2.0, 2.0, 2.0]),
        (Constant([1.0, 2.0]), [8.0, 3.0, 3.0]),
    ],
    ids=repr,
)
def test_published_values(aggregator, expected):
    """Values on J = [[-4, 1, 1], [6, 1, 1]] published in arXiv:2406.16232 / TorchJD's docs."""
    assert_close(aggregator(PAPER_J), torch.tensor(expected), atol=1e-4, rtol=0)


def _dual_cone_matrices() -> list[Tensor]:
    base = randn(0, 3, 6)
    matrices = [randn(seed, m, n) for seed, (m, n) in enumerate([(2, 3), (3, 5), (5, 7), (6, 10), (7, 4)])]
    matrices += [
        torch.cat([base, base]),  # duplicated rows
        randn(20, 6, 2) @ randn(21, 2, 8),  # rank 2
        torch.cat([base[:1], -base[:1], base[1:2]]),  # directly opposed rows
        randn(22, 4, 5) * torch.tensor([1e-6, 1.0, 1e3, 1e6], dtype=torch.float64)[:, None],
    ]
    return matrices


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
@pytest.mark.parametrize("matrix", _dual_cone_matrices(), ids=lambda t: f"{t.shape[0]}x{t.shape[1]}")
def test_dual_cone_aggregators_do_not_conflict(cls, matrix):
    r"""KKT of :math:`\min v^\top(\hat G + \varepsilon I)v` s.t. :math:`v \ge u` give
    :math:`(G/\mathrm{tr}G + \varepsilon I) v \ge 0`, hence :math:`J A(J) \ge -\varepsilon\, \mathrm{tr}(G)\, w`
    elementwise (``w >= 0``): the ridge ``reg_eps`` is the only source of conflict."""
    aggregator = cls()
    reg_eps = aggregator.gramian_weighting.reg_eps
    weights = aggregator.weights(matrix)
    trace = (matrix**2).sum()
    assert (weights >= -1e-12).all()
    inner = matrix @ aggregator(matrix)
    assert (inner >= -reg_eps * trace * weights - 1e-9 * trace).all(), inner


@pytest.mark.parametrize("matrix", _dual_cone_matrices(), ids=lambda t: f"{t.shape[0]}x{t.shape[1]}")
def test_mgda_does_not_conflict(matrix):
    r"""When Frank–Wolfe stops because :math:`\gamma = \mathrm{gap}/\mathrm{curv} < \epsilon`, with
    :math:`\mathrm{curv} = \|J^\top(e_t-\alpha)\|^2 \le 4 \max_i \|g_i\|^2` and
    :math:`\min_i (G\alpha)_i = \alpha^\top G\alpha - \mathrm{gap}`, every
    :math:`g_i \cdot A(J) \ge -4 \epsilon \max_i \|g_i\|^2` (``max_iters`` large so that this is the stop)."""
    epsilon = 1e-3
    aggregator = MGDA(epsilon=epsilon, max_iters=100_000)
    inner = matrix @ aggregator(matrix)
    assert (inner >= -4 * epsilon * (matrix**2).sum(dim=1).max()).all(), inner


@pytest.mark.parametrize("name", DETERMINISTIC_NAMES)
@pytest.mark.parametrize(
    "matrix",
    [randn(30, 5, 7), randn(31, 7, 3), randn(32, 2, 4), torch.cat([randn(33, 3, 5)] * 2)],
    ids=["5x7", "7x3", "2x4", "duplicated_6x5"],
)
def test_permutation_invariance(name, matrix, build_aggregator):
    """Fresh instances for both calls: stateful aggregators (GradVac's targets, GradDrop's generator)
    must give the same first result whatever the order of the rows."""
    permutation = torch.randperm(matrix.shape[0], generator=torch.Generator().manual_seed(0))
    scale = matrix.norm()
    permuted = build_aggregator(name, matrix.shape[0])(matrix[permutation])
    assert_close(permuted, build_aggregator(name, matrix.shape[0])(matrix), rtol=1e-6, atol=1e-8 * scale)


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
@pytest.mark.parametrize("factor", [1e-2, 0.3, 7.0, 1e3, 1e6])
def test_dual_cone_aggregators_are_positively_homogeneous(cls, factor):
    """The Gramian is normalised by its trace, so A(cJ) = c A(J) while ||cJ||² exceeds norm_eps."""
    matrix = randn(40, 5, 7)
    aggregator = cls()
    assert (factor * matrix).pow(2).sum() > aggregator.gramian_weighting.norm_eps
    assert_close(aggregator(factor * matrix), factor * aggregator(matrix), rtol=1e-6, atol=0)


@pytest.mark.parametrize("seed", range(5))
def test_upgrad_is_linear_under_scaling(seed):
    """The paper's property (arXiv:2406.16232, Section 5): c -> A(diag(c) J) is linear on positive c, so
    A(diag(c1 + c2) J) = A(diag(c1) J) + A(diag(c2) J)."""
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    c1, c2 = torch.rand(2, 4, generator=generator, dtype=torch.float64) * 3 + 0.1
    aggregator = UPGrad(reg_eps=0.0)

    def scaled(c):
        return aggregator(c[:, None] * matrix)

    assert_close(scaled(c1 + c2), scaled(c1) + scaled(c2), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
def test_dual_cone_aggregators_treat_tiny_jacobians_as_zero(cls):
    """Below ``norm_eps`` (squared Frobenius norm) the Gramian counts as zero: weights = preferences."""
    matrix = 1e-4 * randn(40, 5, 7)
    assert matrix.pow(2).sum() < cls().gramian_weighting.norm_eps
    assert_close(cls().weights(matrix), torch.full((5,), 0.2, dtype=torch.float64))
    assert_close(
        cls(pref_vector=[1, 2, 3, 4, 5]).weights(matrix), torch.arange(1.0, 6.0, dtype=torch.float64)
    )


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
def test_dual_cone_aggregators_keep_non_conflicting_rows(cls):
    """When no two rows conflict, every projection is the identity: the result is the mean."""
    matrix = randn(41, 4, 6).abs()
    assert (matrix @ matrix.T >= 0).all()
    assert_close(cls().weights(matrix), torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
def test_preference_vector_from_json_list(cls):
    matrix = randn(42, 3, 5)
    from_list = cls(pref_vector=[1, 2, 3])
    from_tensor = cls(pref_vector=torch.tensor([1.0, 2.0, 3.0]))
    assert_close(from_list(matrix), from_tensor(matrix))
    # The preference vector scales the result: p = 2/m gives twice the default aggregation.
    assert_close(cls(pref_vector=[2 / 3] * 3)(matrix), 2 * cls()(matrix))


def test_single_row_is_returned_unchanged():
    row = randn(43, 1, 5)
    for aggregator in (UPGrad(), DualProj(), MGDA(), PCGrad(), IMTLG(), Mean(), Sum()):
        assert_close(aggregator(row), row[0], rtol=1e-6, atol=0, msg=repr(aggregator))


def test_mgda_keeps_uniform_weights_for_a_zero_gramian():
    assert_close(MGDAWeighting()(torch.zeros(4, 4)), torch.full((4,), 0.25))


def test_mgda_weights_lie_in_the_simplex():
    weights = MGDA().weights(randn(44, 6, 9))
    assert (weights >= 0).all()
    assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("kwargs", [{"epsilon": 0}, {"epsilon": -1.0}, {"max_iters": 0}, {"max_iters": 2.5}])
def test_mgda_rejects_invalid_arguments(kwargs):
    with pytest.raises(ValueError, match="MGDA"):
        MGDA(**kwargs)


def test_pcgrad_sums_rows_when_nothing_conflicts():
    matrix = randn(45, 4, 6).abs()
    assert_close(PCGrad()(matrix), matrix.sum(dim=0))


def test_pcgrad_with_two_conflicting_rows():
    g0 = randn(46, 5)
    g1 = randn(47, 5) - 2 * g0
    assert g0 @ g1 < 0
    projected_0 = g0 - (g0 @ g1) / (g1 @ g1) * g1
    projected_1 = g1 - (g0 @ g1) / (g0 @ g0) * g0
    assert abs(projected_0 @ g1) < 1e-12 and abs(projected_1 @ g0) < 1e-12
    assert_close(PCGrad()(torch.stack([g0, g1])), projected_0 + projected_1)


@pytest.mark.parametrize(
    "matrix",
    [
        randn(47, 2, 3),
        randn(48, 4, 7),
        randn(49, 6, 6),
        torch.cat([randn(50, 3, 5)] * 2),
        torch.cat([randn(51, 3, 5, dtype=torch.float32)] * 2 + [2 * randn(51, 1, 5, dtype=torch.float32)]),
    ],
    ids=["2x3", "4x7", "6x6", "duplicated_6x5", "duplicated_and_collinear_7x5_float32"],
)
def test_imtlg_projections_on_unit_gradients_are_equal(matrix):
    """IMTL-G's defining property: g_i · A(J) / ||g_i|| is the same for every objective (also for
    duplicated or collinear rows, where the pseudo-inverse must not invert round-off)."""
    rtol = 1e-8 if matrix.dtype == torch.float64 else 1e-4
    update = IMTLG()(matrix)
    projections = (matrix @ update) / matrix.norm(dim=1)
    assert_close(projections, projections.mean().expand_as(projections), rtol=rtol, atol=0)
    assert_close(IMTLG().weights(matrix).sum(), torch.tensor(1.0, dtype=matrix.dtype))


def test_imtlg_zero_gramian_gives_zero_weights():
    assert_close(IMTLG().weights(torch.zeros(3, 4)), torch.zeros(3))


def test_mean_sum_constant_weights():
    matrix = randn(51, 4, 3)
    assert_close(Mean().weights(matrix), torch.full((4,), 0.25, dtype=torch.float64))
    assert_close(Sum().weights(matrix), torch.ones(4, dtype=torch.float64))
    weights = [0.5, -1.0, 2.0, 0.0]
    assert_close(Constant(weights)(matrix), torch.tensor(weights, dtype=torch.float64) @ matrix)
    assert_close(Constant(torch.tensor(weights))(matrix), Constant(weights)(matrix))


def test_constant_rejects_wrong_length_and_bad_weights():
    with pytest.raises(ValueError, match="3 weights but there are 4 objectives"):
        Constant([1.0, 2.0, 3.0])(randn(52, 4, 3))
    for bad in ([[1.0, 2.0]], [1.0, float("nan")], ["a", "b"], "ab", [0.0, 0.0]):
        with pytest.raises(ValueError, match="Constant's weights"):
            Constant(bad)
    # No weights (accepted, as in TorchJD) fit only a Jacobian with no rows.
    assert_close(Constant([])(torch.zeros(0, 3)), torch.zeros(3))
    with pytest.raises(ValueError, match="Constant has 0 weights but there are 1 objectives"):
        Constant([])(torch.ones(1, 3))


@pytest.mark.parametrize(
    ("aggregator", "expected"),
    [
        (DualProj(), "DualProj(pref_vector=None, norm_eps=0.0001, reg_eps=0.0001, solver='auto')"),
        (
            DualProj(pref_vector=[1, 2], reg_eps=1e-6, solver="quadprog"),
            "DualProj(pref_vector=[1.0, 2.0], norm_eps=0.0001, reg_eps=1e-06, solver='quadprog')",
        ),
        (MGDA(), "MGDA(epsilon=0.001, max_iters=100)"),
        (PCGrad(), "PCGrad()"),
        (IMTLG(), "IMTLG()"),
        (Sum(), "Sum()"),
        (Constant([1, 0.5]), "Constant(weights=[1.0, 0.5])"),
        (Random(seed=3), "Random(seed=3)"),
    ],
)
def test_repr_is_concise_and_evaluable(aggregator, expected):
    assert repr(aggregator) == expected
    namespace = {cls.__name__: cls for cls in (DualProj, MGDA, PCGrad, IMTLG, Sum, Constant, Random)}
    assert repr(eval(expected, namespace)) == expected


MATRIX_WEIGHTINGS = ["mean", "sum", "constant", "random"]


@pytest.mark.parametrize("name", [name for name in GRAMIAN_NAMES if name not in MATRIX_WEIGHTINGS])
def test_weightings_reject_non_square_gramians(name, build_aggregator):
    aggregator = build_aggregator(name, 2)
    assert not aggregator.gramian_weighting.accepts_matrix
    with pytest.raises(ValueError, match="square Gramian"):
        aggregator.gramian_weighting(torch.ones(2, 3))


@pytest.mark.parametrize("name", MATRIX_WEIGHTINGS)
def test_weightings_of_the_number_of_rows_also_take_a_jacobian(name, build_aggregator):
    """Mean, Sum, Constant and Random read only ``m``: like TorchJD's ``Weighting[Matrix]`` they take a
    Jacobian ``[m, n]`` too, so ``WeightedAggregator(weighting)`` (weights from ``J`` itself) works."""
    aggregator = build_aggregator(name, 2)
    weighting = aggregator.gramian_weighting
    assert weighting.accepts_matrix
    matrix = randn(53, 2, 3)
    restart = getattr(weighting, "reset", lambda: None)  # Random: the same draws each time
    restart()
    from_gramian = weighting(matrix @ matrix.T)
    restart()
    assert_close(weighting(matrix), from_gramian)
    restart()
    expected = aggregator(matrix)
    restart()
    assert_close(WeightedAggregator(weighting)(matrix), expected)
    with pytest.raises(ValueError, match="shape"):
        weighting(torch.ones(2))


def test_constant_weighting_ignores_the_gramian():
    weighting = ConstantWeighting([3.0, 4.0])
    assert_close(weighting(torch.eye(2)), weighting(torch.zeros(2, 2)))


# Aggregators that need a minimum number of rows refuse a Jacobian without rows, with their own message.
NEEDS_ROWS = {"trimmed_mean": "needs more than 0 rows", "krum": "needs at least 1 rows"}


@pytest.mark.parametrize("name", ALL_NAMES)
def test_a_jacobian_without_rows_gives_the_zero_vector(name, build_aggregator):
    """No objective, no update (as in TorchJD): ``A(J)`` of a ``[0, n]`` Jacobian is ``0 ∈ Rⁿ``, and the
    weights of a Gramian-weighted aggregator are the empty vector; a stateful one keeps its state."""
    aggregator = build_aggregator(name, 0)
    empty = torch.zeros(0, 3, dtype=torch.float64)
    if name in NEEDS_ROWS:
        with pytest.raises(ValueError, match=NEEDS_ROWS[name]):
            aggregator(empty)
        return
    before = repr(dict(aggregator.state_dict()))
    result = aggregator(empty)
    assert result.shape == (3,) and result.dtype == torch.float64
    assert_close(result, torch.zeros(3, dtype=torch.float64))
    if isinstance(aggregator, GramianWeightedAggregator):
        assert aggregator.weights(empty).shape == (0,)
        assert aggregator.gramian_weighting(torch.zeros(0, 0)).shape == (0,)
    assert repr(dict(aggregator.state_dict())) == before


@pytest.mark.parametrize("name", ALL_NAMES)
def test_a_jacobian_without_columns_gives_the_empty_vector(name, build_aggregator):
    """No parameter: ``A(J)`` of a ``[m, 0]`` Jacobian is the empty vector (its Gramian is zero)."""
    aggregator = build_aggregator(name, 3)
    result = aggregator(torch.zeros(3, 0, dtype=torch.float64))
    assert result.shape == (0,) and result.dtype == torch.float64


def test_a_weighting_built_for_some_objectives_refuses_a_jacobian_without_rows():
    with pytest.raises(
        ValueError, match="ConstantWeighting is built for 2 objectives, but the input has none"
    ):
        Constant([1.0, 2.0])(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="UPGradWeighting is built for 2 objectives"):
        UPGrad(pref_vector=[1.0, 2.0])(torch.zeros(0, 3))
