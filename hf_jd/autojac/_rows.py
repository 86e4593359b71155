r"""Row-wise computation of Jacobians by reverse-mode differentiation.

For outputs :math:`f(\theta) \in \mathbb{R}^m` (all output tensors flattened and concatenated, in
order) and an input :math:`\theta`, the Jacobian is :math:`J_{ij} = \partial f_i / \partial \theta_j`.
Row :math:`i` is the vector-Jacobian product :math:`e_i^\top J`, i.e. one backward pass seeded with the
:math:`i`-th identity row. More generally, seeding with the rows of a matrix :math:`V \in
\mathbb{R}^{m' \times m}` (``jac_outputs``) gives :math:`V J`, which is how Jacobians are chained.

Rows are computed ``chunk_size`` at a time. A chunk of several rows is one batched backward
(``torch.autograd.grad(..., is_grads_batched=True)``, which vmaps the backward pass); a chunk of one
row is a plain ``torch.autograd.grad`` call, so ``chunk_size=1`` never uses vmap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

_VMAP_HINT = (
    "Batched backward (torch.autograd.grad with is_grads_batched=True, i.e. torch.vmap over the "
    "backward pass) failed while computing {rows} Jacobian rows at once. Some operations do not "
    "support it: torch.compile'd models, RNNs on cuDNN, custom autograd Functions with data-dependent "
    "control flow or .item() calls in their backward, and some ops without a batching rule. Set "
    "`parallel_chunk_size=1` to compute the rows one at a time with plain torch.autograd.grad. "
    "Original error: {error}"
)

_DONATED_BUFFER_HINT = (
    "A torch.compile'd backward refused to run with retain_graph=True, which computing several "
    "Jacobian rows from one forward pass needs (each row is one backward through the same graph). "
    "Set `torch._functorch.config.donated_buffer = False` (import torch._functorch.config) before "
    "the first call of the compiled model. Kernels compiled earlier with donated buffers may be "
    "served from Inductor's on-disk cache and silently give wrong rows after the first: use a fresh "
    "cache (TORCHINDUCTOR_CACHE_DIR) or TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 when switching. "
    "Original error: {error}"
)


class BatchedBackwardError(RuntimeError):
    """A batched backward (``vmap`` over the backward pass) failed on an op or a backward function without
    batching support; computing the rows one by one (``parallel_chunk_size=1``) does not use ``vmap``.

    When the graph of the outputs was retained (``retain_graph=True``), it is intact after this error: the
    same rows can be computed again one by one."""


def _identity_rows(
    outputs: Sequence[Tensor], offsets: Sequence[int], start: int, stop: int
) -> tuple[list[int], list[Tensor]]:
    """Rows ``start:stop`` of the identity ``I_m``, split into one ``[stop - start, *shape]`` block per output.

    Outputs with no row in the chunk are left out (their seed would be all zeros); the returned list
    of indices says which outputs the seeds belong to.
    """
    size = stop - start
    indices: list[int] = []
    seeds: list[Tensor] = []
    for k, output in enumerate(outputs):
        first, last = max(offsets[k], start), min(offsets[k] + output.numel(), stop)
        if first >= last:
            continue
        seed = torch.zeros((size, output.numel()), dtype=output.dtype, device=output.device)
        rows = torch.arange(first - start, last - start, device=output.device)
        seed[rows, rows + (start - offsets[k])] = 1
        indices.append(k)
        seeds.append(seed.view(size, *output.shape))
    return indices, seeds


def _vjp_chunk(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    seeds: Sequence[Tensor],
    retain_graph: bool,
) -> list[Tensor | None]:
    """Vector-Jacobian products for a chunk of ``c`` seed rows; each result is ``[c, *input.shape]``.

    ``None`` marks an input that the outputs do not depend on.
    """
    size = seeds[0].shape[0]
    if size == 1:
        grad_outputs = [s[0] for s in seeds]
        try:
            grads = torch.autograd.grad(
                outputs, inputs, grad_outputs=grad_outputs, retain_graph=retain_graph, allow_unused=True
            )
        except RuntimeError as error:
            if "donated buffer" in str(error):
                raise RuntimeError(_DONATED_BUFFER_HINT.format(error=error)) from error
            raise
        return [None if g is None else _unaliased(g, grad_outputs).unsqueeze(0) for g in grads]
    try:
        grads = torch.autograd.grad(
            outputs,
            inputs,
            grad_outputs=list(seeds),
            retain_graph=retain_graph,
            allow_unused=True,
            is_grads_batched=True,
        )
    except RuntimeError as error:
        if "second time" in str(error):  # a freed graph, not a vmap limitation
            raise
        raise BatchedBackwardError(_VMAP_HINT.format(rows=size, error=error)) from error
    return [None if g is None else _unaliased(g, seeds) for g in grads]


def _unaliased(grad: Tensor, seeds: Sequence[Tensor]) -> Tensor:
    """Copy ``grad`` when autograd returned one of the seeds itself (an output that is an input).

    The result may be stored in ``.jac`` and accumulated into in place later; it must not share
    memory with a tensor the caller passed in.
    """
    return grad.clone() if any(grad is s for s in seeds) else grad


def compute_jacobians(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    jac_outputs: Sequence[Tensor] | None,
    *,
    retain_graph: bool,
    chunk_size: int | None,
) -> tuple[Tensor, ...]:
    r"""Jacobians of ``outputs`` w.r.t. each of ``inputs``, each of shape ``[m, *input.shape]``.

    With ``jac_outputs=None`` the seed is the identity: :math:`m = \sum_k \mathrm{numel}(outputs_k)`
    and row :math:`i` holds :math:`\partial f_i / \partial \theta` for the :math:`i`-th element of the
    flattened, concatenated outputs. Otherwise ``jac_outputs[k]`` (shape ``[m, *outputs[k].shape]``)
    left-multiplies the Jacobian (chain rule). Inputs the outputs do not depend on get zero rows.
    Contributions of an input used several times in the graph are summed by autograd.

    Args:
        outputs: Tensors to differentiate (all require grad).
        inputs: Distinct tensors to differentiate with respect to (all require grad).
        jac_outputs: Seeds, validated by the caller, or ``None`` for the identity.
        retain_graph: Keep the graph after the last chunk (earlier chunks always keep it).
        chunk_size: Rows per backward pass; ``None`` for all rows at once, ``1`` for a plain loop.
    """
    if jac_outputs is None:
        offsets = [0]
        for output in outputs[:-1]:
            offsets.append(offsets[-1] + output.numel())
        m = offsets[-1] + outputs[-1].numel()
    else:
        m = jac_outputs[0].shape[0]

    if len(inputs) == 0:
        return ()
    if m == 0:
        return tuple(torch.zeros((0, *x.shape), dtype=x.dtype, device=x.device) for x in inputs)

    step = m if chunk_size is None else min(chunk_size, m)
    n_chunks = math.ceil(m / step)
    results: list[Tensor] | None = None
    for c in range(n_chunks):
        start, stop = c * step, min((c + 1) * step, m)
        if jac_outputs is None:
            indices, seeds = _identity_rows(outputs, offsets, start, stop)
            chunk_outputs = [outputs[k] for k in indices]
        else:
            chunk_outputs, seeds = list(outputs), [j[start:stop] for j in jac_outputs]
        keep = retain_graph or c < n_chunks - 1
        grads = _vjp_chunk(chunk_outputs, inputs, seeds, keep)
        if n_chunks == 1:
            return tuple(
                torch.zeros((m, *x.shape), dtype=x.dtype, device=x.device) if g is None else g
                for g, x in zip(grads, inputs)
            )
        if results is None:
            results = [torch.empty((m, *x.shape), dtype=x.dtype, device=x.device) for x in inputs]
        for result, g in zip(results, grads):
            if g is None:
                result[start:stop].zero_()
            else:
                result[start:stop] = g
    assert results is not None
    return tuple(results)
