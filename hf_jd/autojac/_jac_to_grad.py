"""``jac_to_grad``: aggregation of ``.jac`` fields into ``.grad`` (API of TorchJD's ``jac_to_grad``)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from .._tensors import accumulation_dtype, gramian_of_blocks
from ..aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator
from ._accumulation import accumulate_grads, has_jac
from ._checks import as_tensor_tuple, unique


def jac_to_grad(
    tensors: Iterable[Tensor],
    aggregator: Aggregator,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
) -> Tensor | None:
    r"""Aggregate the ``.jac`` fields of ``tensors`` into their ``.grad`` fields.

    The tensors' Jacobians :math:`J_p \in \mathbb{R}^{m \times n_p}` (``p.jac`` flattened after the
    first dimension) form the Jacobian :math:`J = [J_1 \cdots J_P] \in \mathbb{R}^{m \times n}`; the
    aggregator maps it to an update :math:`A(J) \in \mathbb{R}^n` whose block for ``p`` is added to
    ``p.grad`` (created when ``None``).

    When ``aggregator`` is a :class:`~hf_jd.aggregation.GramianWeightedAggregator`
    (:math:`A(J) = J^\top W(J J^\top)`, e.g. UPGrad or Mean), :math:`J` is never concatenated: the
    Gramian is summed over the tensors, :math:`G = \sum_p J_p J_p^\top` (accumulated in at least
    float32), the weights are :math:`w = W(G)`, and ``p.grad += w @ J_p`` — the same result without a
    second copy of :math:`J` in memory. (An aggregator with forward hooks registered on it or on its
    ``weighting`` takes the concatenation path instead, so that these hooks run; hooks on its
    ``gramian_weighting`` run on both paths.) Other aggregators receive the concatenated :math:`J` and
    their result is split back per tensor.

    The API follows TorchJD (``torchjd.autojac.jac_to_grad``; Quinton & Rey, arXiv:2406.16232).

    Args:
        tensors: The tensors (typically ``model.parameters()``) whose ``.jac`` to aggregate; every
            one requiring grad must hold a ``.jac`` with the same number of rows ``m``. Tensors that
            do not require grad and hold no ``.jac`` (frozen parameters) are skipped; one that holds a
            ``.jac`` but does not require grad is an error (it cannot hold a ``.grad``), as in TorchJD.
        aggregator: The aggregator, from :mod:`hf_jd.aggregation`.
        retain_jac: Keep the ``.jac`` fields; by default they are deleted (as ``zero_grad`` would),
            so the next :func:`~hf_jd.autojac.backward` starts afresh.
        optimize_gramian_computation: TorchJD's switch for the per-block Gramian path. Accepted so that
            TorchJD code runs unchanged; hf_jd always takes that path for Gramian-weighted aggregators
            (the result is the same either way). As in TorchJD, ``True`` with an aggregator that is not
            a ``GramianWeightedAggregator`` is an error.

    Returns:
        The weights :math:`w` (shape ``[m]``) when the aggregator is a ``WeightedAggregator`` with a
        ``weighting`` (every ``GramianWeightedAggregator``, ExcessMTL), as its ``weighting`` and the
        hooks registered on it give them; else ``None``.

    Non-finite values in the Jacobians are passed on to the aggregator, which decides: UPGrad raises
    a clear error, Mean lets them reach ``.grad`` (so that an fp16 grad scaler can skip the step).
    """
    if not isinstance(aggregator, Aggregator):
        raise TypeError(
            "`aggregator` should be an hf_jd.aggregation.Aggregator (for instance UPGrad() or Mean()), "
            f"got {type(aggregator).__name__}."
        )
    if optimize_gramian_computation and not isinstance(aggregator, GramianWeightedAggregator):
        raise ValueError(
            f"`optimize_gramian_computation=True` needs a GramianWeightedAggregator (weights from J @ J.T), "
            f"but {aggregator!r} is not one; leave it False."
        )
    candidates = unique(as_tensor_tuple(tensors, "tensors"))
    params = [t for t in candidates if has_jac(t) or t.requires_grad]
    if len(params) == 0:
        raise ValueError(
            "`tensors` cannot be empty: pass the tensors whose `.jac` fields to aggregate (for instance "
            "model.parameters())."
        )
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(
                f"Tensor {i} of `tensors` (shape {tuple(p.shape)}) holds a `.jac` but does not require grad, "
                "so it cannot receive a `.grad`. Leave it out of `tensors`, or call `.requires_grad_()` on it."
            )
        if not has_jac(p):
            raise ValueError(
                f"Tensor {i} of `tensors` (shape {tuple(p.shape)}) has no `.jac` field. Call "
                "`hf_jd.autojac.backward(losses)` or `hf_jd.autojac.mtl_backward(...)` before "
                "`jac_to_grad`; if this parameter is not used by the losses, leave it out of `tensors` "
                "or pass it in `inputs=` of `backward` (it then gets a zero Jacobian)."
            )
    jacobians: list[Tensor] = [p.jac for p in params]  # type: ignore[attr-defined]
    m = jacobians[0].shape[0]
    for i, (p, j) in enumerate(zip(params, jacobians)):
        if j.dim() == 0 or j.shape[0] != m or j.shape[1:] != p.shape:
            raise ValueError(
                f"All `.jac` fields should have shape [m, *tensor.shape] with the same m: tensor 0 has "
                f"{m} rows, tensor {i} (shape {tuple(p.shape)}) has a `.jac` of shape {tuple(j.shape)}. "
                "Were they filled by different backward calls on different losses?"
            )
    if not retain_jac:
        # Freed before aggregating (as zero_grad would): a failing aggregator leaves no stale `.jac`
        # to be summed into the next step's.
        for p in params:
            del p.jac  # type: ignore[attr-defined]

    weights: Tensor | None
    if isinstance(aggregator, GramianWeightedAggregator) and not _has_hooks(aggregator):
        gradients, weights = _gramian_path(aggregator, jacobians)
    else:
        gradients, weights = _concatenation_path(aggregator, jacobians)
    accumulate_grads(params, gradients)
    return weights


def _has_hooks(aggregator: GramianWeightedAggregator) -> bool:
    """Hooks that only the concatenation path runs: on the aggregator or on its ``weighting`` (``J ↦ w``)."""
    return any(
        bool(m._forward_hooks) or bool(m._forward_pre_hooks) for m in (aggregator, aggregator.weighting)
    )


def _gramian_path(
    aggregator: GramianWeightedAggregator, jacobians: Sequence[Tensor]
) -> tuple[list[Tensor], Tensor]:
    r""":math:`G = \sum_p J_p J_p^\top`, :math:`w = W(G)`, :math:`g_p = w^\top J_p`, one tensor at a time."""
    gramian = gramian_of_blocks(jacobians, accumulation_dtype(jacobians[0].dtype))
    weights = aggregator.gramian_weighting(gramian)
    gradients = [torch.tensordot(weights.to(j.dtype), j, dims=1) for j in jacobians]
    return gradients, weights


def _concatenation_path(
    aggregator: Aggregator, jacobians: Sequence[Tensor]
) -> tuple[list[Tensor], Tensor | None]:
    """Aggregate the concatenated Jacobian ``[J_1 ... J_P]`` and split the result back per tensor."""
    m = jacobians[0].shape[0]
    matrix = torch.cat([j.reshape(m, -1) for j in jacobians], dim=1)
    captured: list[Tensor] = []
    handle = None
    weighting = getattr(aggregator, "weighting", None) if isinstance(aggregator, WeightedAggregator) else None
    if isinstance(weighting, torch.nn.Module):
        # Registered last, so it sees the weights as the hooks registered by the user left them.
        handle = weighting.register_forward_hook(lambda _module, _args, output: captured.append(output))
    try:
        vector = aggregator(matrix)
    finally:
        if handle is not None:
            handle.remove()
    if vector.shape != (matrix.shape[1],):
        raise ValueError(
            f"{aggregator!r} returned a tensor of shape {tuple(vector.shape)} for a Jacobian of shape "
            f"{tuple(matrix.shape)}; an aggregator should return a vector of shape [{matrix.shape[1]}]."
        )
    pieces = torch.split(vector, [math.prod(j.shape[1:]) for j in jacobians])
    gradients = [piece.view(j.shape[1:]).to(j.dtype) for piece, j in zip(pieces, jacobians)]
    return gradients, (captured[-1] if captured else None)
