"""``jac``: Jacobians returned as values (API of TorchJD's ``torchjd.autojac.jac``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._checks import (
    as_tensor_tuple,
    check_chunk_size,
    check_differentiable_inputs,
    check_jacobians_match,
    check_non_empty,
    check_require_grad,
    unique,
)
from ._rows import compute_jacobians


def jac(
    outputs: Sequence[Tensor] | Tensor,
    inputs: Sequence[Tensor] | Tensor,
    *,
    jac_outputs: Sequence[Tensor] | Tensor | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> tuple[Tensor, ...]:
    r"""Jacobians of ``outputs`` with respect to each of ``inputs``.

    Let :math:`f \in \mathbb{R}^m` be all elements of ``outputs`` flattened and concatenated in
    order (so :math:`m` is their total number of elements). For each input :math:`\theta` the result
    is the Jacobian :math:`J_{ij} = \partial f_i / \partial \theta_j`, returned with shape
    ``[m, *theta.shape]``: row ``i`` is the gradient of the ``i``-th output element. With
    ``jac_outputs`` (matrices :math:`V_k` of shape ``[m', *outputs[k].shape]``) the result is instead
    :math:`\sum_k V_k J^{(k)}`, the chain rule through ``outputs`` (shape ``[m', *theta.shape]``).

    The API follows TorchJD (``torchjd.autojac.jac``; Quinton & Rey, *Jacobian Descent for
    Multi-Objective Optimization*, arXiv:2406.16232).

    Args:
        outputs: The tensor or tensors to differentiate; non-empty, each requiring grad.
        inputs: The tensor or tensors to differentiate with respect to; each must require grad (leaf
            parameters or intermediate tensors). Repeated inputs get repeated (identical) results.
        jac_outputs: Optional seeds, one per output, all with the same number of rows ``m'``;
            ``None`` means the identity (the plain Jacobian).
        retain_graph: Keep the autograd graph after the computation.
        parallel_chunk_size: Rows computed per backward pass. ``None``: all at once (one batched
            backward); ``1``: one plain ``torch.autograd.grad`` per row, without vmap — use it for
            cuDNN RNNs, ops without batching support, and torch.compile'd models (these also need
            ``torch._functorch.config.donated_buffer = False`` set before their first call, since
            every row is one more backward through the same graph).

    Returns:
        One Jacobian per entry of ``inputs``, in order. Inputs the outputs do not depend on get a
        zero Jacobian.

    Example:
        >>> import torch
        >>> from hf_jd.autojac import jac
        >>> param = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> y1 = torch.tensor([-1.0, 1.0]) @ param
        >>> y2 = (param**2).sum()
        >>> jac([y1, y2], param)
        (tensor([[-1.,  1.],
                [ 2.,  4.]]),)
    """
    check_chunk_size(parallel_chunk_size)
    outputs_ = as_tensor_tuple(outputs, "outputs")
    check_non_empty(outputs_, "outputs")
    check_require_grad(outputs_, "outputs")
    inputs_ = as_tensor_tuple(inputs, "inputs")
    check_differentiable_inputs(inputs_, "inputs")
    seeds = None
    if jac_outputs is not None:
        seeds = as_tensor_tuple(jac_outputs, "jac_outputs")
        check_jacobians_match(seeds, outputs_, "jac_outputs", "outputs")

    distinct = unique(inputs_)
    jacobians = compute_jacobians(
        outputs_, distinct, seeds, retain_graph=retain_graph, chunk_size=parallel_chunk_size
    )
    by_id = {id(x): j for x, j in zip(distinct, jacobians)}
    return tuple(by_id[id(x)] for x in inputs_)
