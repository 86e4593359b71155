"""UncertaintyWeighting and IMTL-L: parameter gradients by autograd against the closed forms, and what
training the scales converges to."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from hf_jd.scalarization import FAMO, IMTLL, UW, UncertaintyWeighting

LOSSES = torch.tensor([0.7, 2.5, 1.3], dtype=torch.float64)
S = torch.tensor([0.4, -0.8, 1.5])


def _set(parameter: torch.nn.Parameter, values: torch.Tensor) -> None:
    with torch.no_grad():
        parameter.copy_(values)


def test_uw_parameter_and_loss_gradients():
    uw = UncertaintyWeighting(3)
    _set(uw.log_var, S)
    losses = LOSSES.clone().requires_grad_(True)
    g_s, g_l = torch.autograd.grad(uw(losses), (uw.log_var, losses))
    s, L = S.double().tolist(), LOSSES.tolist()
    assert_close(
        g_s.double(), torch.tensor([0.5 - 0.5 * math.exp(-a) * x for a, x in zip(s, L)], dtype=torch.float64)
    )
    assert_close(g_l, torch.tensor([0.5 * math.exp(-a) for a in s], dtype=torch.float64))


def test_imtl_l_parameter_and_loss_gradients():
    imtl = IMTLL(3)
    _set(imtl.log_scale, S)
    losses = LOSSES.clone().requires_grad_(True)
    g_s, g_l = torch.autograd.grad(imtl(losses), (imtl.log_scale, losses))
    s, L = S.double().tolist(), LOSSES.tolist()
    assert_close(g_s.double(), torch.tensor([math.exp(a) * x - 1 for a, x in zip(s, L)], dtype=torch.float64))
    assert_close(g_l, torch.tensor([math.exp(a) for a in s], dtype=torch.float64))


@pytest.mark.parametrize(
    ("cls", "name", "optimum"),
    [(UncertaintyWeighting, "log_var", torch.log), (IMTLL, "log_scale", lambda L: -torch.log(L))],
)
def test_training_the_scales_on_fixed_losses_reaches_the_closed_form_optimum(cls, name, optimum):
    scalarizer = cls(3)
    optimizer = torch.optim.Adam(scalarizer.parameters(), lr=0.05)
    for _ in range(2000):
        optimizer.zero_grad()
        scalarizer(LOSSES.float()).backward()
        optimizer.step()
    # UW: s* = log L (sigma^2 = L); IMTL-L: s* = -log L (every scaled loss e^s L = 1)
    assert_close(getattr(scalarizer, name).detach(), optimum(LOSSES.float()), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(("cls", "name"), [(UncertaintyWeighting, "log_var"), (IMTLL, "log_scale")])
def test_parameters_are_exposed_sized_by_shape_and_reset_to_zero(cls, name):
    scalarizer = cls([3])
    params = list(scalarizer.parameters())
    assert len(params) == 1 and params[0] is getattr(scalarizer, name) and params[0].shape == (3,)
    _set(params[0], S)
    scalarizer.reset()
    assert torch.equal(params[0].detach(), torch.zeros(3))
    assert params[0] is getattr(scalarizer, name)  # reset keeps the object the optimizer holds


def test_uw_alias_is_torchjds_name():
    assert UW is UncertaintyWeighting


def test_famo_has_no_optimizer_parameters():
    assert list(FAMO(3).parameters()) == []


@pytest.mark.parametrize("cls", [UncertaintyWeighting, IMTLL, FAMO])
def test_wrong_number_of_losses_is_refused_with_the_expected_count(cls):
    with pytest.raises(ValueError, match="for 3 objectives but got 2 losses"):
        cls(3)(torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("cls", [UncertaintyWeighting, IMTLL, FAMO])
@pytest.mark.parametrize("shape", [0, -1, 2.5, "3", [2, 2], True])
def test_bad_shapes_are_refused(cls, shape):
    with pytest.raises((TypeError, ValueError), match="shape"):
        cls(shape)
