"""Argument validation shared by the public functions of :mod:`hf_jd.autojac`.

Every check raises a ``TypeError`` or ``ValueError`` whose message says how to fix the call.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def as_tensor_tuple(tensors: Tensor | Iterable[Tensor], name: str) -> tuple[Tensor, ...]:
    """Normalise ``tensors`` (one tensor or an iterable of tensors) to a tuple, checking the types."""
    if isinstance(tensors, Tensor):
        return (tensors,)
    if isinstance(tensors, (str, bytes)) or not isinstance(tensors, Iterable):
        raise TypeError(
            f"`{name}` should be a torch.Tensor or a sequence of torch.Tensor, got {type(tensors).__name__}."
        )
    result = tuple(tensors)
    for i, t in enumerate(result):
        if not isinstance(t, Tensor):
            raise TypeError(f"`{name}[{i}]` should be a torch.Tensor, got {type(t).__name__}.")
    return result


def unique(tensors: Iterable[Tensor]) -> tuple[Tensor, ...]:
    """Remove repeated tensors (by identity), keeping the first occurrence's position."""
    return tuple({id(t): t for t in tensors}.values())


def check_chunk_size(parallel_chunk_size: int | None) -> None:
    """``parallel_chunk_size`` must be ``None`` (all rows at once) or a positive ``int``."""
    if parallel_chunk_size is None:
        return
    if isinstance(parallel_chunk_size, bool) or not isinstance(parallel_chunk_size, int):
        raise TypeError(
            "`parallel_chunk_size` should be None (all rows at once) or a positive int, got "
            f"{type(parallel_chunk_size).__name__}."
        )
    if parallel_chunk_size <= 0:
        raise ValueError(
            "`parallel_chunk_size` should be None (all rows at once) or a positive int (1 = one row "
            f"at a time, without vmap), got {parallel_chunk_size}."
        )


def check_non_empty(tensors: Sequence[Tensor], name: str) -> None:
    if len(tensors) == 0:
        raise ValueError(f"`{name}` cannot be empty: pass at least one tensor to differentiate.")


def check_require_grad(tensors: Sequence[Tensor], name: str) -> None:
    """Each tensor to differentiate must be part of an autograd graph."""
    for i, t in enumerate(tensors):
        if not t.requires_grad:
            raise ValueError(
                f"`{name}[{i}]` (shape {tuple(t.shape)}) does not require grad, so it has no Jacobian. "
                "It was probably computed under torch.no_grad() / torch.inference_mode(), detached, or "
                "from parameters with requires_grad=False. Compute it with gradients enabled."
            )


def check_differentiable_inputs(inputs: Sequence[Tensor], name: str) -> None:
    """Tensors we differentiate *with respect to* must require grad (leaf or intermediate)."""
    for i, t in enumerate(inputs):
        if not t.requires_grad:
            raise ValueError(
                f"`{name}[{i}]` (shape {tuple(t.shape)}) does not require grad, so nothing can be "
                "differentiated with respect to it. Call `.requires_grad_()` on it (for a leaf) before "
                "computing the outputs, or pass a tensor the outputs were computed from."
            )


def check_accumulable(tensors: Sequence[Tensor], name: str, field: str) -> None:
    """Tensors whose ``.jac`` / ``.grad`` we fill must be leaves requiring grad or retain their grad."""
    for i, t in enumerate(tensors):
        if not (t.requires_grad and (t.is_leaf or t.retains_grad)):
            if not t.requires_grad:
                why = "does not require grad"
                fix = "call `.requires_grad_()` on it before the forward pass"
            else:
                why = "is a non-leaf tensor that does not retain its gradient"
                fix = (
                    "call `.retain_grad()` on it before the backward, or use `hf_jd.autojac.jac` to get "
                    "the Jacobian as a return value"
                )
            raise ValueError(
                f"Cannot fill the `{field}` field of `{name}[{i}]` (shape {tuple(t.shape)}): it {why}. "
                f"Only leaf tensors requiring grad (parameters) or tensors that retain their grad can "
                f"hold `{field}`; {fix}."
            )


def check_jacobians_match(
    jacobians: Sequence[Tensor], tensors: Sequence[Tensor], jac_name: str, tensor_name: str
) -> int:
    """Check ``jacobians[i].shape == [m, *tensors[i].shape]`` for one common ``m``; return ``m``."""
    if len(jacobians) != len(tensors):
        raise ValueError(
            f"`{jac_name}` should have the same length as `{tensor_name}`. (got {len(jacobians)} and "
            f"{len(tensors)}) Give one Jacobian per tensor of `{tensor_name}`."
        )
    m: int | None = None
    for i, (j, t) in enumerate(zip(jacobians, tensors)):
        if j.dim() == 0 or j.shape[1:] != t.shape:
            raise ValueError(
                f"Shape mismatch: `{jac_name}[{i}]` has shape {tuple(j.shape)} but `{tensor_name}[{i}]` has "
                f"shape {tuple(t.shape)}. It should have shape {row_shape(t.shape)}: one leading row "
                "dimension followed by the tensor's shape."
            )
        if m is None:
            m = j.shape[0]
        elif j.shape[0] != m:
            raise ValueError(
                f"All Jacobians in `{jac_name}` should have the same number of rows. `{jac_name}[0]` "
                f"has {m}, `{jac_name}[{i}]` has {j.shape[0]}."
            )
    return 0 if m is None else m


def row_shape(shape: tuple[int, ...] | torch.Size) -> str:
    """``"[m, 3, 4]"`` for a tensor of shape ``(3, 4)``: the expected shape of its Jacobian."""
    return "[" + ", ".join(["m", *map(str, shape)]) + "]"
