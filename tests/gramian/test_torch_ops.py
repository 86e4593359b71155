"""Every PyTorch internal the Gramian engine reads (:mod:`hf_jd.gramian._torch_ops`) exists in the
installed torch: each node name is produced by a tiny graph, each saved attribute is read on it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hf_jd.gramian import _torch_ops as ops


def _x(*shape: int) -> Tensor:
    return torch.randn(*shape, requires_grad=True)


def _reentrant(x: Tensor) -> Tensor:
    return checkpoint(torch.sin, x, use_reentrant=True)


#: For each node name the engine reads, a graph whose output's ``grad_fn`` has that name.
PRODUCERS: dict[str, Callable[[], Tensor]] = {
    "ExpandBackward0": lambda: _x(1, 3).expand(4, 3),
    "AddBackward0": lambda: _x(2) + _x(2),
    "AddBackward1": lambda: torch.ops.aten.add.Scalar(_x(2), 2.0),  # the Scalar overload
    "SubBackward0": lambda: _x(2) - _x(2),
    "SubBackward1": lambda: torch.ops.aten.sub.Scalar(_x(2), 2.0),  # the Scalar overload
    "MulBackward0": lambda: _x(2) * _x(2),
    "MulBackward1": lambda: torch.ops.aten.mul.Scalar(_x(2), 2.0),  # the Scalar overload
    "DivBackward0": lambda: _x(2) / _x(2),
    "DivBackward1": lambda: torch.ops.aten.div.Scalar(_x(2), 2.0),  # the Scalar overload
    "NegBackward0": lambda: -_x(2),
    "WhereBackward0": lambda: torch.where(torch.tensor([True, False]), _x(2), _x(2)),
    "MaskedFillBackward0": lambda: _x(2).masked_fill(torch.tensor([True, False]), 0.0),
    "CloneBackward0": lambda: _x(2).clone(),
    "ToCopyBackward0": lambda: _x(2).to(torch.float64),
    "NativeDropoutBackward0": lambda: torch.ops.aten.native_dropout(_x(4), 0.5, True)[0],  # CUDA's dropout
    "GeluBackward0": lambda: F.gelu(_x(2)),
    "ReluBackward0": lambda: F.relu(_x(2)),
    "SiluBackward0": lambda: F.silu(_x(2)),
    "TanhBackward0": lambda: torch.tanh(_x(2)),
    "SigmoidBackward0": lambda: torch.sigmoid(_x(2)),
    "ExpBackward0": lambda: torch.exp(_x(2)),
    "PowBackward0": lambda: _x(2) ** 2,
    "RsqrtBackward0": lambda: torch.rsqrt(_x(2)),
    "SqrtBackward0": lambda: torch.sqrt(_x(2)),
    "ClampMinBackward0": lambda: torch.clamp_min(_x(2), 0.0),
    "ClampMaxBackward0": lambda: torch.clamp_max(_x(2), 0.0),
    "ClampBackward0": lambda: _x(2).clamp(torch.tensor(-1.0), torch.tensor(1.0)),
    "ClampBackward1": lambda: _x(2).clamp(-1.0, 1.0),
    "AbsBackward0": lambda: _x(2).abs(),
    "LogBackward0": lambda: torch.log(_x(2)),
    "ViewBackward0": lambda: _x(2, 3).view(6),
    "UnsafeViewBackward0": lambda: torch.matmul(_x(2, 3, 4), _x(4, 5)),
    "UnsqueezeBackward0": lambda: _x(2).unsqueeze(0),
    "SqueezeBackward0": lambda: _x(1, 2).squeeze(),
    "SqueezeBackward1": lambda: _x(1, 2).squeeze(0),
    "SqueezeBackward2": lambda: _x(1, 2).squeeze((0,)),
    "LinalgVectorNormBackward0": lambda: torch.linalg.vector_norm(_x(2, 3), dim=1),
    "SumBackward1": lambda: _x(2, 3).sum(dim=1),
    "MeanBackward1": lambda: _x(2, 3).mean(dim=1),
    "SoftmaxBackward0": lambda: F.softmax(_x(2, 3), dim=-1),
    "SafeSoftmaxBackward0": lambda: torch._safe_softmax(_x(2, 3), -1),  # inside SDPA's math path
    "LogSoftmaxBackward0": lambda: F.log_softmax(_x(2, 3), dim=-1),
    "SplitBackward0": lambda: _x(4).split(2)[0],
    "SplitWithSizesBackward0": lambda: _x(4).split([1, 3])[0],
    "SliceBackward0": lambda: _x(4)[1:3],
    "SelectBackward0": lambda: _x(2, 3)[:, 1],
    "UnbindBackward0": lambda: _x(2, 3).unbind(0)[0],
    "PermuteBackward0": lambda: _x(2, 3, 4).permute(2, 0, 1),
    "TransposeBackward0": lambda: _x(2, 3).transpose(0, 1),
    "BmmBackward0": lambda: torch.bmm(_x(2, 3, 4), _x(2, 4, 5)),
    "MmBackward0": lambda: _x(2, 3) @ _x(3, 4),
    "AddmmBackward0": lambda: F.linear(_x(2, 3), _x(4, 3), _x(4)),
    "RepeatBackward0": lambda: _x(1, 3).repeat(4, 1),
    "IndexBackward0": lambda: _x(5, 2)[torch.tensor([0, 3])],
    "NativeLayerNormBackward0": lambda: F.layer_norm(_x(2, 3), (3,)),
    "CheckpointFunctionBackward": lambda: _reentrant(_x(3)),
}


#: Names older torch releases produce (``x.reshape`` of a viewable tensor); kept for them.
OLDER = {"ReshapeAliasBackward0"}


def test_every_node_name_has_a_producer():
    assert ops.NODE_NAMES - {ops.ACCUMULATE_GRAD} - OLDER == set(PRODUCERS)


@pytest.mark.parametrize("name", sorted(OLDER))
def test_older_node_names_are_still_autograd_nodes(name):
    assert hasattr(torch._C._functions, name)


@pytest.mark.parametrize("name", sorted(PRODUCERS))
def test_node_name_is_produced_by_the_installed_torch(name):
    assert ops.op_name(PRODUCERS[name]().grad_fn) == name


def test_accumulate_grad_and_its_variable():
    param = nn.Parameter(torch.randn(3))
    y = param * 2.0
    ((leaf, output_nr),) = [(n, k) for n, k in ops.next_functions(y.grad_fn) if n is not None]
    assert ops.op_name(leaf) == ops.ACCUMULATE_GRAD
    assert ops.leaf_variable(leaf) is param
    assert output_nr == 0
    assert ops.leaf_variable(y.grad_fn) is None


@pytest.mark.parametrize("name", sorted(ops.SAVED_ATTRIBUTES))
def test_saved_attributes_are_readable(name):
    node = PRODUCERS[name]().grad_fn
    for attribute in ops.SAVED_ATTRIBUTES[name]:
        assert ops.saved(node, attribute, default=KeyError) is not KeyError, (name, attribute)


def test_saved_values():
    assert ops.saved(_x(2, 3, 4).permute(2, 0, 1).grad_fn, "dims") == (2, 0, 1)
    transposed = _x(2, 3).transpose(0, 1).grad_fn
    assert (ops.saved(transposed, "dim0"), ops.saved(transposed, "dim1")) == (0, 1)
    assert ops.saved(_x(1, 3).repeat(4, 1).grad_fn, "repeats") == (4, 1)
    assert ops.saved(torch.add(_x(2), _x(2), alpha=3.0).grad_fn, "alpha") == 3.0
    assert ops.saved(_x(2, 3).sum(dim=1, keepdim=True).grad_fn, "keepdim") is True
    assert ops.saved(F.layer_norm(_x(2, 3), (3,)).grad_fn, "normalized_shape") == (3,)
    other = torch.randn(2)
    assert torch.equal(ops.saved((_x(2) * other).grad_fn, "other"), other)
    (indices,) = ops.saved(_x(5, 2)[torch.tensor([0, 3])].grad_fn, "indices")
    assert indices.tolist() == [0, 3]
    assert ops.saved(_x(2).clone().grad_fn, "missing", default=7) == 7


def test_output_metadata():
    first, _ = _x(4).split([1, 3])
    node = first.grad_fn
    assert ops.output_count(node) == 2
    assert ops.output_shape(node, 0) == (1,) and ops.output_shape(node, 1) == (3,)
    added = (_x(2) + torch.randn(2)).grad_fn  # one input needs no gradient: a ``None`` entry
    assert [n is None for n, _ in ops.next_functions(added)] == [False, True]
    assert len(list(ops.next_nodes(added))) == 1


def test_tensor_internals():
    base = torch.randn(2, 3)
    view = base.T
    assert ops.view_base(view) is base and ops.view_base(base) is None
    assert ops.is_view(view) and not ops.is_view(base)
    before = ops.version(base)
    base.add_(1.0)
    assert ops.version(base) == before + 1


def test_module_and_c_internals():
    linear = nn.Linear(2, 3)
    assert ops.own_parameter(linear, "weight") is linear.weight
    assert ops.own_parameter(linear, "missing") is None
    assert issubclass(nn.BatchNorm1d, ops.BATCH_NORM) and issubclass(nn.SyncBatchNorm, ops.BATCH_NORM)
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    assert torch.equal(ops.TENSOR_BASE_MATMUL(x, w.T), x @ w.T)
    leaves, spec = ops.tree_flatten(((1, torch.zeros(1)), {"a": 2}))
    assert ops.tree_unflatten(leaves, spec)[1] == {"a": 2}
    assert ops.tree_map(lambda v: v, [1]) == [1]
    assert ops.tree_unflatten([], ops.empty_spec()) == ()
