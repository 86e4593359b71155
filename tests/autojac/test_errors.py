"""Every misuse raises a TypeError / ValueError that says how to fix it."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from hf_jd import autojac
from hf_jd.aggregation import Mean, UPGrad


def _leaf(*shape: int) -> Tensor:
    return torch.randn(*shape, requires_grad=True)


@pytest.mark.parametrize("fn", ["jac", "backward"])
def test_empty_outputs(fn):
    w = _leaf(3)
    with pytest.raises(ValueError, match="cannot be empty"):
        autojac.jac([], [w]) if fn == "jac" else autojac.backward([])


def test_mtl_empty_tensors_and_features():
    w = _leaf(3)
    f = w * 2
    with pytest.raises(ValueError, match="`tensors` cannot be empty"):
        autojac.mtl_backward([], f)
    with pytest.raises(ValueError, match="`features` cannot be empty"):
        autojac.mtl_backward([f.sum()], [])


@pytest.mark.parametrize("fn", ["jac", "backward", "mtl"])
def test_output_that_does_not_require_grad(fn):
    w = _leaf(3)
    with torch.no_grad():
        y = w * 2
    with pytest.raises(ValueError, match="does not require grad.*no_grad"):
        if fn == "jac":
            autojac.jac(y, w)
        elif fn == "backward":
            autojac.backward(y)
        else:
            autojac.mtl_backward([y.sum()], w * 3)


def test_non_tensor_arguments():
    w = _leaf(3)
    with pytest.raises(TypeError, match=r"outputs\[1\].*torch.Tensor"):
        autojac.jac([w.sum(), 3.0], w)
    with pytest.raises(TypeError, match="`tensors`"):
        autojac.backward("loss")
    with pytest.raises(TypeError, match=r"`inputs\[0\]`"):
        autojac.jac(w.sum(), [None])


def test_jac_input_that_does_not_require_grad():
    w = _leaf(3)
    c = torch.randn(3)
    with pytest.raises(ValueError, match=r"inputs\[1\].*requires_grad_"):
        autojac.jac((w * c).sum(), [w, c])


def test_backward_input_that_cannot_hold_jac():
    w = _leaf(3)
    h = w * 2
    y = (h**2).sum(dim=0, keepdim=True)
    with pytest.raises(ValueError, match=r"non-leaf.*retain_grad\(\).*autojac.jac"):
        autojac.backward(y, inputs=[h])
    with pytest.raises(ValueError, match=r"does not require grad.*requires_grad_"):
        autojac.backward(y, inputs=[torch.randn(3)])


@pytest.mark.parametrize("chunk", [0, -2])
def test_bad_chunk_size_value(chunk):
    w = _leaf(3)
    with pytest.raises(ValueError, match="parallel_chunk_size"):
        autojac.backward(w * 2, parallel_chunk_size=chunk)


@pytest.mark.parametrize("chunk", [1.5, True, "1"])
def test_bad_chunk_size_type(chunk):
    w = _leaf(3)
    with pytest.raises(TypeError, match="parallel_chunk_size"):
        autojac.jac(w * 2, w, parallel_chunk_size=chunk)


def test_jac_outputs_with_wrong_shape_count_or_rows():
    w = _leaf(3)
    y1, y2 = w * 2, w.sum()
    with pytest.raises(ValueError, match=r"jac_outputs\[0\].*\[m, 3\]"):
        autojac.jac([y1], w, jac_outputs=[torch.randn(2, 4)])
    with pytest.raises(ValueError, match=r"jac_outputs\[1\].*shape \[m\]"):
        autojac.jac([y1, y2], w, jac_outputs=[torch.randn(2, 3), torch.randn(2, 1)])
    with pytest.raises(ValueError, match="one Jacobian per tensor"):
        autojac.backward([y1, y2], jac_tensors=[torch.randn(2, 3)])
    with pytest.raises(ValueError, match="same number of rows"):
        autojac.backward([y1, y2], jac_tensors=[torch.randn(2, 3), torch.randn(3)])


def test_shape_errors_use_torchjd_wording():
    """The first sentence of each message is TorchJD's (code matching it keeps working), then hf_jd's hint."""
    w = _leaf(2)
    y1, y2 = w * 2, w * 3
    with pytest.raises(
        ValueError, match=r"`jac_tensors` should have the same length as `tensors`\. \(got 1 and 2\)"
    ):
        autojac.backward([y1, y2], jac_tensors=[torch.randn(2, 2)], inputs=[w])
    with pytest.raises(
        ValueError, match=r"Shape mismatch: `jac_outputs\[0\]` has shape .* but `outputs\[0\]` has shape .*\."
    ):
        autojac.jac(y1, [w], jac_outputs=torch.randn(3, 5))
    with pytest.raises(
        ValueError, match=r"All Jacobians in `jac_tensors` should have the same number of rows\."
    ):
        autojac.backward([y1, y2], jac_tensors=[torch.randn(1, 2), torch.randn(2, 2)], inputs=[w])
    f = torch.tanh(w)
    with pytest.raises(
        ValueError, match=r"`grad_tensors` should have the same length as `tensors`\. \(got 1 and 2\)"
    ):
        autojac.mtl_backward([f * 2, f * 3], f, grad_tensors=[torch.ones(2)])
    with pytest.raises(
        ValueError, match=r"Shape mismatch: `grad_tensors\[0\]` has shape .* but `tensors\[0\]`"
    ):
        autojac.mtl_backward([f * 2], f, grad_tensors=[torch.ones(3)])


def test_backward_row_mismatch_with_existing_jac_fails_before_touching_anything():
    w, v = _leaf(3), _leaf(2)
    autojac.backward(torch.cat([w * v.sum(), v]), retain_graph=False)  # 5 rows
    w_before, v_before = w.jac.clone(), v.jac.clone()
    with pytest.raises(ValueError, match=r"already holds a `.jac` with 5 rows.*4 rows.*jac_to_grad"):
        autojac.backward(torch.cat([w * 2, v.sum(dim=0, keepdim=True)]))
    assert torch.equal(w.jac, w_before) and torch.equal(v.jac, v_before)


def test_jac_to_grad_without_backward_says_to_call_backward():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"no `.jac` field.*autojac.backward"):
        autojac.jac_to_grad(model.parameters(), UPGrad())


def test_jac_to_grad_mismatched_rows():
    a, b = nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(3))
    a.jac, b.jac = torch.randn(4, 2), torch.randn(5, 3)
    with pytest.raises(ValueError, match="same m"):
        autojac.jac_to_grad([a, b], Mean())
    a.jac = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"shape \[m, \*tensor.shape\]"):
        autojac.jac_to_grad([a], Mean())


def test_jac_to_grad_empty_and_wrong_aggregator():
    with pytest.raises(ValueError, match="cannot be empty"):
        autojac.jac_to_grad([], UPGrad())
    p = nn.Parameter(torch.randn(2))
    p.jac = torch.randn(3, 2)
    with pytest.raises(TypeError, match="Aggregator"):
        autojac.jac_to_grad([p], lambda m: m.mean(0))


def test_mtl_non_scalar_tensors_need_grad_tensors():
    w = _leaf(3)
    f = torch.tanh(w)
    with pytest.raises(ValueError, match=r"tensors\[1\].*scalar.*grad_tensors"):
        autojac.mtl_backward([f.sum(), f * 2], f)
    with pytest.raises(ValueError, match=r"grad_tensors\[0\]"):
        autojac.mtl_backward([f * 2], f, grad_tensors=[torch.ones(2)])
    with pytest.raises(ValueError, match="one gradient per task"):
        autojac.mtl_backward([f * 2], f, grad_tensors=[torch.ones(3), torch.ones(3)])


def test_mtl_overlap_between_task_and_shared_params():
    w, head = _leaf(3), _leaf(3)
    f = torch.tanh(w)
    losses = [(f * head).sum(), (f * head).sum() ** 2]
    with pytest.raises(ValueError, match="both in `tasks_params\\[1\\]` and in `shared_params`"):
        autojac.mtl_backward(losses, f, tasks_params=[[head], [head, w]], shared_params=[w])


def test_mtl_tied_weights_found_by_default_give_an_overlap_error_with_a_hint():
    w = _leaf(3)
    f = torch.tanh(w)
    losses = [(f * w).sum(), f.sum()]  # w used by the trunk and again by the first head
    with pytest.raises(ValueError, match="tied weights"):
        autojac.mtl_backward(losses, f)


def test_mtl_tasks_params_length():
    w, head = _leaf(3), _leaf(3)
    f = torch.tanh(w)
    with pytest.raises(ValueError, match="one collection of parameters per task"):
        autojac.mtl_backward([(f * head).sum(), f.sum()], f, tasks_params=[[head]])
