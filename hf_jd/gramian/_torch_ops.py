"""Every PyTorch internal the Gramian engine reads, in one place.

The engine reads the autograd graph (node class names, ``next_functions``, the ``_input_metadata`` of a
node's outputs, the ``_saved_*`` attributes of some backward nodes, the ``variable`` of an
``AccumulateGrad`` node), private tensor attributes (``_base``, ``_version``, ``_is_view``), private
module attributes (``_parameters``, ``_BatchNorm``) and private modules (``torch.utils._pytree``,
``torch._C``). None of this is public API: a PyTorch release may rename a node or drop an attribute.
Naming each of them here, with ``tests/gramian/test_torch_ops.py`` checking every one against the
installed torch (a tiny graph that produces the node, the attribute read on it), makes such a change
one failing test instead of a silent fall back to the slow exact path.

Node names are grouped by what the engine's passes do with them; a name may appear in several
groups (``AddBackward0`` is elementwise for the layout proof and a broadcast point for the planner).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map, tree_unflatten

# ---------------------------------------------------------------------- node names
#: The leaf node of a tensor that requires grad (a parameter); its ``variable`` is the tensor.
ACCUMULATE_GRAD = "AccumulateGrad"
#: Reentrant activation checkpointing (``torch.utils.checkpoint``, ``use_reentrant=True``): hides its graph.
REENTRANT_CHECKPOINT = "CheckpointFunctionBackward"
EXPAND = "ExpandBackward0"
ADD = "AddBackward0"
SUB = "SubBackward0"
MUL = "MulBackward0"
DIV = "DivBackward0"
BMM = "BmmBackward0"
MM = "MmBackward0"
ADDMM = "AddmmBackward0"
PERMUTE = "PermuteBackward0"
TRANSPOSE = "TransposeBackward0"
REPEAT = "RepeatBackward0"
#: Elementwise selection (T5's decoder masks its relative bias with ``torch.where``).
WHERE = "WhereBackward0"
#: Indexing by index tensors (``table[index]``): a gather whose backward is an ``index_put``.
INDEX = "IndexBackward0"
NATIVE_LAYER_NORM = "NativeLayerNormBackward0"

#: Elementwise nodes through which a call's input is traced back to an earlier call's output (with one
#: differentiable input of the output's shape, row ``r`` of the output comes from row ``r`` of it).
TRACE_ELEMENTWISE = frozenset(
    {
        MUL,
        DIV,
        ADD,
        SUB,
        "GeluBackward0",
        "ReluBackward0",
        "SiluBackward0",
        "TanhBackward0",
        "SigmoidBackward0",
        "NativeDropoutBackward0",
        "CloneBackward0",
        "ToCopyBackward0",
    }
)
#: Views and reshapes that keep the logical (row-major) order (:mod:`hf_jd.gramian._layout`).
VIEWS = frozenset(
    {
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "UnsqueezeBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
    }
)
#: Elementwise ops for the layout proof (operands broadcast against each other).
ELEMENTWISE = frozenset(
    {
        ADD,
        "AddBackward1",
        SUB,
        "SubBackward1",
        MUL,
        "MulBackward1",
        DIV,
        "DivBackward1",
        "NegBackward0",
        WHERE,
        "MaskedFillBackward0",
        "CloneBackward0",
        "ToCopyBackward0",
        "NativeDropoutBackward0",
        "GeluBackward0",
        "ReluBackward0",
        "SiluBackward0",
        "TanhBackward0",
        "SigmoidBackward0",
        "ExpBackward0",
        "PowBackward0",
        "RsqrtBackward0",
        "SqrtBackward0",
        "ClampMinBackward0",
        "ClampMaxBackward0",
        "ClampBackward0",
        "ClampBackward1",
        "AbsBackward0",
        "LogBackward0",
    }
)
#: Reductions over the dimensions ``_saved_dim`` (``_saved_keepdim``): the 2-norm of ``F.normalize``,
#: sums and means over features.
REDUCE_DIMS = frozenset({"LinalgVectorNormBackward0", "SumBackward1", "MeanBackward1"})
#: Ops that read or cut along one dimension (``_saved_dim``) and keep the others.
ALONG_DIM = frozenset(
    {
        "SoftmaxBackward0",
        "SafeSoftmaxBackward0",
        "LogSoftmaxBackward0",
        "SplitBackward0",
        "SplitWithSizesBackward0",
        "SliceBackward0",
    }
)
#: Ops that remove one dimension (``_saved_dim``).
DROP_DIM = frozenset({"SelectBackward0", "UnbindBackward0"})
PERMUTES = frozenset({PERMUTE, TRANSPOSE})
#: Shape-only ops between a batch-free tensor and its broadcast points (:mod:`hf_jd.gramian._broadcast`).
SHAPE_OPS = frozenset(
    {
        PERMUTE,
        "UnsqueezeBackward0",
        "ViewBackward0",
        "UnsafeViewBackward0",
        TRANSPOSE,
        "SqueezeBackward0",
        "SqueezeBackward1",
        "CloneBackward0",
    }
)
#: Broadcast points: where a batch-free tensor meets the examples.
TERMINALS = frozenset({EXPAND, ADD, SUB, MUL})
#: Row-wise consumers of a repeated or expanded batch-free tensor (:mod:`hf_jd.gramian._region`).
REGION_ROW_WISE = frozenset({BMM, ADD, SUB, MUL, DIV})

#: Every node name above, for the test against the installed torch.
NODE_NAMES = frozenset(
    {
        ACCUMULATE_GRAD,
        REENTRANT_CHECKPOINT,
        EXPAND,
        BMM,
        MM,
        ADDMM,
        REPEAT,
        INDEX,
        NATIVE_LAYER_NORM,
        *TRACE_ELEMENTWISE,
        *VIEWS,
        *ELEMENTWISE,
        *REDUCE_DIMS,
        *ALONG_DIM,
        *DROP_DIM,
        *PERMUTES,
        *SHAPE_OPS,
        *TERMINALS,
        *REGION_ROW_WISE,
    }
)

#: The ``_saved_*`` attributes read, by node name.
SAVED_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    PERMUTE: ("dims",),
    TRANSPOSE: ("dim0", "dim1"),
    "SoftmaxBackward0": ("dim",),
    "SelectBackward0": ("dim",),
    "SumBackward1": ("dim", "keepdim"),
    NATIVE_LAYER_NORM: ("normalized_shape",),
    REPEAT: ("repeats",),
    MUL: ("self", "other"),
    ADD: ("alpha",),
    SUB: ("alpha",),
    WHERE: ("condition",),
    INDEX: ("indices",),
}


# ---------------------------------------------------------------------- the autograd graph
def op_name(node: Node | None) -> str:
    """The class name of an autograd node (``"AddmmBackward0"``); ``"NoneType"`` for ``None``."""
    return type(node).__name__


def next_functions(node: Node) -> tuple[tuple[Node | None, int], ...]:
    """``(node, output_nr)`` of each input of ``node`` (``None`` for inputs that need no gradient)."""
    return node.next_functions  # type: ignore[no-any-return]


def next_nodes(node: Node) -> Iterator[Node]:
    """The input nodes of ``node`` that exist (with repetitions)."""
    return (child for child, _ in node.next_functions if child is not None)


def output_shape(node: Node, output_nr: int = 0) -> tuple[int, ...]:
    """The shape of output ``output_nr`` of ``node`` (autograd's metadata for the gradient it receives)."""
    return tuple(node._input_metadata[output_nr].shape)  # type: ignore[attr-defined]


def output_count(node: Node) -> int:
    """The number of outputs of ``node`` (inputs of its backward)."""
    return len(node._input_metadata)  # type: ignore[attr-defined]


def saved(node: Node, name: str, default: Any = None) -> Any:
    """The value ``node`` saved for its backward under ``name`` (``_saved_<name>``), else ``default``."""
    return getattr(node, f"_saved_{name}", default)


#: The attribute of an ``AccumulateGrad`` node that holds its tensor. The walks over the whole graph
#: (:func:`hf_jd.gramian._broadcast.consumers_of`, :mod:`hf_jd.gramian._graph`) read it with ``getattr``
#: and ``node.next_functions`` (public) directly: a function call per edge would slow every step.
LEAF_ATTRIBUTE = "variable"


def leaf_variable(node: Node | None) -> Tensor | None:
    """The tensor of an ``AccumulateGrad`` node (a parameter or another leaf), else ``None``."""
    return getattr(node, LEAF_ATTRIBUTE, None)


# ---------------------------------------------------------------------- tensors and modules
def view_base(tensor: Tensor) -> Tensor | None:
    """The tensor that ``tensor`` is a view of (``None`` for a tensor that owns its memory)."""
    return tensor._base


def version(tensor: Tensor) -> int:
    """The version counter of ``tensor`` (incremented by every in-place modification)."""
    return tensor._version


def is_view(tensor: Tensor) -> bool:
    return tensor._is_view()


def own_parameter(module: nn.Module, name: str) -> object:
    """The parameter ``module`` currently holds under ``name`` (FSDP2 swaps it), without ``__getattr__``."""
    return module._parameters.get(name)


#: Batch-norm layers (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``): they mix the examples in train mode.
BATCH_NORM: type[nn.Module] = nn.modules.batchnorm._BatchNorm
#: ``x @ W.T`` as a method of the C tensor base class (how some ``nn.Linear`` subclasses compute).
TENSOR_BASE_MATMUL = torch._C.TensorBase.matmul


def empty_spec() -> TreeSpec:
    """The pytree structure of ``()`` (the inputs of a synthetic call)."""
    return tree_flatten(())[1]


__all__ = [
    "ACCUMULATE_GRAD",
    "BATCH_NORM",
    "LEAF_ATTRIBUTE",
    "NODE_NAMES",
    "SAVED_ATTRIBUTES",
    "TENSOR_BASE_MATMUL",
    "TreeSpec",
    "empty_spec",
    "is_view",
    "leaf_variable",
    "next_functions",
    "next_nodes",
    "op_name",
    "output_count",
    "output_shape",
    "own_parameter",
    "saved",
    "tree_flatten",
    "tree_map",
    "tree_unflatten",
    "version",
    "view_base",
]
