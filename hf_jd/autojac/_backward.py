"""``backward``: Jacobians accumulated into ``.jac`` fields (API of TorchJD's ``torchjd.autojac.backward``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor

from ._accumulation import accumulate_jacs, check_jac_rows
from ._checks import (
    as_tensor_tuple,
    check_accumulable,
    check_chunk_size,
    check_jacobians_match,
    check_non_empty,
    check_require_grad,
    unique,
)
from ._graph import find_leaves
from ._rows import compute_jacobians


def backward(
    tensors: Sequence[Tensor] | Tensor,
    *,
    jac_tensors: Sequence[Tensor] | Tensor | None = None,
    inputs: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> None:
    r"""Accumulate the Jacobian of ``tensors`` into the ``.jac`` field of each input.

    The Jacobian-descent analogue of ``loss.backward()``. With :math:`f \in \mathbb{R}^m` the
    elements of ``tensors`` flattened and concatenated in order (typically a vector of ``m``
    per-example or per-task losses), each input :math:`\theta` receives
    :math:`J_{ij} = \partial f_i / \partial \theta_j` with shape ``[m, *theta.shape]``, added to
    ``theta.jac`` when it exists (like ``.grad``, ``.jac`` is summed across calls; the row counts must
    then match). Then call :func:`~hf_jd.autojac.jac_to_grad` to aggregate ``.jac`` into ``.grad``.

    The API follows TorchJD (``torchjd.autojac.backward``; Quinton & Rey, arXiv:2406.16232).

    Args:
        tensors: The tensor or tensors to differentiate; non-empty, each requiring grad.
        jac_tensors: Optional seeds, one per tensor, of shape ``[m', *tensors[k].shape]`` (all with
            the same ``m'``), left-multiplying the Jacobian (chain rule); ``None`` means the
            identity.
        inputs: The tensors whose ``.jac`` to fill: leaves requiring grad, or tensors that called
            ``retain_grad()``. Default: every leaf requiring grad that ``tensors`` depend on, found
            by walking the autograd graph. Inputs the tensors do not depend on get zero rows.
        retain_graph: Keep the autograd graph after the computation.
        parallel_chunk_size: Rows computed per backward pass. ``None``: all at once (one batched
            backward); ``1``: one plain ``torch.autograd.grad`` per row, without vmap — use it for
            cuDNN RNNs, ops without batching support, and torch.compile'd models (these also need
            ``torch._functorch.config.donated_buffer = False`` set before their first call, since
            every row is one more backward through the same graph).

    Example:
        >>> import torch
        >>> from hf_jd.autojac import backward
        >>> param = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> backward([torch.tensor([-1.0, 1.0]) @ param, (param**2).sum()])
        >>> param.jac
        tensor([[-1.,  1.],
                [ 2.,  4.]])
    """
    check_chunk_size(parallel_chunk_size)
    tensors_ = as_tensor_tuple(tensors, "tensors")
    check_non_empty(tensors_, "tensors")
    check_require_grad(tensors_, "tensors")
    if inputs is None:
        inputs_ = find_leaves(tensors_)
    else:
        inputs_ = unique(as_tensor_tuple(inputs, "inputs"))
        check_accumulable(inputs_, "inputs", ".jac")
    if jac_tensors is None:
        seeds = None
        m = sum(t.numel() for t in tensors_)
    else:
        seeds = as_tensor_tuple(jac_tensors, "jac_tensors")
        m = check_jacobians_match(seeds, tensors_, "jac_tensors", "tensors")
    check_jac_rows(inputs_, m)

    jacobians = compute_jacobians(
        tensors_, inputs_, seeds, retain_graph=retain_graph, chunk_size=parallel_chunk_size
    )
    accumulate_jacs(inputs_, jacobians)
