"""TorchJD's API around the aggregators, as hf_jd serves it: attributes whose setters validate like the
constructors, the ``weighting`` / ``projector`` attributes, TorchJD's short names (``str``), weightings of
the number of rows that take a Jacobian, and results that are not differentiable.

These are hf_jd's own tests of what ``benchmarks/torchjd_conformance.py`` checks with TorchJD's tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from _aggregation_matrices import randn
from torch import Tensor
from torch.testing import assert_close

from hf_jd.aggregation import (
    CRMOGM,
    DBMTL,
    IMTL,
    IMTLG,
    MGDA,
    PCD,
    AlignedMTL,
    AlignedMTLWeighting,
    CAGrad,
    CAGradWeighting,
    ConFIG,
    Constant,
    ConstantWeighting,
    CRMOGMWeighting,
    DualProj,
    ExcessMTL,
    ExcessMTLWeighting,
    FairGrad,
    FairGradWeighting,
    GradDrop,
    GradNorm,
    GradVac,
    GradVacWeighting,
    GramianWeightedAggregator,
    Krum,
    KrumWeighting,
    Mean,
    MeanWeighting,
    MGDAWeighting,
    MoCo,
    MoDo,
    MoDoWeighting,
    NashMTL,
    NashMTLWeighting,
    PCGrad,
    Random,
    SDMGrad,
    SDMGradWeighting,
    Sum,
    SumWeighting,
    TrimmedMean,
    UPGrad,
    UPGradWeighting,
    WeightedAggregator,
)

# ------------------------------------------------------------------------- setters validate


# (build, attribute, rejected value, message): assigning the value raises like the constructor does.
INVALID_ASSIGNMENTS: list[tuple[Callable[[], Any], str, Any, str]] = [
    (UPGradWeighting, "pref_vector", [[1.0, 2.0]], "pref_vector"),
    (UPGradWeighting, "pref_vector", [-1.0, 2.0], "pref_vector must be non-negative"),
    (UPGradWeighting, "norm_eps", -1e-9, "norm_eps must be >= 0"),
    (UPGradWeighting, "reg_eps", float("nan"), "reg_eps must be a finite number"),
    (UPGradWeighting, "solver", "simplex", "solver"),
    (UPGradWeighting, "projector", object(), "projector must be TorchJD's QuadprogProjector"),
    (UPGrad, "pref_vector", [0.0, 0.0], "all zeros"),
    (UPGrad, "reg_eps", -1.0, "reg_eps"),
    (DualProj, "norm_eps", "0.1", "norm_eps must be a finite number"),
    (AlignedMTL, "scale_mode", "max", "scale_mode must be one of"),
    (AlignedMTLWeighting, "pref_vector", torch.ones(2, 2), "pref_vector"),
    (ConFIG, "pref_vector", [float("inf")], "pref_vector"),
    (CAGrad, "c", -1e-9, "c must be >= 0"),
    (CAGradWeighting, "norm_eps", 0.0, "norm_eps must be > 0"),
    (lambda: ConstantWeighting([1.0, 2.0]), "weights", [0.0, 0.0], "all zeros"),
    (lambda: CRMOGMWeighting(MeanWeighting()), "alpha", 1.1, "alpha must be in"),
    (ExcessMTLWeighting, "robust_step_size", 0.0, "robust_step_size must be > 0"),
    (ExcessMTL, "n_warmup_steps", -1, "n_warmup_steps must be >= 0"),
    (FairGrad, "alpha", 0.0, "alpha must be > 0"),
    (FairGradWeighting, "max_iters", 0, "max_iter must be >= 1"),
    (GradDrop, "leak", torch.ones(2, 2), "leak must be a 1-D list"),
    (GradDrop, "leak", [0.5, 2.0], "leak values must be in"),
    (GradDrop, "f", 3, "f must be a callable"),
    (GradVac, "beta", 1.1, "beta must be in"),
    (GradVacWeighting, "eps", -1e-9, "eps must be > 0"),
    (Krum, "n_byzantine", -1, "n_byzantine must be >= 0"),
    (KrumWeighting, "n_selected", 0, "n_selected must be >= 1"),
    (MGDA, "epsilon", 0.0, "epsilon must be > 0"),
    (MGDAWeighting, "max_iters", 0, "max_iters must be >= 1"),
    (MoDoWeighting, "gamma", 0.0, "gamma must be > 0"),
    (MoDo, "rho", -0.1, "rho must be >= 0"),
    (lambda: NashMTL(n_tasks=2), "n_tasks", 0, "n_tasks must be >= 1"),
    (lambda: NashMTLWeighting(n_tasks=2), "max_norm", -1e-9, "max_norm must be >= 0"),
    (lambda: NashMTL(n_tasks=2), "update_weights_every", 0, "update_weights_every must be >= 1"),
    (lambda: NashMTL(n_tasks=2), "optim_niter", 0, "optim_niter must be >= 1"),
    (SDMGradWeighting, "lr", 0.0, "lr must be > 0"),
    (SDMGradWeighting, "momentum", 1.0, "momentum must be < 1"),
    (SDMGradWeighting, "n_iter", 0, "n_iter must be >= 1"),
    (SDMGradWeighting, "lambda_", -0.1, "lambda_ must be >= 0"),
    (SDMGrad, "pref_vector", [[0.5, 0.5]], "pref_vector"),
    (TrimmedMean, "trim_number", -1, "trim_number must be >= 0"),
    (PCD, "beta", 1.0, "beta must be < 1"),
    (PCD, "tau", 1.5, "tau must be in"),
    (MoCo, "beta", 0.0, "beta must be > 0"),
    (DBMTL, "beta", 2.0, "beta must be in"),
    (IMTL, "lr", 0.0, "lr must be > 0"),
    (GradNorm, "alpha", -1.0, "alpha must be >= 0"),
    (CRMOGM, "alpha", -0.1, "alpha must be in"),
]


@pytest.mark.parametrize(
    ("build", "name", "value", "match"),
    INVALID_ASSIGNMENTS,
    ids=[f"{getattr(b, '__name__', 'built')}.{n}={v!r}"[:60] for b, n, v, _ in INVALID_ASSIGNMENTS],
)
def test_assigning_an_invalid_value_raises_like_the_constructor(build, name, value, match):
    obj = build()
    before = getattr(obj, name)
    with pytest.raises((ValueError, TypeError), match=match):  # TypeError: f is not a function
        setattr(obj, name, value)
    after = getattr(obj, name)
    assert after is before or (isinstance(after, Tensor) and torch.equal(after, before)), "unchanged"


# (build, attribute, value, what the getter then gives)
VALID_ASSIGNMENTS: list[tuple[Callable[[], Any], str, Any, Any]] = [
    (CAGrad, "c", 1.25, 1.25),
    (CAGrad, "norm_eps", 0.25, 0.25),
    (GradVac, "beta", 0.25, 0.25),
    (GradVac, "eps", 1e-6, 1e-6),
    (Krum, "n_byzantine", 3, 3),
    (Krum, "n_selected", 3, 3),
    (MGDA, "epsilon", 0.25, 0.25),
    (MGDA, "max_iters", 42, 42),
    (MoDo, "gamma", 0.1, 0.1),
    (FairGrad, "alpha", 2.0, 2.0),
    (FairGrad, "max_iters", 50, 50),
    (FairGrad, "max_iters", None, 100),
    (lambda: NashMTL(n_tasks=2), "n_tasks", 4, 4),
    (lambda: NashMTL(n_tasks=2), "max_norm", 2.5, 2.5),
    (AlignedMTL, "scale_mode", "rmse", "rmse"),
    (ExcessMTL, "robust_step_size", 0.5, 0.5),
    (SDMGrad, "lambda_", 0.6, 0.6),
    (SDMGrad, "n_iter", 5, 5),
    (UPGrad, "solver", "quadprog", "quadprog"),
    (UPGrad, "reg_eps", 1e-6, 1e-6),
]


@pytest.mark.parametrize(("build", "name", "value", "expected"), VALID_ASSIGNMENTS)
def test_an_aggregator_attribute_is_its_weighting_attribute(build, name, value, expected):
    """TorchJD's aggregators read and set their weighting's attributes; so do hf_jd's."""
    aggregator = build()
    setattr(aggregator, name, value)
    weighting = aggregator.gramian_weighting if isinstance(aggregator, GramianWeightedAggregator) else None
    weighting = weighting if weighting is not None else aggregator.weighting
    assert getattr(aggregator, name) == expected
    assert getattr(weighting, name) == expected


def test_an_assigned_hyper_parameter_is_used():
    matrix = randn(60, 3, 5)
    aggregator = CAGrad(c=0.5)
    aggregator.c = 2.0
    assert_close(aggregator(matrix), CAGrad(c=2.0)(matrix))
    aggregator = UPGrad()
    aggregator.pref_vector = [1.0, 2.0, 3.0]
    assert_close(aggregator(matrix), UPGrad(pref_vector=[1.0, 2.0, 3.0])(matrix))
    sdmgrad = SDMGrad()
    sdmgrad.lambda_, sdmgrad.n_iter = 0.7, 3
    assert (sdmgrad.gramian_weighting.lamda, sdmgrad.gramian_weighting.niter) == (0.7, 3)
    assert_close(sdmgrad(matrix), SDMGrad(lamda=0.7, niter=3)(matrix))


# ------------------------------------------------------------------- weighting and projector


@pytest.mark.parametrize(
    ("build", "default"),
    [(UPGrad, MeanWeighting), (DualProj, MeanWeighting), (AlignedMTL, MeanWeighting), (ConFIG, SumWeighting)],
)
def test_the_preference_weighting_mirrors_pref_vector(build, default):
    """``gramian_weighting.weighting`` is TorchJD's: ``ConstantWeighting`` of the very tensor assigned,
    or the default weighting when ``pref_vector`` is ``None``."""
    aggregator = build()
    assert aggregator.pref_vector is None and type(aggregator.gramian_weighting.weighting) is default
    preference = torch.tensor([1.0, 2.0, 3.0])
    aggregator.pref_vector = preference
    assert aggregator.pref_vector is preference
    assert isinstance(aggregator.gramian_weighting.weighting, ConstantWeighting)
    assert aggregator.gramian_weighting.weighting.weights is preference
    aggregator.pref_vector = [1, 2]  # a list from JSON becomes a float64 tensor
    assert aggregator.pref_vector.dtype == torch.float64 and aggregator.pref_vector.tolist() == [1.0, 2.0]
    aggregator.pref_vector = None
    assert type(aggregator.gramian_weighting.weighting) is default


def test_weighting_of_a_gramian_weighted_aggregator_maps_the_jacobian_to_the_weights():
    """``aggregator.weighting`` is ``J ↦ W(J Jᵀ)`` (TorchJD's ``gramian_weighting << compute_gramian``):
    ``.weighting.weighting`` is the Gramian weighting, other attributes are read from it, its hooks
    run when the aggregator does, and it adds no entry to the state (saved once)."""
    matrix = randn(61, 3, 4)
    aggregator = NashMTL(n_tasks=3)
    assert aggregator.weighting.weighting is aggregator.gramian_weighting
    assert aggregator.weighting is aggregator.weighting  # one object, so hooks stay on it
    assert aggregator.weighting.n_tasks == 3
    calls: list[str] = []
    aggregator.weighting.register_forward_hook(lambda *_: calls.append("outer"))
    aggregator.gramian_weighting.register_forward_hook(lambda *_: calls.append("inner"))
    aggregator(matrix)
    assert calls == ["inner", "outer"]
    assert not any(key.startswith("weighting") for key in aggregator.state_dict())
    assert_close(UPGrad().weighting(matrix), UPGrad().gramian_weighting(matrix @ matrix.T))


class _Projector:
    """Stands for TorchJD's ``QuadprogProjector`` (hf_jd reads its two attributes)."""

    def __init__(self, norm_eps: float, reg_eps: float) -> None:
        self.norm_eps, self.reg_eps = norm_eps, reg_eps

    def __repr__(self) -> str:
        return f"QuadprogProjector(norm_eps={self.norm_eps}, reg_eps={self.reg_eps})"


@pytest.mark.parametrize("cls", [UPGrad, DualProj])
def test_projector_attribute_sets_quadprog_and_its_settings(cls):
    aggregator = cls()
    assert aggregator.projector is None  # hf_jd's default: its own solver, no projector object
    projector = _Projector(norm_eps=0.001, reg_eps=0.01)
    aggregator.projector = projector
    assert aggregator.projector is projector and aggregator.gramian_weighting.projector is projector
    assert (aggregator.norm_eps, aggregator.reg_eps, aggregator.solver) == (0.001, 0.01, "quadprog")
    name = cls.__name__
    assert (
        repr(aggregator)
        == f"{name}(pref_vector=None, projector=QuadprogProjector(norm_eps=0.001, reg_eps=0.01))"
    )
    assert repr(cls(projector=projector)) == repr(aggregator)
    matrix = randn(62, 3, 5)
    assert_close(aggregator(matrix), cls(norm_eps=0.001, reg_eps=0.01, solver="quadprog")(matrix))
    aggregator.reg_eps = 0.02  # the settings are no longer the projector's
    assert aggregator.projector is None
    assert repr(aggregator) == f"{name}(pref_vector=None, norm_eps=0.001, reg_eps=0.02, solver='quadprog')"


def test_excess_mtl_attributes_are_its_weighting_attributes_and_eps_is_shown_only_when_set():
    aggregator = ExcessMTL(robust_step_size=2.0, n_warmup_steps=3)
    assert (aggregator.robust_step_size, aggregator.n_warmup_steps) == (2.0, 3)
    assert repr(aggregator) == "ExcessMTL(robust_step_size=2.0, n_warmup_steps=3)"
    assert (
        repr(ExcessMTLWeighting(eps=1e-5))
        == "ExcessMTLWeighting(robust_step_size=1.0, n_warmup_steps=0, eps=1e-05)"
    )


def test_pcd_tau_keeps_the_tensor_and_primary_is_shown_only_when_set():
    aggregator = PCD()
    tau = torch.tensor([0.1, 0.5])
    aggregator.tau = tau
    assert aggregator.tau is tau and aggregator.gramian_weighting.tau is tau
    with pytest.raises(ValueError, match="tau"):
        aggregator.tau = torch.tensor([0.1, float("nan")])
    with pytest.raises(ValueError, match="tau"):
        aggregator.tau = torch.tensor([[0.1, 0.2]])
    assert repr(PCD(tau=0.1, beta=0.9, eps=1e-6)) == "PCD(tau=0.1, beta=0.9, eps=1e-06)"
    assert repr(PCD(primary=2)) == "PCD(tau=0.02, beta=0.999, eps=1e-08, primary=2)"
    matrix = randn(66, 3, 5)
    assert_close(PCD(tau=torch.tensor([0.3, 0.3], dtype=torch.float32))(matrix), PCD(tau=0.3)(matrix))


def test_sdmgrad_repr_uses_torchjd_names_and_is_evaluable():
    weighting = SDMGradWeighting(lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3)
    expected = "SDMGradWeighting(lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3, pref_vector=None)"
    assert repr(weighting) == expected
    assert repr(eval(expected, {"SDMGradWeighting": SDMGradWeighting})) == expected
    assert repr(SDMGrad(niter=3)) == "SDMGrad(lr=5.0, momentum=0.5, n_iter=3, lambda_=0.3, pref_vector=None)"


# ------------------------------------------------------------------------ short names (str)


@pytest.mark.parametrize(
    ("aggregator", "expected"),
    [
        (AlignedMTL(), "AlignedMTL"),
        (AlignedMTL(pref_vector=[1.0, 2.0, 3.0]), "AlignedMTL([1., 2., 3.])"),
        (CAGrad(c=0.5), "CAGrad0.5"),
        (ConFIG(), "ConFIG"),
        (ConFIG(pref_vector=[1.0, 2.5]), "ConFIG([1., 2.5])"),
        (Constant([1.0, 2.0]), "Constant([1., 2.])"),
        (DualProj(), "DualProj"),
        (ExcessMTL(), "ExcessMTL"),
        (FairGrad(alpha=0.1), "0.1-FairGrad"),
        (GradDrop(), "GradDrop"),
        (GradDrop(leak=[0.0, 1.0]), "GradDrop([0., 1.])"),
        (GradVac(), "GradVac"),
        (IMTLG(), "IMTLG"),
        (Krum(n_byzantine=1, n_selected=2), "Krum1-2"),
        (Mean(), "Mean"),
        (MGDA(), "MGDA"),
        (NashMTL(n_tasks=2), "NashMTL"),
        (PCGrad(), "PCGrad"),
        (Random(), "Random"),
        (Sum(), "Sum"),
        (TrimmedMean(trim_number=2), "TM2"),
        (UPGrad(), "UPGrad"),
        (UPGrad(pref_vector=[0.25, 1.0]), "UPGrad([0.25, 1.])"),
    ],
    ids=lambda value: value if isinstance(value, str) else type(value).__name__,
)
def test_str_is_torchjd_short_name(aggregator, expected):
    assert str(aggregator) == expected


def test_repr_of_random_omits_an_unset_seed():
    assert repr(Random()) == "Random()" and repr(Random(seed=3)) == "Random(seed=3)"
    assert repr(Random().gramian_weighting) == "RandomWeighting()"


# ------------------------------------------------------ weightings of a Jacobian (matrix weightings)


def test_cr_mogm_wrapping_a_weighting_of_the_rows_takes_a_jacobian():
    """TorchJD's ``WeightedAggregator(CRMOGMWeighting(MeanWeighting()))``: weights from ``J`` itself."""
    aggregator = WeightedAggregator(CRMOGMWeighting(MeanWeighting()))
    matrix = randn(63, 4, 7)
    assert_close(aggregator(matrix), matrix.mean(dim=0))
    no_columns = WeightedAggregator(CRMOGMWeighting(MeanWeighting()))(torch.zeros(2, 0, dtype=torch.float64))
    assert no_columns.shape == (0,)
    with pytest.raises(ValueError, match="square Gramian"):
        CRMOGMWeighting(UPGradWeighting())(matrix)


def test_constant_keeps_the_tensor_it_is_given_and_accepts_an_empty_one():
    weights = torch.tensor([1.0, 2.0])
    assert Constant(weights).gramian_weighting.weights is weights
    empty = Constant(torch.ones(0))
    assert_close(empty(torch.ones(0, 5)), torch.zeros(5))
    with pytest.raises(ValueError, match="0 weights but there are 1 objectives"):
        empty(torch.ones(1, 5))
    with pytest.raises(ValueError, match="Constant's weights"):
        Constant(torch.ones(0, 0))


def test_graddrop_leak_keeps_the_tensor_and_accepts_none_and_empty():
    aggregator = GradDrop(leak=torch.tensor([0.0, 1.0]))
    leak = torch.tensor([0.0, 0.5, 1.0])
    aggregator.leak = leak
    assert aggregator.leak is leak
    aggregator.leak = None
    assert aggregator.leak is None
    empty = GradDrop(leak=torch.ones(0), seed=0)
    assert_close(empty(torch.ones(0, 5)), torch.zeros(5))
    with pytest.raises(ValueError, match="0 leak values but there are 1 objectives"):
        empty(torch.ones(1, 5))


# ----------------------------------------------------------------------------- differentiability

NON_DIFFERENTIABLE = [
    CAGrad(),
    ConFIG(),
    DualProj(),
    ExcessMTL(),
    FairGrad(),
    GradDrop(seed=0),
    GradVac(),
    IMTLG(),
    MoDo(),
    NashMTL(n_tasks=3),
    PCD(),
    PCGrad(),
    SDMGrad(),
    UPGrad(),
    IMTL(),
    GradNorm(),
    DBMTL(),
    MoCo(),
    CRMOGM(),
]


@pytest.mark.parametrize("aggregator", NON_DIFFERENTIABLE, ids=lambda a: type(a).__name__)
def test_methods_whose_weights_come_from_a_solver_or_a_state_build_no_graph(aggregator):
    """As in TorchJD: their weights are not a differentiable function of ``J`` as computed, so
    autograd would give a wrong derivative; the result does not require grad."""
    matrix = randn(64, 3, 5).requires_grad_()
    assert not aggregator(matrix).requires_grad
    if isinstance(aggregator, GramianWeightedAggregator):
        gramian = (matrix @ matrix.T).detach().requires_grad_()
        assert not aggregator.gramian_weighting(gramian).requires_grad


@pytest.mark.parametrize(
    "aggregator",
    [
        Mean(),
        Sum(),
        Constant([1.0, 2.0, 3.0]),
        Random(seed=0),
        MGDA(),
        Krum(n_byzantine=0),
        AlignedMTL(),
        TrimmedMean(trim_number=1),
    ],
    ids=lambda a: type(a).__name__,
)
def test_the_other_methods_stay_differentiable(aggregator):
    matrix = randn(65, 3, 5).requires_grad_()
    result = aggregator(matrix)
    assert result.requires_grad
    if isinstance(aggregator, Mean):
        (gradient,) = torch.autograd.grad(result.sum(), matrix)
        assert_close(gradient, torch.full_like(matrix, 1 / 3))
