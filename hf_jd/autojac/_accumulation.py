"""Accumulation of Jacobians into ``.jac`` fields and of gradients into ``.grad`` fields.

Both are summed across calls, like ``Tensor.backward`` sums into ``.grad``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .._tensors import add_to_grad
from ._checks import row_shape


def has_jac(tensor: Tensor) -> bool:
    """Whether ``tensor`` holds a ``.jac`` field (set by ``backward`` or ``mtl_backward``)."""
    return getattr(tensor, "jac", None) is not None


def check_jac_rows(tensors: Sequence[Tensor], m: int) -> None:
    """Fail early, before any computation, when an existing ``.jac`` does not have ``m`` rows."""
    for i, tensor in enumerate(tensors):
        if has_jac(tensor) and tensor.jac.shape[0] != m:  # type: ignore[attr-defined]
            _raise_row_mismatch(i, tensor, tensor.jac.shape[0], m)  # type: ignore[attr-defined]


def _raise_row_mismatch(i: int, tensor: Tensor, existing_rows: int, new_rows: int) -> None:
    raise ValueError(
        f"Tensor {i} (shape {tuple(tensor.shape)}) already holds a `.jac` with {existing_rows} rows, "
        f"and the new Jacobian has {new_rows} rows. `.jac` fields are summed across calls (like "
        "`.grad`), which needs the same objectives (rows) each time. Call "
        "`hf_jd.autojac.jac_to_grad` (which clears `.jac`) or `del p.jac` between steps."
    )


def accumulate_jacs(tensors: Sequence[Tensor], jacobians: Sequence[Tensor]) -> None:
    """Add each Jacobian (shape ``[m, *t.shape]``) to ``t.jac``, creating the field when absent.

    The rows of an existing ``.jac`` are the objectives of an earlier call: their count must match.
    """
    for i, (tensor, jacobian) in enumerate(zip(tensors, jacobians)):
        if jacobian.shape[1:] != tensor.shape:
            raise ValueError(
                f"Cannot store a Jacobian of shape {tuple(jacobian.shape)} in the `.jac` field of a "
                f"tensor of shape {tuple(tensor.shape)}: expected shape {row_shape(tensor.shape)}."
            )
        if not has_jac(tensor):
            tensor.jac = jacobian  # type: ignore[attr-defined]
            continue
        existing: Tensor = tensor.jac  # type: ignore[attr-defined]
        if existing.shape != jacobian.shape:
            _raise_row_mismatch(i, tensor, existing.shape[0], jacobian.shape[0])
        existing += jacobian


def accumulate_grads(tensors: Sequence[Tensor], gradients: Sequence[Tensor]) -> None:
    """Add each gradient (shape ``t.shape``) to ``t.grad``, creating the field when it is ``None``."""
    for tensor, gradient in zip(tensors, gradients):
        add_to_grad(tensor, gradient)
