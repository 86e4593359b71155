"""Comparison with TorchJD's aggregators of the same name (test-only reference, skipped when absent)."""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types

import numpy as np
import pytest
import quadprog
import torch
from _aggregation_matrices import ill_conditioned, randn
from torch import Tensor
from torch.testing import assert_close

from hf_jd.aggregation import (
    CRMOGM,
    IMTLG,
    MGDA,
    PCD,
    AlignedMTL,
    CAGrad,
    ConFIG,
    Constant,
    CRMOGMWeighting,
    DualProj,
    ExcessMTL,
    FairGradWeighting,
    GradDrop,
    GradVacWeighting,
    KrumWeighting,
    Mean,
    MoDoWeighting,
    NashMTL,
    PCGrad,
    Random,
    SDMGradWeighting,
    Sum,
    TrimmedMean,
    UPGrad,
    UPGradWeighting,
)

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")


RANDOM_MATRICES = [randn(seed, m, n) for seed, (m, n) in enumerate([(2, 3), (3, 5), (4, 4), (5, 9), (8, 16)])]
RANK_DEFICIENT = [randn(10, 7, 4), randn(11, 6, 2) @ randn(12, 2, 8), torch.cat([randn(13, 3, 5)] * 2)]
IDS = [f"{t.shape[0]}x{t.shape[1]}" for t in RANDOM_MATRICES]


@pytest.fixture
def torchjd_projector(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make TorchJD's default ``QuadprogProjector`` usable.

    It solves its QP with ``qpsolvers.solve_qp(..., solver="quadprog")``. Where qpsolvers is not
    installed, a stand-in ``solve_qp`` forwards the same problem (min ½xᵀPx + qᵀx s.t. Gx <= h) to
    quadprog, so that TorchJD's own normalisation, ridge and constraint formulation are what we
    compare against.
    """
    try:
        import qpsolvers  # noqa: F401
    except ImportError:

        def solve_qp(P, q, G, h, solver=None):
            assert solver == "quadprog"
            return quadprog.solve_qp(np.ascontiguousarray(P), -q, np.ascontiguousarray(-G.T), -h, 0)[0]

        module = types.ModuleType("qpsolvers")
        module.__spec__ = importlib.machinery.ModuleSpec("qpsolvers", None)
        module.solve_qp = solve_qp
        monkeypatch.setitem(sys.modules, "qpsolvers", module)
        monkeypatch.setattr(
            importlib.import_module("torchjd._linalg._dual_cone"), "solve_qp", solve_qp, raising=False
        )


@pytest.mark.usefixtures("torchjd_projector")
@pytest.mark.parametrize("matrix", RANDOM_MATRICES + RANK_DEFICIENT)
@pytest.mark.parametrize("name", ["UPGrad", "DualProj"])
def test_dual_cone_aggregators_match_torchjd(name, matrix):
    ours = {"UPGrad": UPGrad, "DualProj": DualProj}[name]
    theirs = getattr(torchjd_aggregation, name)
    m = matrix.shape[0]
    pref = torch.linspace(0.5, 2.0, m, dtype=torch.float64)
    for kwargs_ours, kwargs_theirs in [({}, {}), ({"pref_vector": pref.tolist()}, {"pref_vector": pref})]:
        expected = theirs(**kwargs_theirs)(matrix)
        assert_close(ours(**kwargs_ours)(matrix), expected, rtol=1e-5, atol=1e-7 * matrix.abs().max())


@pytest.mark.parametrize("matrix", RANDOM_MATRICES, ids=IDS)
def test_mgda_matches_torchjd(matrix):
    for epsilon, max_iters in [(0.001, 100), (1e-5, 1000)]:
        expected = torchjd_aggregation.MGDA(epsilon=epsilon, max_iters=max_iters)(matrix)
        assert_close(MGDA(epsilon=epsilon, max_iters=max_iters)(matrix), expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("matrix", RANDOM_MATRICES, ids=IDS)
def test_imtlg_matches_torchjd(matrix):
    assert_close(IMTLG()(matrix), torchjd_aggregation.IMTLG()(matrix), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("matrix", RANDOM_MATRICES + RANK_DEFICIENT)
def test_pcgrad_matches_torchjd_when_it_draws_our_order(matrix, monkeypatch):
    """TorchJD draws one ``torch.randperm`` per row ``i`` (in order of ``i``); feed it our
    deterministic order (increasing cosine similarity with ``g_i``) and the results must agree."""
    gramian = matrix @ matrix.T
    norms = gramian.diagonal().sqrt()
    orders = iter([torch.argsort(gramian[i] / norms, stable=True) for i in range(matrix.shape[0])])
    monkeypatch.setattr(torch, "randperm", lambda n, *args, **kwargs: next(orders))
    expected = torchjd_aggregation.PCGrad()(matrix)
    monkeypatch.undo()
    assert_close(PCGrad()(matrix), expected, rtol=1e-8, atol=1e-10 * matrix.abs().max())


@pytest.mark.parametrize("matrix", [t.float() for t in RANDOM_MATRICES[:2]], ids=IDS[:2])
def test_pcgrad_with_two_rows_matches_torchjd_for_any_order(matrix):
    assert_close(PCGrad()(matrix[:2]), torchjd_aggregation.PCGrad()(matrix[:2]))


@pytest.mark.parametrize("matrix", RANDOM_MATRICES, ids=IDS)
def test_simple_weightings_match_torchjd(matrix):
    weights = torch.arange(1.0, matrix.shape[0] + 1, dtype=torch.float64)
    assert_close(Mean()(matrix), torchjd_aggregation.Mean()(matrix))
    assert_close(Sum()(matrix), torchjd_aggregation.Sum()(matrix))
    assert_close(Constant(weights.tolist())(matrix), torchjd_aggregation.Constant(weights)(matrix))


@pytest.mark.parametrize("matrix", RANDOM_MATRICES + RANK_DEFICIENT[2:])
def test_config_matches_torchjd(matrix):
    pref = torch.linspace(0.5, 2.0, matrix.shape[0], dtype=torch.float64)
    scale = matrix.abs().max()
    assert_close(ConFIG()(matrix), torchjd_aggregation.ConFIG()(matrix), rtol=1e-6, atol=1e-8 * scale)
    expected = torchjd_aggregation.ConFIG(pref_vector=pref)(matrix)
    assert_close(ConFIG(pref_vector=pref.tolist())(matrix), expected, rtol=1e-6, atol=1e-8 * scale)


@pytest.mark.parametrize("matrix", RANDOM_MATRICES, ids=IDS)
def test_aligned_mtl_matches_torchjd(matrix):
    assert_close(AlignedMTL()(matrix), torchjd_aggregation.AlignedMTL()(matrix), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize(("m", "n"), [(3, 6), (4, 10), (8, 32), (16, 64)])
def test_aligned_mtl_matches_torchjd_on_ill_conditioned_float32_gramians(m, n):
    """Condition number 1e5 in float32: both keep every eigenvalue (rank tolerance ``λ_max · m · eps``).
    TorchJD's eigendecomposition runs in float32, ours in float64: they agree to float32's accuracy on
    the smallest eigenvalue (measured: 1e-3 relative at most)."""
    matrix = ill_conditioned(m, m, n, 1e5, dtype=torch.float32)
    expected = torchjd_aggregation.AlignedMTL()(matrix)
    assert_close(AlignedMTL()(matrix), expected, rtol=5e-3, atol=5e-3 * expected.norm().item() / n**0.5)


@pytest.mark.parametrize(("m", "n"), [(3, 6), (4, 10), (8, 32)])
@pytest.mark.parametrize("name", ["IMTLG", "ConFIG"])
def test_pseudo_inverses_match_torchjd_on_ill_conditioned_float32_gramians(name, m, n):
    """Condition number 1e5 in float32: both pseudo-invert with the tolerance ``m · eps · σ_max``; ours
    works on the Gramian in float64, TorchJD's in float32 (measured: 3e-4 relative at most)."""
    matrix = ill_conditioned(m, m, n, 1e5, dtype=torch.float32)
    ours = {"IMTLG": IMTLG, "ConFIG": ConFIG}[name]()
    expected = getattr(torchjd_aggregation, name)()(matrix)
    assert_close(ours(matrix), expected, rtol=2e-3, atol=2e-3 * expected.norm().item() / n**0.5)


@pytest.mark.parametrize("matrix", RANDOM_MATRICES, ids=IDS)
def test_graddrop_matches_torchjd_with_the_same_draws(matrix, monkeypatch):
    ours = GradDrop(seed=3)
    expected_draws = torch.rand(
        matrix.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    result = ours(matrix)
    monkeypatch.setattr(
        torch, "rand", lambda *args, **kwargs: expected_draws.to(kwargs.get("dtype", torch.float64))
    )
    assert_close(result, torchjd_aggregation.GradDrop()(matrix))


def _optional_torchjd(name: str, **kwargs):
    """TorchJD's aggregators with optional dependencies (cvxpy, clarabel, ecos), or a skip."""
    try:
        return getattr(torchjd_aggregation, name)(**kwargs)
    except (AttributeError, ImportError) as error:
        pytest.skip(f"torchjd's {name} is not usable here: {error}")


@pytest.mark.parametrize("matrix", RANDOM_MATRICES, ids=IDS)
def test_cagrad_matches_torchjd(matrix):
    """TorchJD solves the dual with cvxpy/CLARABEL (optional dependency): agreement to its tolerance."""
    theirs = _optional_torchjd("CAGrad", c=0.5)
    for c in (0.1, 0.5, 1.0):
        expected = type(theirs)(c=c)(matrix)
        assert_close(CAGrad(c=c)(matrix), expected, rtol=1e-4, atol=1e-6 * matrix.abs().max())


@pytest.mark.parametrize("matrix", RANDOM_MATRICES[:3], ids=IDS[:3])
def test_nash_mtl_matches_torchjd_to_its_stopping_tolerance(matrix):
    """TorchJD stops its convex iterations at ||Gα - 1/α|| < 1e-3; ours solves the system exactly."""
    m = matrix.shape[0]
    expected = _optional_torchjd("NashMTL", n_tasks=m)(matrix)
    assert_close(NashMTL(n_tasks=m)(matrix), expected, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("matrix", RANDOM_MATRICES[:3], ids=IDS[:3])
def test_cr_mogm_matches_torchjd(matrix):
    """Both start the average at the first weights (λ₀ = λ̂₁) and follow λ_k = α λ_{k-1} + (1-α) λ̂_k."""
    try:
        theirs = torchjd_aggregation.GramianWeightedAggregator(
            torchjd_aggregation.CRMOGMWeighting(torchjd_aggregation.MGDAWeighting(), alpha=0.9)
        )
    except (AttributeError, TypeError) as error:
        pytest.skip(f"this torchjd has no CRMOGMWeighting: {error}")
    ours = CRMOGM(alpha=0.9)
    generator = torch.Generator().manual_seed(matrix.shape[0])
    for _ in range(4):  # other matrices at each call: the MGDA weights move, the averages must agree
        matrix_t = matrix + 0.5 * torch.randn(matrix.shape, generator=generator, dtype=matrix.dtype)
        assert_close(theirs(matrix_t), ours(matrix_t), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("matrix", RANDOM_MATRICES + RANK_DEFICIENT)
@pytest.mark.parametrize(("tau", "beta"), [(0.02, 0.999), (0.0, 0.0), (0.5, 0.9), (1.0, 0.5)])
def test_pcd_matches_torchjd_over_a_sequence_of_calls(matrix, tau, beta):
    """Same problem solved exactly by two active-set implementations, and the same moving average of
    the squared norms: agreement to round-off (1e-9 relative) at every call of a sequence."""
    theirs, ours = torchjd_aggregation.PCD(tau=tau, beta=beta), PCD(tau=tau, beta=beta)
    generator = torch.Generator().manual_seed(matrix.shape[0])
    for _ in range(4):  # rows rescaled differently at each call: the moving averages must agree
        scales = torch.rand(matrix.shape[0], 1, generator=generator, dtype=matrix.dtype) * 10
        matrix_t = scales * (
            matrix + 0.3 * torch.randn(matrix.shape, generator=generator, dtype=matrix.dtype)
        )
        expected = theirs(matrix_t)
        assert_close(ours(matrix_t), expected, rtol=1e-9, atol=1e-12 * matrix_t.abs().max())


def test_pcd_matches_torchjd_with_a_tau_vector_and_in_edge_cases():
    matrix = randn(30, 4, 6)
    tau = torch.tensor([0.1, 0.4, 0.0], dtype=torch.float64)
    assert_close(
        PCD(tau=tau.tolist())(matrix), torchjd_aggregation.PCD(tau=tau)(matrix), rtol=1e-9, atol=1e-12
    )
    opposite = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    zero_primary = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    for edge in (opposite, zero_primary, torch.cat([randn(31, 3, 5)] * 2)):
        assert_close(PCD(tau=0.5)(edge), torchjd_aggregation.PCD(tau=0.5)(edge), rtol=1e-9, atol=1e-12)


def _moving(matrix: Tensor, calls: int = 4) -> list[Tensor]:
    """A sequence of matrices around ``matrix`` (different rows scaled differently at each call), to
    compare the state recursions of the stateful methods."""
    generator = torch.Generator().manual_seed(matrix.shape[0] + matrix.shape[1])
    out = []
    for _ in range(calls):
        scales = 0.5 + torch.rand(matrix.shape[0], 1, generator=generator, dtype=matrix.dtype)
        out.append(
            scales * (matrix + 0.3 * torch.randn(matrix.shape, generator=generator, dtype=matrix.dtype))
        )
    return out


@pytest.mark.parametrize("matrix", RANDOM_MATRICES, ids=IDS)
@pytest.mark.parametrize("n_warmup_steps", [0, 2])
def test_excess_mtl_matches_torchjd_over_a_sequence_of_calls(matrix, n_warmup_steps):
    """Same recursion; TorchJD divides by e⁽⁰⁾ + 1e-7, hf_jd by e⁽⁰⁾ exactly (scale-free). Here
    e⁽⁰⁾ >= 1.3 and e/e⁽⁰⁾ <= ~10, so each step moves the two log-weights apart by < 1e-6 (step 1);
    after five steps the updates differ by < 5e-6 relative: rtol 2e-5."""
    for step in (0.1, 1.0):
        theirs = torchjd_aggregation.ExcessMTL(robust_step_size=step, n_warmup_steps=n_warmup_steps)
        ours = ExcessMTL(robust_step_size=step, n_warmup_steps=n_warmup_steps)
        for matrix_t in _moving(matrix, 5):
            assert_close(ours(matrix_t), theirs(matrix_t), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("matrix", RANDOM_MATRICES + RANK_DEFICIENT[:1])
def test_fairgrad_matches_torchjd_to_its_solver_tolerance(matrix):
    """Both solve G w = w^(-1/α); TorchJD stops scipy's least_squares at its default tolerances
    (ftol = xtol = gtol = 1e-8), hf_jd's Newton method at 1e-12: agreement to 1e-4 relative."""
    gramian = matrix @ matrix.T
    for alpha in (0.5, 1.0, 2.0):
        expected = _optional_torchjd("FairGradWeighting", alpha=alpha)(gramian)
        assert_close(
            FairGradWeighting(alpha=alpha)(gramian), expected, rtol=1e-4, atol=1e-6 * expected.abs().max()
        )


def _replay(draws: list[Tensor]):
    iterator = iter(draws)
    return lambda n, *args, **kwargs: next(iterator)


@pytest.mark.parametrize("matrix", RANDOM_MATRICES, ids=IDS)
def test_gradvac_matches_torchjd_when_it_draws_our_order(matrix, monkeypatch):
    """TorchJD visits the other rows in a random order (one ``torch.randperm`` per row); feed it ours
    (increasing cosine similarity with g_i) and the targets and weights agree over a sequence of calls.
    TorchJD adds eps to two denominators, hf_jd floors √(1-φ̂²) at eps: 1e-8 absolute, hence 1e-7."""
    theirs, ours = torchjd_aggregation.GradVacWeighting(beta=0.3), GradVacWeighting(beta=0.3)
    for matrix_t in _moving(matrix):
        gramian = matrix_t @ matrix_t.T
        norms = gramian.diagonal().sqrt()
        orders = []
        for i in range(gramian.shape[0]):
            others = [j for j in range(gramian.shape[0]) if j != i]
            order = [int(j) for j in torch.argsort(gramian[i] / norms, stable=True) if j != i]
            orders.append(torch.tensor([others.index(j) for j in order]))
        monkeypatch.setattr(torch, "randperm", _replay(orders))
        expected = theirs(gramian)
        monkeypatch.undo()
        assert_close(ours(gramian), expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("matrix", RANDOM_MATRICES[3:], ids=IDS[3:])  # k = m - 3 >= 2: no ties
def test_krum_matches_torchjd_with_the_papers_squared_distances(matrix, monkeypatch):
    """Krum's score is a sum of *squared* distances (Blanchard et al. 2017, hf_jd); TorchJD sums the
    distances. With its square root made the identity, TorchJD computes the paper's score and selects
    the same rows (no ties on random inputs)."""
    gramian = matrix @ matrix.T
    for n_selected in (1, 2):
        monkeypatch.setattr(torch, "sqrt", lambda x: x)
        expected = torchjd_aggregation.KrumWeighting(n_byzantine=1, n_selected=n_selected)(gramian)
        monkeypatch.undo()
        assert_close(KrumWeighting(n_byzantine=1, n_selected=n_selected)(gramian), expected)


@pytest.mark.parametrize(
    "matrix", RANDOM_MATRICES[1:] + RANK_DEFICIENT, ids=lambda t: "x".join(map(str, t.shape))
)
def test_trimmed_mean_matches_torchjd(matrix):
    trims = range(0, (matrix.shape[0] - 1) // 2 + 1)
    for trim_number in trims:
        expected = torchjd_aggregation.TrimmedMean(trim_number=trim_number)(matrix)
        assert_close(TrimmedMean(trim_number=trim_number)(matrix), expected)


@pytest.mark.parametrize("matrix", RANDOM_MATRICES, ids=IDS)
def test_random_matches_torchjd_with_the_same_seed(matrix):
    """TorchJD draws from the global generator, hf_jd from its own seeded one: seeded alike, they draw
    the same numbers at every call (float64)."""
    ours = Random(seed=11)
    torch.manual_seed(11)
    expected = [torchjd_aggregation.Random()(matrix) for _ in range(3)]
    for e in expected:
        assert_close(ours(matrix), e)


@pytest.mark.parametrize("matrix", RANDOM_MATRICES, ids=IDS)
def test_modo_matches_torchjd_over_a_sequence_of_calls(matrix):
    """Same projected step on λ; also with a non-symmetric J₁J₂ᵀ (TorchJD's double sampling)."""
    theirs, ours = torchjd_aggregation.MoDoWeighting(gamma=0.05, rho=0.1), MoDoWeighting(gamma=0.05, rho=0.1)
    sequence = _moving(matrix)
    for first, second in zip(sequence, sequence[1:] + sequence[:1]):
        for stat in (first @ first.T, first @ second.T):
            assert_close(ours(stat), theirs(stat), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("matrix", RANDOM_MATRICES, ids=IDS)
def test_sdmgrad_matches_torchjd_over_a_sequence_of_calls(matrix):
    """Same warm-started inner loop; TorchJD divides by s² + 1e-8, hf_jd by s² exactly (s the mean row
    norm, of order 1 here): ~1e-8 relative. With a contracting step (lr = 0.2) that stays ~1e-8 over the
    sequence; at the default lr (5 or 10, beyond 2/λ_max of the normalised G) the inner loop amplifies
    any such difference, so the default cannot be compared to round-off."""
    pref = torch.linspace(1.0, 2.0, matrix.shape[0], dtype=torch.float64)
    for kwargs in ({}, {"pref_vector": pref / pref.sum()}):
        theirs = torchjd_aggregation.SDMGradWeighting(lr=0.2, **kwargs)
        ours = SDMGradWeighting(lr=0.2, **kwargs)
        sequence = _moving(matrix)
        for first, second in zip(sequence, sequence[1:] + sequence[:1]):
            for stat in (first @ first.T, first @ second.T):
                assert_close(ours(stat), theirs(stat), rtol=1e-6, atol=1e-9)


@pytest.mark.usefixtures("torchjd_projector")
@pytest.mark.parametrize("matrix", RANDOM_MATRICES[:3], ids=IDS[:3])
def test_cr_mogm_with_initial_weights_matches_torchjd(matrix):
    m = matrix.shape[0]
    initial = torch.linspace(0.1, 1.0, m, dtype=torch.float64)
    for alpha in (0.5, 1.0):
        theirs = torchjd_aggregation.CRMOGMWeighting(
            torchjd_aggregation.UPGradWeighting(), alpha=alpha, initial_weights=initial
        )
        ours = CRMOGMWeighting(UPGradWeighting(), alpha=alpha, initial_weights=initial)
        for matrix_t in _moving(matrix):
            gramian = matrix_t @ matrix_t.T
            assert_close(ours(gramian), theirs(gramian), rtol=1e-5, atol=1e-8)


# Values for TorchJD's required arguments (those without a default).
_REQUIRED = {
    "c": 0.5,
    "weights": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
    "n_byzantine": 1,
    "trim_number": 1,
    "alpha": 1.0,
    "n_tasks": 3,
}
_BASES = {"Aggregator", "Weighting", "WeightedAggregator", "GramianWeightedAggregator"}


def _shared_names() -> list[str]:
    import hf_jd.aggregation as ours

    return sorted(set(torchjd_aggregation.__all__) & set(ours.__all__) - _BASES)


@pytest.mark.parametrize("name", _shared_names())
def test_every_shared_class_takes_torchjds_keyword_arguments(name):
    """Changing only the import works: every parameter of the TorchJD class exists in hf_jd's, and hf_jd
    builds the class from TorchJD's defaults (plus a value for each required one) passed by keyword."""
    import inspect

    import hf_jd.aggregation as ours

    theirs_cls, ours_cls = getattr(torchjd_aggregation, name), getattr(ours, name)
    theirs_params = list(inspect.signature(theirs_cls.__init__).parameters.values())[1:]
    ours_params = inspect.signature(ours_cls.__init__).parameters
    missing = [p.name for p in theirs_params if p.name not in ours_params]
    assert not missing, f"hf_jd's {name} lacks TorchJD's arguments {missing}"
    kwargs = {}
    for parameter in theirs_params:
        if parameter.name == "weighting":  # CRMOGMWeighting wraps a weighting of the same library
            kwargs["weighting"] = ours.MGDAWeighting()
        elif parameter.default is inspect.Parameter.empty:
            kwargs[parameter.name] = _REQUIRED[parameter.name]
        else:
            kwargs[parameter.name] = parameter.default
    ours_cls(**kwargs)


def test_weighted_aggregator_and_generics_as_in_torchjd():
    import hf_jd.aggregation as ours

    matrix = randn(40, 3, 5)
    assert ours.Weighting[Tensor] is not None  # annotations such as Weighting[Matrix] are accepted
    aggregator = ours.WeightedAggregator(ours.ExcessMTLWeighting())
    expected = torchjd_aggregation.WeightedAggregator(torchjd_aggregation.ExcessMTLWeighting())(matrix)
    assert_close(aggregator(matrix), expected)
    assert isinstance(ours.PCD(), ours.Stateful) and isinstance(ours.GradVac(), ours.Stateful)


@pytest.mark.usefixtures("torchjd_projector")
def test_dual_cone_projector_argument_as_in_torchjd():
    projector_cls = importlib.import_module("torchjd._linalg").QuadprogProjector
    matrix = randn(41, 4, 6)
    for norm_eps, reg_eps in [(1e-4, 1e-4), (1e-6, 1e-3)]:
        projector = projector_cls(norm_eps=norm_eps, reg_eps=reg_eps)
        for name in ("UPGrad", "DualProj"):
            ours = {"UPGrad": UPGrad, "DualProj": DualProj}[name](projector=projector)
            assert ours.gramian_weighting.solver == "quadprog" and ours.gramian_weighting.reg_eps == reg_eps
            expected = getattr(torchjd_aggregation, name)(projector=projector)(matrix)
            assert_close(ours(matrix), expected, rtol=1e-6, atol=1e-9)
    with pytest.raises(TypeError, match="projector must be TorchJD's QuadprogProjector"):
        UPGrad(projector=object())
