r"""Exactness self-check of the Gramian engine against row-by-row autograd.

The engine's rules are exact under two assumptions: loss :math:`i` depends on example :math:`i` only
(per-example objectives), and every hooked module is one the rules understand. A loss that mixes
examples (in-batch negatives, a contrastive or listwise loss, batch statistics) breaks the first
assumption *without any error*: the engine then returns the Gramian of
:math:`\partial(\sum_j L_j)/\partial\theta` restricted to each example's path, not of :math:`J`.

The check computes a few rows :math:`g_r = \partial L_r / \partial\theta` with plain
``torch.autograd.grad`` (exact, no assumption) and compares the sub-block :math:`G_{RR}` of the
engine's Gramian with :math:`[\langle g_r, g_s\rangle]_{r,s\in R}` (float64), relative to the largest
diagonal entry.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._errors import GramianEngineError

#: Relative tolerance of the check, full precision / half-precision (fp16, bf16) computations.
FULL_PRECISION_TOLERANCE = 1e-3
HALF_PRECISION_TOLERANCE = 5e-2
_HALF = (torch.float16, torch.bfloat16)


class GramianMismatchError(GramianEngineError):
    """The engine's Gramian differs from row-by-row autograd: its assumptions do not hold for this model/loss."""


def default_rows(m: int, count: int = 3) -> list[int]:
    """Up to ``count`` distinct rows spread over ``[0, m)``: first, middle, last."""
    return sorted({0, m // 2, m - 1})[:count] if m > 0 else []


def reference_gradients(
    losses: Tensor, rows: Sequence[int], params: Sequence[nn.Parameter]
) -> list[list[Tensor]]:
    """``[[∂L_r/∂p for p in params] for r in rows]`` by plain autograd (zeros for unused parameters)."""
    gradients = []
    for row in rows:
        grads = torch.autograd.grad(losses[row], list(params), retain_graph=True, allow_unused=True)
        gradients.append([torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)])
    return gradients


def reference_block(gradients: list[list[Tensor]], keep: Sequence[bool]) -> Tensor:
    """Float64 Gramian ``[⟨g_r, g_s⟩]`` of the reference rows over the parameters where ``keep`` is true."""
    count = len(gradients)
    block = torch.zeros(count, count, dtype=torch.float64, device=gradients[0][0].device)
    for index, kept in enumerate(keep):
        if not kept:
            continue
        rows = torch.stack([grads[index].reshape(-1) for grads in gradients]).to(torch.float64)
        block += (rows @ rows.T).to(block.device)  # parameters may live on several devices
    return block.cpu()  # one transfer, after the sum


def check_block(
    gramian: Tensor, rows: Sequence[int], reference: Tensor, *, low_precision: bool, per_task: bool
) -> None:
    """Raise :class:`GramianMismatchError` when ``gramian[rows][:, rows]`` differs from ``reference``."""
    index = torch.as_tensor(list(rows), device=gramian.device)
    block = gramian.index_select(0, index).index_select(1, index).detach().to(torch.float64).cpu()
    if not (bool(torch.isfinite(block).all()) and bool(torch.isfinite(reference).all())):
        return  # non-finite gradients are reported by the caller's finiteness check, not as a mismatch
    scale = float(reference.diagonal().abs().max()) if reference.numel() else 0.0
    error = float((block - reference).abs().max()) if reference.numel() else 0.0
    tolerance = HALF_PRECISION_TOLERANCE if low_precision else FULL_PRECISION_TOLERANCE
    if error <= tolerance * scale + 1e-30:
        return
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
