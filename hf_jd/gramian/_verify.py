r"""Exactness self-check of the Gramian engine against plain autograd.

The engine's rules are exact under two assumptions: loss :math:`i` depends on example :math:`i` only
(per-example objectives), and every hooked module is one the rules understand. A loss that mixes
examples (in-batch negatives, a contrastive or listwise loss, batch statistics) breaks the first
assumption *without any error*: the engine then returns the Gramian of
:math:`\partial(\sum_j L_j)/\partial\theta` restricted to each example's path, not of :math:`J`.

The check takes a few rows :math:`R` (first, middle, last) and compares the sub-block :math:`G_{RR}`
of the engine's Gramian with :math:`[\langle g_a, g_b\rangle]_{a,b\in R}`,
:math:`g_a = \partial L_a/\partial\theta`, computed by plain ``torch.autograd.grad`` (exact, no
assumption), relative to the largest diagonal entry.

Memory. The reference never materialises a full gradient :math:`g_a`. Each backward pass
back-propagates one cotangent :math:`c` through the step's own graph (``retain_graph=True``: the
engine's backward runs on it next, so nothing is kept that the step does not keep anyway) and a hook
on every parameter reduces that parameter's gradient to :math:`\lVert \partial(c^\top L)/\partial p
\rVert^2` (float64) as soon as autograd produces it; the hook hands autograd back stride-0 zeros, so
the gradient is freed at once. A parameter used more than once (a tied input/output embedding) is
reduced from its contributions instead, taken out of autograd at the nodes that produce them: the
first is kept until the last arrives, and the squared norm of their sum is accumulated slice by slice
(autograd would hold both and build their sum, a third parameter-sized buffer). Besides the
backward's own buffers, one parameter's gradient (or contributions) is alive at a time: the extra
memory is of the order of the largest parameter, not of the model. The gradients are taken before
``AccumulateGrad``: ``.grad`` is never written and DDP's reducer hooks do not fire.

What remains is what one plain backward through the retained graph needs on top of the forward's
activations, which the step holds until the engine's own backward: on a language model, the
vocabulary-sized gradients of the logits and the ``[V, H]`` gradients of the embedding. The stock
step frees the activations as its backward goes, so on its first step the check still costs more
than a stock step by about that amount (``benchmarks/bench_first_step.py``).

Squared norms give the inner products by polarisation: with the cotangents :math:`e_a` (one per
row) and :math:`e_a + e_b` (one per pair),

.. math::

   \langle g_a, g_b\rangle = \tfrac12\big(\lVert g_a + g_b\rVert^2 - \lVert g_a\rVert^2 -
   \lVert g_b\rVert^2\big), \qquad g_a + g_b = \partial(L_a + L_b)/\partial\theta,

summed over parameters (per parameter first, since per-task checks keep only the shared ones). That
is :math:`k(k+1)/2` backward passes for :math:`k` rows (6 for the default 3) instead of :math:`k`:
back-propagating the :math:`k` rows at once (``vmap``) would also avoid holding :math:`k` gradients,
but multiplies every buffer of the backward by :math:`k` — on a language model the vocabulary-sized
logit gradients and the ``[V, H]`` embedding gradient — which costs more peak memory than the
extra passes save in time. Rounding: each squared norm is accumulated in float64 from the gradient's
own precision; the error of an inner product is a few units of that precision times the largest
squared norm, far below the tolerances.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node

from ._errors import GramianEngineError
from ._torch_ops import leaf_variable, next_functions

#: Relative tolerance of the check, full precision / half-precision (fp16, bf16) computations.
FULL_PRECISION_TOLERANCE = 1e-3
HALF_PRECISION_TOLERANCE = 5e-2
_HALF = (torch.float16, torch.bfloat16)
#: Elements converted to float64 at a time by the reference's squared norms (2 MiB of float64: the
#: conversion stays in cache on a CPU; larger slices on accelerators, where launches cost more).
_CPU_SLICE = 2**18
_DEVICE_SLICE = 2**22


class GramianMismatchError(GramianEngineError):
    """The engine's Gramian differs from row-by-row autograd: its assumptions do not hold for this model/loss."""


def default_rows(m: int, count: int = 3) -> list[int]:
    """Up to ``count`` distinct rows spread over ``[0, m)``: first, middle, last."""
    return sorted({0, m // 2, m - 1})[:count] if m > 0 else []


def reference_passes(count: int) -> list[tuple[int, int]]:
    """The backward passes of :func:`reference_norms` for ``count`` rows: ``(a, a)`` back-propagates
    :math:`e_a`, ``(a, b)`` with ``a < b`` back-propagates :math:`e_a + e_b` (rows by position in ``rows``)."""
    return [(a, a) for a in range(count)] + [(a, b) for a in range(count) for b in range(a + 1, count)]


def squared_norm_of_sum(parts: Sequence[Tensor]) -> Tensor:
    """``‖Σ parts‖²`` accumulated in float64, a cache-sized slice of leading rows at a time: no float64
    copy of a whole gradient and no copy at all of a non-contiguous one (a transposed weight gradient).
    Sparse parts (``nn.Embedding(sparse=True)``) are summed and their coalesced values used."""
    if any(part.layout != torch.strided for part in parts):
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        parts = [total.coalesce().values() if total.layout != torch.strided else total]
    first = parts[0]
    device = first.device
    result = torch.zeros((), dtype=torch.float64, device=device)
    if first.dim() == 0:
        value = sum(
            (part.to(torch.float64) for part in parts), torch.zeros((), dtype=torch.float64, device=device)
        )
        return result + value * value
    row = max(1, first[0].numel()) if first.shape[0] else 1
    step = max(1, (_CPU_SLICE if device.type == "cpu" else _DEVICE_SLICE) // row)
    for start in range(0, first.shape[0], step):
        chunk = parts[0][start : start + step].to(torch.float64)
        for part in parts[1:]:
            chunk = chunk + part[start : start + step]
        flat = chunk.reshape(-1)  # contiguous float64: a view
        result += torch.dot(flat, flat)
    return result


def _has_tensor_hooks(param: Tensor) -> bool:
    """Whether ``param`` carries ``register_hook`` hooks (torch keeps them in ``_backward_hooks``, ``None``
    until the first one); when that cannot be read, assume it does."""
    if not hasattr(param, "_backward_hooks"):
        return True
    return bool(param._backward_hooks)


def feeding_edges(losses: Tensor, params: Sequence[nn.Parameter]) -> dict[int, list[tuple[Node, int]]]:
    """For each parameter (by position) used more than once by the graph of ``losses`` — a tied embedding,
    a layer applied twice — the ``(node, output slot)`` edges that feed its ``AccumulateGrad`` node."""
    position = {id(param): index for index, param in enumerate(params)}
    edges: dict[int, list[tuple[Node, int]]] = {}
    seen: set[Node] = set()
    stack = [losses.grad_fn] if losses.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for slot, (child, _) in enumerate(next_functions(node)):
            if child is None:
                continue
            variable = leaf_variable(child)
            if variable is not None and id(variable) in position:
                edges.setdefault(position[id(variable)], []).append((node, slot))
            stack.append(child)
    return {index: found for index, found in edges.items() if len(found) > 1}


class _PassNorms:
    """The squared norms of one parameter's gradient per pass, reduced as the gradient is produced."""

    def __init__(self, params: Sequence[nn.Parameter], passes: int) -> None:
        self.passes = passes
        self.norms: list[Tensor | None] = [None] * len(params)
        self.index = 0
        #: Multi-use parameters: the contributions received this pass, and how many edges feed each.
        self.pending: dict[int, list[Tensor]] = {}
        self.expected: dict[int, int] = {}

    def add(self, position: int, parts: Sequence[Tensor]) -> None:
        vector = self.norms[position]
        if vector is None:
            vector = self.norms[position] = torch.zeros(
                self.passes, dtype=torch.float64, device=parts[0].device
            )
        vector[self.index] += squared_norm_of_sum(parts)

    def param_hook(self, position: int) -> Callable[[Tensor], Tensor]:
        """A tensor hook: reduce the (summed) gradient, hand autograd stride-0 zeros in its place."""

        def hook(grad: Tensor) -> Tensor:
            self.add(position, [grad])
            if grad.layout == torch.strided:
                return grad.new_zeros(()).expand(grad.shape)  # no storage: autograd keeps nothing
            return torch.zeros_like(grad)  # sparse, no stored entries

        return hook

    def node_hook(self, slots: list[tuple[int, int]]) -> Callable[..., tuple[Tensor | None, ...]]:
        """A post hook on a node feeding multi-use parameters: take each contribution out of autograd
        (``None`` in its slot, so autograd never sums it into a buffer of its own) and reduce the sum of
        a parameter's contributions once the last one has arrived."""

        def hook(
            grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...]
        ) -> tuple[Tensor | None, ...]:
            del grad_outputs
            taken = list(grad_inputs)
            for slot, position in slots:
                grad = taken[slot]
                if grad is None:
                    continue
                taken[slot] = None
                parts = self.pending.setdefault(position, [])
                parts.append(grad)
                if len(parts) == self.expected[position]:
                    self.add(position, self.pending.pop(position))
            return tuple(taken)

        return hook

    def finish(self) -> None:
        """End of a pass: reduce what arrived for a parameter some of whose edges carried no gradient."""
        for position, parts in list(self.pending.items()):
            self.add(position, parts)
        self.pending.clear()


def reference_norms(
    losses: Tensor, rows: Sequence[int], params: Sequence[nn.Parameter]
) -> list[Tensor | None]:
    r"""Per parameter :math:`p`, the squared norms :math:`n_p[t] = \lVert \partial (c_t^\top L)/\partial p
    \rVert^2` (float64, on :math:`p`'s device) for the cotangents :math:`c_t` of
    :func:`reference_passes`; ``None`` where no pass reaches :math:`p` (its gradients are zero).

    One ``torch.autograd.grad`` per pass on the retained graph. A hook on each parameter reduces its
    gradient as it is produced and returns stride-0 zeros in its place, so no gradient outlives its
    hook (see the module docstring). A parameter used more than once (a tied embedding) is instead
    reduced from its contributions, taken at the nodes that produce them: autograd would otherwise
    hold the first contribution, the last one and their sum at once. Parameters with hooks of their own
    (``register_hook``) keep the tensor hook, so that the reference sees what their hooks return, as
    ``torch.autograd.grad`` does. ``.grad`` is never written.
    """
    rows = list(rows)
    passes = reference_passes(len(rows))
    sink = _PassNorms(params, len(passes))
    shared = {
        position: found
        for position, found in feeding_edges(losses, params).items()
        if not _has_tensor_hooks(params[position])
    }
    by_node: dict[Node, list[tuple[int, int]]] = {}
    for position, found in shared.items():
        for node, slot in found:
            by_node.setdefault(node, []).append((slot, position))
    sink.expected = {position: len(found) for position, found in shared.items()}
    for index, (a, b) in enumerate(passes):
        sink.index = index
        cotangent = torch.zeros_like(losses)
        cotangent[rows[a]] = 1
        cotangent[rows[b]] = 1
        handles = [
            param.register_hook(sink.param_hook(position))
            for position, param in enumerate(params)
            if position not in shared
        ]
        handles += [node.register_hook(sink.node_hook(slots)) for node, slots in by_node.items()]
        try:
            torch.autograd.grad(losses, list(params), cotangent, retain_graph=True, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        sink.finish()
    return sink.norms


def reference_block(norms: Sequence[Tensor | None], keep: Sequence[bool], count: int) -> Tensor:
    r"""The ``[count, count]`` float64 reference block (on the CPU) over the parameters where ``keep`` is
    true: the kept squared norms of :func:`reference_norms` summed, then polarised,
    :math:`B_{aa} = n[(a, a)]`, :math:`B_{ab} = (n[(a, b)] - n[(a, a)] - n[(b, b)]) / 2`."""
    sums: dict[torch.device, Tensor] = {}
    for vector, kept in zip(norms, keep):
        if vector is not None and kept:
            device = vector.device
            sums[device] = sums[device] + vector if device in sums else vector.clone()
    passes = reference_passes(count)
    total = torch.zeros(len(passes), dtype=torch.float64)
    for value in sums.values():  # parameters may live on several devices: one transfer per device
        total += value.cpu()
    block = torch.zeros(count, count, dtype=torch.float64)
    for index, (a, b) in enumerate(passes):
        if a == b:
            block[a, a] = total[index]
    for index, (a, b) in enumerate(passes):
        if a != b:
            block[a, b] = block[b, a] = (total[index] - block[a, a] - block[b, b]) / 2
    return block


def check_block(
    gramian: Tensor,
    rows: Sequence[int],
    reference: Tensor,
    *,
    low_precision: bool,
    per_task: bool,
    row_groups: bool = False,
) -> None:
    """Raise :class:`GramianMismatchError` when ``gramian[rows][:, rows]`` differs from ``reference``.

    ``row_groups``: the losses are objectives over groups of batch rows (``row_objective``); ``rows`` index
    the objectives, and the reference is the Gramian of their true gradients, so the check also catches a
    loss or a model that couples rows of different objectives (:math:`P G_{\text{rows}} P^\top` then
    misses the cross terms)."""
    index = torch.as_tensor(list(rows), device=gramian.device)
    block = gramian.index_select(0, index).index_select(1, index).detach().to(torch.float64).cpu()
    if not (bool(torch.isfinite(block).all()) and bool(torch.isfinite(reference).all())):
        return  # non-finite gradients are reported by the caller's finiteness check, not as a mismatch
    scale = float(reference.diagonal().abs().max()) if reference.numel() else 0.0
    error = float((block - reference).abs().max()) if reference.numel() else 0.0
    tolerance = HALF_PRECISION_TOLERANCE if low_precision else FULL_PRECISION_TOLERANCE
    if error <= tolerance * scale + 1e-30:
        return
    if row_groups:
        raise GramianMismatchError(
            f"The Gramian engine's result differs from autograd on objectives {list(rows)} (largest error {error:.3g} "
            f"for a largest squared gradient norm of {scale:.3g}). Its assumption for objectives over groups of rows "
            "(row_objective) does not hold for this model or loss: loss k must read the rows of objective k only, and "
            "each row's activations must depend on that row only. A loss normalised over the batch, batch-norm "
            "statistics in train mode, or a module that mixes rows break it. Use jd_engine='jacobian' (exact for any "
            "loss vector), or jd_engine='auto', which switches to it."
        )
    what = "task" if per_task else "example"
    raise GramianMismatchError(
        f"The Gramian engine's result differs from row-by-row autograd on rows {list(rows)} (largest error "
        f"{error:.3g} for a largest squared gradient norm of {scale:.3g}). Its per-{what} assumption does not hold "
        f"for this model or loss: loss i must depend on {what} i only. In-batch losses (contrastive, in-batch "
        "negatives, listwise), batch-norm statistics in train mode, or a module that mixes examples break it. "
        "Use jd_engine='jacobian' (exact for any loss vector), or jd_engine='auto', which switches to it."
    )


def is_low_precision(params: Sequence[Tensor], tensors: Sequence[Tensor | None]) -> bool:
    """Whether half-precision values took part (parameters, or captured backward signals under autocast)."""
    return any(p.dtype in _HALF for p in params) or any(t is not None and t.dtype in _HALF for t in tensors)
