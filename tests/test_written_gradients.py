"""``written_gradients_are_finite``: the last check before an optimizer step, fused norms first, exact after."""

from __future__ import annotations

import pytest
import torch

from hf_jd._tensors import written_gradients_are_finite


def _params(*grads: torch.Tensor) -> list[torch.nn.Parameter]:
    params = []
    for grad in grads:
        param = torch.nn.Parameter(torch.zeros(grad.shape, dtype=grad.dtype))
        param.grad = grad
        params.append(param)
    return params


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_entry_anywhere_is_found(bad):
    grads = [torch.ones(5), torch.ones(3, 4, dtype=torch.float64), torch.ones(7, dtype=torch.bfloat16)]
    assert written_gradients_are_finite(_params(*grads))
    for index in range(len(grads)):
        poisoned = [g.clone() for g in grads]
        poisoned[index].view(-1)[-1] = bad
        assert not written_gradients_are_finite(_params(*poisoned))


def test_finite_entries_whose_norm_overflows_are_finite():
    assert written_gradients_are_finite(_params(torch.full((4,), 3e38), torch.ones(2)))


def test_sparse_gradients_are_read_through_their_values():
    finite = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 3), (4, 3))
    assert written_gradients_are_finite(_params(torch.ones(2), finite))
    poisoned = torch.sparse_coo_tensor([[0, 2]], torch.tensor([[1.0, float("nan"), 1.0], [1, 1, 1]]), (4, 3))
    assert not written_gradients_are_finite(_params(torch.ones(2), poisoned))


def test_parameters_without_a_gradient_are_skipped():
    param = torch.nn.Parameter(torch.zeros(3))
    assert written_gradients_are_finite([param]) and written_gradients_are_finite([])
