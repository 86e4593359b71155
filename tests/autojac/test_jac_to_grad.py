"""`jac_to_grad`: Gramian path vs concatenation path, accumulation, weights, errors of the aggregator."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from hf_jd import autojac
from hf_jd.aggregation import Aggregator, GramianWeightedAggregator, Mean, UPGrad


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3), nn.Tanh(), nn.Linear(3, 1), nn.Flatten(0)
    )


def _concat_jacobian(params: list[Tensor]) -> Tensor:
    return torch.cat([p.jac.reshape(p.jac.shape[0], -1) for p in params], dim=1)


class _ConflictingParams(nn.Module):
    """Parameters of awkward shapes (scalar, 3-D, size-1 dims) and losses that conflict."""

    def __init__(self) -> None:
        super().__init__()
        self.scalar = nn.Parameter(torch.tensor(0.7))
        self.cube = nn.Parameter(torch.randn(3, 1, 2))
        self.vec = nn.Parameter(torch.randn(5))

    def losses(self) -> Tensor:
        a = self.cube.flatten()
        return torch.stack(
            [
                self.scalar * a.sum() + self.vec[:3].sum(),
                -3 * self.scalar + (a**2).sum() - self.vec.sum(),
                self.scalar**2 - 2 * a[0] + 4 * self.vec[4],
                -(self.vec**2).sum() + a[5] * self.scalar,
            ]
        )


class _CoordinateMedian(Aggregator):
    """A non-Gramian aggregator: needs J itself."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def forward(self, matrix: Tensor) -> Tensor:
        self.seen.append(matrix.clone())
        return matrix.median(dim=0).values


def test_mean_equals_autograd_of_the_mean_loss():
    model = _model()
    x, y = torch.randn(8, 5), torch.randn(8)
    ((model(x) - y) ** 2).mean().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    autojac.backward((model(x) - y) ** 2)
    weights = autojac.jac_to_grad(model.parameters(), Mean())
    torch.testing.assert_close(weights, torch.full((8,), 1 / 8))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e)
        assert not hasattr(p, "jac")


@pytest.mark.parametrize("make_model", [_model, _ConflictingParams])
def test_upgrad_equals_upgrad_of_the_concatenated_jacobian(make_model):
    model = make_model()
    params = list(model.parameters())
    losses = model.losses() if isinstance(model, _ConflictingParams) else model(torch.randn(6, 5)) ** 2
    autojac.backward(losses)
    matrix = _concat_jacobian(params)
    aggregator = UPGrad()
    expected = aggregator(matrix)
    expected_weights = aggregator.weights(matrix)

    weights = autojac.jac_to_grad(params, aggregator)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, weights @ matrix, rtol=1e-5, atol=1e-6)
    assert [p.grad.shape for p in params] == [p.shape for p in params]
    if isinstance(model, _ConflictingParams):
        # The rows really conflict: UPGrad's weights are not uniform, and no loss increases.
        assert (weights.max() - weights.min()) > 1e-3
        assert (matrix @ got >= -1e-5).all()


def test_gramian_path_never_concatenates_nor_calls_the_aggregator_on_j(monkeypatch):
    model = _ConflictingParams()
    params = list(model.parameters())
    autojac.backward(model.losses())
    n = sum(p.numel() for p in params)
    reference_matrix = _concat_jacobian(params)
    aggregator = UPGrad()
    expected = aggregator(reference_matrix)

    big_tensors: list[tuple[int, ...]] = []
    for name in ("cat", "concat", "concatenate", "hstack", "column_stack"):
        real = getattr(torch, name)

        def spy(*args, _real=real, **kwargs):
            out = _real(*args, **kwargs)
            if out.dim() == 2 and out.shape[-1] >= n:
                big_tensors.append(tuple(out.shape))
            return out

        monkeypatch.setattr(torch, name, spy)

    def no_jacobian(matrix: Tensor) -> Tensor:
        raise AssertionError("the Gramian path must not hand the Jacobian to the aggregator")

    monkeypatch.setattr(aggregator, "forward", no_jacobian)
    gramians: list[Tensor] = []
    aggregator.gramian_weighting.register_forward_hook(lambda _m, args, _o: gramians.append(args[0]))

    autojac.jac_to_grad(params, aggregator)
    assert big_tensors == []
    assert len(gramians) == 1 and gramians[0].shape == (4, 4)
    torch.testing.assert_close(gramians[0], reference_matrix @ reference_matrix.T)
    torch.testing.assert_close(
        torch.cat([p.grad.reshape(-1) for p in params]), expected, rtol=1e-5, atol=1e-6
    )


def test_non_gramian_aggregator_gets_the_concatenated_jacobian_and_returns_none():
    model = _ConflictingParams()
    params = list(model.parameters())
    autojac.backward(model.losses())
    matrix = _concat_jacobian(params)
    aggregator = _CoordinateMedian()
    assert autojac.jac_to_grad(params, aggregator) is None
    assert len(aggregator.seen) == 1
    torch.testing.assert_close(aggregator.seen[0], matrix)
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), matrix.median(dim=0).values)


def test_aggregator_with_hooks_takes_the_concatenation_path_and_still_returns_weights():
    model = _ConflictingParams()
    params = list(model.parameters())
    autojac.backward(model.losses())
    matrix = _concat_jacobian(params)
    aggregator = UPGrad()
    inputs: list[Tensor] = []
    aggregator.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    weights = autojac.jac_to_grad(params, aggregator)
    assert len(inputs) == 1
    torch.testing.assert_close(inputs[0], matrix)
    torch.testing.assert_close(weights, UPGrad().weights(matrix), rtol=1e-5, atol=1e-6)


def test_hooks_on_the_weighting_of_j_run_and_shape_the_returned_weights():
    """Hooks on ``aggregator.weighting`` (``J ↦ w``, TorchJD's) make ``jac_to_grad`` take the
    concatenation path so that they run; the weights returned are those the hooks leave, as TorchJD's
    ``aggregator.weighting(J)`` gives them (hooks on ``gramian_weighting`` run inside)."""
    model = _ConflictingParams()
    params = list(model.parameters())
    autojac.backward(model.losses())
    matrix = _concat_jacobian(params)
    aggregator = UPGrad()
    aggregator.register_forward_hook(lambda _m, _a, aggregation: aggregation * 2)  # not on the weights
    aggregator.weighting.register_forward_hook(lambda _m, _a, weights: weights * 3)
    aggregator.gramian_weighting.register_forward_hook(lambda _m, _a, weights: weights * 5)
    weights = autojac.jac_to_grad(params, aggregator)
    expected = UPGrad().weights(matrix) * 15
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights, aggregator.weighting(matrix))
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), 2 * expected @ matrix)


def test_a_weighted_aggregator_of_j_returns_its_weights():
    """Like TorchJD, every weighted aggregator with a ``weighting`` returns its weights, ExcessMTL too."""
    from hf_jd.aggregation import ExcessMTL

    model = _ConflictingParams()
    params = list(model.parameters())
    autojac.backward(model.losses())
    matrix = _concat_jacobian(params)
    weights = autojac.jac_to_grad(params, ExcessMTL())
    torch.testing.assert_close(weights, ExcessMTL().weights(matrix))


def test_a_tensor_holding_a_jac_must_require_grad():
    """As in TorchJD: a tensor that does not require grad cannot receive the ``.grad`` of its ``.jac``."""
    frozen = torch.ones(2)
    frozen.jac = torch.ones(3, 2)  # type: ignore[attr-defined]
    trained = torch.ones(1, requires_grad=True)
    trained.jac = torch.ones(3, 1)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"holds a `.jac` but does not require grad"):
        autojac.jac_to_grad([trained, frozen], Mean())
    assert frozen.grad is None and trained.grad is None


def test_optimize_gramian_computation_needs_a_gramian_weighted_aggregator():
    """TorchJD refuses ``optimize_gramian_computation=True`` for an aggregator it cannot serve from J Jᵀ."""
    from hf_jd.aggregation import TrimmedMean

    p = torch.ones(2, requires_grad=True)
    p.jac = torch.randn(3, 2)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="optimize_gramian_computation"):
        autojac.jac_to_grad([p], TrimmedMean(), optimize_gramian_computation=True)
    assert autojac.jac_to_grad([p], Mean(), optimize_gramian_computation=True) is not None


def test_accumulates_into_an_existing_grad_and_creates_missing_ones():
    model = _model()
    params = list(model.parameters())
    existing = torch.randn_like(params[0])
    params[0].grad = existing.clone()
    autojac.backward(model(torch.randn(4, 5)))
    matrix = _concat_jacobian(params)
    autojac.jac_to_grad(params, Mean())
    update = matrix.mean(dim=0)
    offset = 0
    for i, p in enumerate(params):
        piece = update[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
        torch.testing.assert_close(p.grad, piece + (existing if i == 0 else 0))


def test_retain_jac_keeps_the_jacobians_and_default_deletes_them():
    model = _model()
    params = list(model.parameters())
    autojac.backward(model(torch.randn(4, 5)))
    before = [p.jac.clone() for p in params]
    autojac.jac_to_grad(params, UPGrad(), retain_jac=True)
    for p, b in zip(params, before):
        assert torch.equal(p.jac, b)
    first_grads = [p.grad.clone() for p in params]
    autojac.jac_to_grad(params, UPGrad())  # same Jacobian again: the grad doubles
    for p, g in zip(params, first_grads):
        assert not hasattr(p, "jac")
        torch.testing.assert_close(p.grad, 2 * g)


def test_frozen_parameters_without_jac_are_skipped():
    model = _model()
    model[0].requires_grad_(False)
    autojac.backward(model(torch.randn(4, 5)))
    autojac.jac_to_grad(model.parameters(), Mean())
    assert model[0].weight.grad is None
    assert model[2].weight.grad is not None


def test_non_finite_jacobian_is_left_to_the_aggregator():
    w = torch.randn(3, requires_grad=True)
    autojac.backward(torch.stack([w.sum(), (w * float("inf")).sum()]), retain_graph=True)
    with pytest.raises(ValueError, match="NaN or inf"):
        autojac.jac_to_grad([w], UPGrad())
    assert not hasattr(w, "jac")  # cleared even though the aggregator refused it
    w.jac = torch.stack([torch.ones(3), torch.full((3,), float("inf"))])
    autojac.jac_to_grad([w], Mean())
    assert torch.isinf(w.grad).all()


def test_low_precision_jacobians_keep_their_dtype():
    w = nn.Parameter(torch.randn(4, 3).to(torch.bfloat16))
    w.jac = torch.randn(5, 4, 3).to(torch.bfloat16)
    expected = UPGrad()(w.jac.float().reshape(5, -1)).view(4, 3)
    weights = autojac.jac_to_grad([w], UPGrad())
    assert weights.dtype == torch.float32
    assert w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(w.grad.float(), expected, rtol=2e-2, atol=2e-2)


def test_subclass_of_gramian_weighted_aggregator_uses_its_weighting():
    class Last(GramianWeightedAggregator):
        def __init__(self) -> None:
            class W(torch.nn.Module):
                def forward(self, gramian: Tensor) -> Tensor:
                    w = torch.zeros(gramian.shape[0], dtype=gramian.dtype)
                    w[-1] = 1
                    return w

            super().__init__(W())

    p = nn.Parameter(torch.randn(2, 2))
    p.jac = torch.randn(3, 2, 2)
    expected = p.jac[-1].clone()
    torch.testing.assert_close(autojac.jac_to_grad([p], Last()), torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(p.grad, expected)
