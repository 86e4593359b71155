"""``mtl_backward``: multi-task backward (API of TorchJD's ``torchjd.autojac.mtl_backward``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ._accumulation import accumulate_grads, accumulate_jacs, check_jac_rows
from ._checks import (
    as_tensor_tuple,
    check_accumulable,
    check_chunk_size,
    check_non_empty,
    check_require_grad,
    unique,
)
from ._graph import find_leaves
from ._rows import compute_jacobians


def mtl_backward(
    tensors: Sequence[Tensor],
    features: Sequence[Tensor] | Tensor,
    *,
    grad_tensors: Sequence[Tensor] | None = None,
    tasks_params: Sequence[Iterable[Tensor]] | None = None,
    shared_params: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
) -> None:
    r"""Backward for multi-task learning: plain gradients for the heads, a Jacobian for the trunk.

    A shared feature extractor :math:`z = h(\theta_s)` (``features``) feeds ``k`` task heads with
    losses :math:`\ell_t(z, \theta_t)` (``tensors``). This function

    1. adds :math:`\partial \ell_t / \partial \theta_t` to ``.grad`` of each task's parameters
       (summed over the tasks that share a parameter), and
    2. adds to ``.jac`` of each shared parameter the Jacobian with one row per task,
       :math:`J_{t,j} = \partial \ell_t / \partial \theta_{s,j}`, of shape ``[k, *param.shape]``.

    Step 2 uses the chain rule: the ``k`` gradients :math:`\partial \ell_t / \partial z` from step 1
    are stacked into ``[k, *z.shape]`` seeds and pushed through the extractor in one batched backward
    (``parallel_chunk_size`` rows at a time), so the trunk is traversed once rather than ``k`` times.
    Follow with :func:`~hf_jd.autojac.jac_to_grad` on the shared parameters.

    The API follows TorchJD (``torchjd.autojac.mtl_backward``; Quinton & Rey, arXiv:2406.16232).

    Args:
        tensors: One tensor per task, typically the scalar task losses; non-empty.
        features: The last shared representation(s), from which every task branches off.
        grad_tensors: Gradients to seed each task tensor with (same shapes as ``tensors``); required
            when a task tensor is not a scalar, defaults to 1 for scalars.
        tasks_params: Per task, the task-specific parameters to fill ``.grad`` of. Default: the leaves
            requiring grad that the task tensor depends on without going through ``features``.
        shared_params: The shared parameters to fill ``.jac`` of. Default: the leaves requiring grad
            that ``features`` depend on. Must not overlap with ``tasks_params``.
        retain_graph: Keep the extractor's graph after the computation.
        parallel_chunk_size: Rows (tasks) per backward pass through the extractor. ``None``: all at
            once; ``1``: one plain ``torch.autograd.grad`` per task, without vmap (see
            :func:`~hf_jd.autojac.backward`).
    """
    check_chunk_size(parallel_chunk_size)
    tensors_ = as_tensor_tuple(tensors, "tensors")
    check_non_empty(tensors_, "tensors")
    check_require_grad(tensors_, "tensors")
    features_ = unique(as_tensor_tuple(features, "features"))
    check_non_empty(features_, "features")
    check_require_grad(features_, "features")

    seeds = _task_seeds(tensors_, grad_tensors)

    if tasks_params is None:
        tasks_params_ = [find_leaves([t], excluded=features_) for t in tensors_]
    else:
        tasks_params_ = [unique(as_tensor_tuple(p, f"tasks_params[{i}]")) for i, p in enumerate(tasks_params)]
        if len(tasks_params_) != len(tensors_):
            raise ValueError(
                f"`tasks_params` should hold one collection of parameters per task: got "
                f"{len(tasks_params_)} for {len(tensors_)} tensors."
            )
        for i, params in enumerate(tasks_params_):
            check_accumulable(params, f"tasks_params[{i}]", ".grad")
    if shared_params is None:
        shared_params_ = find_leaves(features_)
    else:
        shared_params_ = unique(as_tensor_tuple(shared_params, "shared_params"))
        check_accumulable(shared_params_, "shared_params", ".jac")
    _check_no_overlap(tasks_params_, shared_params_, defaults=tasks_params is None and shared_params is None)
    check_jac_rows(shared_params_, len(tensors_))

    # Step 1: per task, the gradient w.r.t. its own parameters (into .grad) and w.r.t. the features
    # (a row of the Jacobian w.r.t. the features). The graph is kept: step 2 goes through it again.
    rows: list[list[Tensor]] = [[] for _ in features_]
    for tensor, seed, params in zip(tensors_, seeds, tasks_params_):
        targets = (*params, *features_)
        grads = torch.autograd.grad(tensor, targets, grad_outputs=seed, retain_graph=True, allow_unused=True)
        grads = tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, targets))
        accumulate_grads(params, grads[: len(params)])
        for row, g in zip(rows, grads[len(params) :]):
            row.append(g)

    # Step 2: chain rule through the extractor, seeded by the [k, *feature.shape] stacked rows.
    if len(shared_params_) == 0:
        return
    jac_features = [torch.stack(row) for row in rows]
    jacobians = compute_jacobians(
        features_, shared_params_, jac_features, retain_graph=retain_graph, chunk_size=parallel_chunk_size
    )
    accumulate_jacs(shared_params_, jacobians)


def _task_seeds(tensors: Sequence[Tensor], grad_tensors: Sequence[Tensor] | None) -> list[Tensor]:
    """Gradient seeds for the task tensors: ``grad_tensors`` checked, or ones for scalars."""
    if grad_tensors is None:
        for i, t in enumerate(tensors):
            if t.dim() != 0:
                raise ValueError(
                    f"`tensors[{i}]` has shape {tuple(t.shape)}, but without `grad_tensors` each task "
                    "tensor should be a scalar (the task loss). Reduce it to a scalar (e.g. .mean()) or "
                    "pass `grad_tensors` with one gradient of the same shape per task tensor."
                )
        return [torch.ones_like(t) for t in tensors]
    grads = as_tensor_tuple(grad_tensors, "grad_tensors")
    if len(grads) != len(tensors):
        raise ValueError(
            f"`grad_tensors` should have the same length as `tensors`. (got {len(grads)} and {len(tensors)}) "
            "Give one gradient per task tensor."
        )
    for i, (g, t) in enumerate(zip(grads, tensors)):
        if g.shape != t.shape:
            raise ValueError(
                f"Shape mismatch: `grad_tensors[{i}]` has shape {tuple(g.shape)} but `tensors[{i}]` has shape "
                f"{tuple(t.shape)}. They should match."
            )
    return list(grads)


def _check_no_overlap(
    tasks_params: Sequence[Sequence[Tensor]], shared_params: Sequence[Tensor], defaults: bool
) -> None:
    shared = {id(p) for p in shared_params}
    for i, params in enumerate(tasks_params):
        for p in params:
            if id(p) in shared:
                hint = (
                    " This parameter is used both before and after the features (tied weights?); "
                    "pass `tasks_params` and `shared_params` explicitly."
                    if defaults
                    else ""
                )
                raise ValueError(
                    f"A parameter of shape {tuple(p.shape)} is both in `tasks_params[{i}]` and in "
                    f"`shared_params`: a parameter gets either a gradient (task-specific) or a "
                    f"Jacobian row per task (shared), not both.{hint}"
                )
