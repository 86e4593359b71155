"""Every scalarizer's value and gradient against a brute-force formula written here, in plain Python."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from hf_jd.scalarization import (
    COSMOS,
    DWA,
    FAMO,
    IMTLL,
    PBI,
    STCH,
    Constant,
    GeometricMean,
    Mean,
    Random,
    Sum,
    UncertaintyWeighting,
)

LOSSES = [0.7, 2.5, 1.3, 0.2]


def _value_and_grad(scalarizer, values=LOSSES, dtype=torch.float64):
    losses = torch.tensor(values, dtype=dtype, requires_grad=True)
    out = scalarizer(losses)
    assert out.dim() == 0
    (grad,) = torch.autograd.grad(out, losses)
    return out.item(), grad.tolist()


def _numeric_grad(f, values, h=1e-6):
    grads = []
    for i in range(len(values)):
        up, down = list(values), list(values)
        up[i] += h
        down[i] -= h
        grads.append((f(up) - f(down)) / (2 * h))
    return grads


def _check(scalarizer, formula, values=LOSSES, rtol=1e-9):
    value, grad = _value_and_grad(scalarizer, values)
    assert math.isclose(value, formula(values), rel_tol=rtol, abs_tol=1e-12)
    for got, want in zip(grad, _numeric_grad(formula, values)):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-7), (grad, _numeric_grad(formula, values))


def test_mean_sum_constant():
    _check(Mean(), lambda v: sum(v) / len(v))
    _check(Sum(), lambda v: sum(v))
    weights = [0.5, -1.0, 2.0, 3.0]
    _check(Constant(weights), lambda v: sum(w * x for w, x in zip(weights, v)))


def test_geometric_mean():
    _check(GeometricMean(), lambda v: math.prod(v) ** (1 / len(v)))


def test_geometric_mean_of_many_tiny_losses_does_not_underflow():
    losses = torch.full((400,), 1e-3)
    assert_close(GeometricMean()(losses), torch.tensor(1e-3))


@pytest.mark.parametrize("mu", [0.05, 1.0, 7.0])
def test_stch(mu):
    pref, ref = [0.1, 0.2, 0.3, 0.4], [0.1, 0.0, -0.2, 0.05]

    def formula(v):
        return mu * math.log(sum(math.exp(p * (x - z) / mu) for p, x, z in zip(pref, v, ref)))

    _check(STCH(mu, weights=pref, reference=ref), formula)
    _check(STCH(mu), lambda v: mu * math.log(sum(math.exp(x / len(v) / mu) for x in v)))


def test_stch_with_a_tiny_mu_is_the_weighted_maximum_and_finite():
    losses = torch.tensor([1000.0, 2000.0, 500.0])
    value = STCH(1e-4)(losses)
    assert torch.isfinite(value)
    assert_close(value, torch.tensor(2000.0 / 3), rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("theta", [0.0, 5.0])
def test_pbi(theta):
    pref, ref = [1.0, 2.0, 0.5, 1.5], [0.1, 0.1, 0.0, 0.05]

    def formula(v):
        norm = math.sqrt(sum(p * p for p in pref))
        unit = [p / norm for p in pref]
        f = [x - z for x, z in zip(v, ref)]
        d1 = sum(a * b for a, b in zip(f, unit))
        d2 = math.sqrt(sum((a - d1 * u) ** 2 for a, u in zip(f, unit)))
        return d1 + theta * d2

    _check(PBI(theta, weights=pref, reference=ref), formula)


def test_pbi_default_is_theta_5_along_the_diagonal_with_a_finite_gradient_on_it():
    v = [1.0, 2.0]
    d1 = (v[0] + v[1]) / math.sqrt(2)
    d2 = abs(v[0] - v[1]) / math.sqrt(2)
    assert math.isclose(_value_and_grad(PBI(), v)[0], d1 + 5 * d2, rel_tol=1e-12)
    value, grad = _value_and_grad(PBI(), [1.5, 1.5])  # on the preference direction: d2 = 0 exactly
    assert math.isclose(value, 3 / math.sqrt(2), rel_tol=1e-12)
    assert all(math.isfinite(g) for g in grad)


@pytest.mark.parametrize("lam", [0.0, 0.5, 8.0])
def test_cosmos(lam):
    pref = [0.4, 0.1, 0.3, 0.2]

    def formula(v):
        dot = sum(r * x for r, x in zip(pref, v))
        norms = math.sqrt(sum(r * r for r in pref)) * math.sqrt(sum(x * x for x in v))
        return dot - lam * dot / norms

    _check(COSMOS(lam, weights=pref), formula)
    _check(
        COSMOS(lam),
        lambda v: sum(v) / len(v) - lam * (sum(v) / len(v)) / (0.5 * math.sqrt(sum(x * x for x in v))),
    )


def test_uncertainty_weighting_and_imtl_l_with_set_parameters():
    s = [0.3, -1.2, 0.0, 2.0]
    uw, imtl = UncertaintyWeighting(4), IMTLL([4])
    with torch.no_grad():
        uw.log_var.copy_(torch.tensor(s))
        imtl.log_scale.copy_(torch.tensor(s))
    # the parameters are float32: compare at float32 precision
    _check(uw, lambda v: sum(0.5 * math.exp(-a) * x + 0.5 * a for a, x in zip(s, v)), rtol=1e-6)
    _check(imtl, lambda v: sum(math.exp(a) * x - a for a, x in zip(s, v)), rtol=1e-6)


def test_famo_value_and_convex_gradient():
    famo = FAMO(4, min_losses=[0.1, 0.0, 0.0, 0.1])
    with torch.no_grad():
        famo.logits.copy_(torch.tensor([0.5, -0.3, 0.0, 1.0]))
    z = [math.exp(a) for a in (0.5, -0.3, 0.0, 1.0)]
    z = [a / sum(z) for a in z]
    b, eps = [0.1, 0.0, 0.0, 0.1], 1e-8
    d = [x - lo + eps for x, lo in zip(LOSSES, b)]
    c = sum(zi / di for zi, di in zip(z, d))
    value, grad = _value_and_grad(famo)
    assert math.isclose(value, sum(zi * math.log(di) for zi, di in zip(z, d)) / c, rel_tol=1e-6)
    # c carries no gradient: d value / d L_i = z_i / (c d_i), a convex combination
    expected = [zi / (c * di) for zi, di in zip(z, d)]
    for got, want in zip(grad, expected):
        assert math.isclose(got, want, rel_tol=1e-6)
    assert math.isclose(sum(grad), 1.0, rel_tol=1e-6)


def test_dwa_is_the_sum_during_the_first_two_epochs():
    _check(DWA(), lambda v: sum(v))


def test_random_is_a_convex_combination_with_positive_weights():
    value, grad = _value_and_grad(Random(seed=0))
    assert all(g > 0 for g in grad) and math.isclose(sum(grad), 1.0, rel_tol=1e-12)
    assert math.isclose(value, sum(g * x for g, x in zip(grad, LOSSES)), rel_tol=1e-12)


ALL = [
    lambda: Mean(),
    lambda: Sum(),
    lambda: Constant([1.0, 2.0, 3.0, 4.0]),
    lambda: Random(seed=1),
    lambda: GeometricMean(),
    lambda: DWA(),
    lambda: UncertaintyWeighting(4),
    lambda: IMTLL(4),
    lambda: FAMO(4),
    lambda: STCH(0.5),
    lambda: PBI(),
    lambda: COSMOS(1.0),
]


@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_any_floating_dtype_gives_a_finite_scalar_close_to_float64(make, dtype):
    losses = torch.tensor(LOSSES, dtype=dtype, requires_grad=True)
    out = make()(losses)
    assert out.dim() == 0 and torch.isfinite(out)
    out.backward()
    assert losses.grad is not None and losses.grad.dtype == dtype and torch.isfinite(losses.grad).all()
    reference = make()(torch.tensor(LOSSES, dtype=torch.float64))
    tol = {torch.float16: 2e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-5)
    assert_close(out.double(), reference, rtol=tol, atol=tol)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("make", ALL)
@pytest.mark.parametrize("module_device", DEVICES)
@pytest.mark.parametrize("loss_device", DEVICES)
def test_losses_on_any_device_match_the_cpu_value(make, module_device, loss_device):
    """The module may live on another device than the losses (its tensors follow the losses)."""
    losses = torch.tensor(LOSSES, device=loss_device, requires_grad=True)
    out = make().to(module_device)(losses)
    assert out.device == losses.device
    out.backward()
    assert losses.grad is not None and losses.grad.device == losses.device
    assert_close(out.cpu(), make()(torch.tensor(LOSSES)), rtol=1e-5, atol=1e-6)
