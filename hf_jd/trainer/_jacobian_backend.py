r"""The explicit-Jacobian backend of a JD training step.

It computes :math:`J_p = \partial L / \partial p` for every trainable parameter with
:func:`hf_jd.autojac.jac` (rows back-propagated in parallel, or one by one), then either

* for a Gramian-weighted aggregator: :math:`G = \sum_p J_p J_p^\top` (never concatenating the
  :math:`J_p`), weights :math:`w`, and :math:`p.\mathrm{grad} \mathrel{+}= s\, J_p^\top w`;
* for any other aggregator: the concatenated :math:`J`, :math:`A(J)`, split back per parameter.

In per-task mode, parameters reached by the loss of a single task (task-specific heads) get that
task's plain gradient and are left out of :math:`G`, as in ``mtl_backward``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .._tensors import accumulation_dtype, add_to_grad, gramian_of_blocks
from ..aggregation import Aggregator
from ..autojac import jac
from ..autojac._graph import leaves_of_nodes
from ..distributed import any_across_ranks, global_gramian


class JacobianBackend:
    """Explicit-Jacobian implementation of the JD backend protocol used by ``JDTrainer``."""

    name = "jacobian"

    def __init__(self, model: nn.Module, per_task: bool, parallel_chunk_size: int | None = None) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.per_task = per_task
        self.parallel_chunk_size = parallel_chunk_size
        self._jacobians: list[Tensor] | None = None
        self._shared: list[bool] | None = None

    @contextmanager
    def capture(self) -> Iterator[None]:
        yield

    def compute(self, losses: Tensor) -> None:
        """Compute and keep the Jacobian of ``losses`` w.r.t. every trainable parameter."""
        roots = row_roots(losses) if self.per_task else None
        reached = (
            [{id(leaf) for leaf in leaves_of_nodes([root])} for root in roots] if roots is not None else None
        )
        self._jacobians = list(
            jac(losses, self.params, retain_graph=False, parallel_chunk_size=self.parallel_chunk_size)
        )
        if not self.per_task:
            self._shared = [True] * len(self.params)
        elif reached is not None:
            self._shared = [sum(id(p) in leaves for leaves in reached) > 1 for p in self.params]
        else:  # the vector was not stacked from scalars: a parameter is task-specific if one row is nonzero
            self._shared = [
                int((J.reshape(J.shape[0], -1) != 0).any(dim=1).sum()) != 1 for J in self._jacobians
            ]

    @property
    def jacobians(self) -> list[Tensor]:
        """The per-parameter Jacobians ``[m, *p.shape]`` of the last :meth:`compute`."""
        return self._require()

    @property
    def gramian_dtype(self) -> torch.dtype:
        return accumulation_dtype(*(p.dtype for p in self.params))

    def shared_rows(self) -> list[Tensor]:
        """The Jacobian blocks (``[m, numel]``) of the shared parameters (all of them per example)."""
        return [J.reshape(J.shape[0], -1) for J, shared in zip(self._require(), self._shared) if shared]

    def gramian(self, dtype: torch.dtype | None = None) -> Tensor:
        """:math:`G = \\sum_p J_p J_p^\\top` over the shared parameters (float32 at least).

        When float32 products of a finite Jacobian overflow (losses or gradients beyond ~1e19), the
        Gramian is formed again in float64, where it is finite; a non-finite Jacobian gives a
        non-finite Gramian, which the caller reports.
        """
        rows = self.shared_rows()
        dtype = dtype or self.gramian_dtype
        if not rows:
            m = self._require()[0].shape[0]
            return torch.zeros(m, m, dtype=dtype, device=self.params[0].device)
        gramian = gramian_of_blocks(rows, dtype)
        if dtype != torch.float64 and not bool(torch.isfinite(gramian).all()) and self.is_finite():
            gramian = gramian_of_blocks(rows, torch.float64)
        return gramian

    def global_gramian(self) -> tuple[Tensor, list[int]]:
        """The Gramian of the rows of every rank (collective), formed again in float64 on overflow.

        The global Gramian is identical on every rank, so every rank enters the overflow branch; whether
        the Jacobian itself is finite is decided across ranks, so every rank takes the same path.
        """
        gramian, sizes = global_gramian(self.shared_rows(), self.gramian_dtype)
        if not bool(torch.isfinite(gramian).all()) and not any_across_ranks(
            not self.is_finite(), gramian.device
        ):
            gramian, sizes = global_gramian(self.shared_rows(), torch.float64)
        return gramian, sizes

    def is_finite(self) -> bool:
        """Whether every entry of the Jacobian is finite."""
        return all(bool(torch.isfinite(J).all()) for J in self._require())

    def accumulate_grad(self, weights: Tensor, scale: float) -> None:
        """``p.grad += scale * J_pᵀ w`` for shared parameters, ``scale * Σ_k J_p[k]`` for the others."""
        for param, J, shared in zip(self.params, self._require(), self._shared):
            update = torch.tensordot(weights.to(J.dtype), J, dims=1) if shared else J.sum(dim=0)
            add_to_grad(param, update.mul_(scale))
        self.release()

    def aggregate(self, aggregator: Aggregator, scale: float) -> Tensor:
        """Write ``scale * A(J)`` for an aggregator that needs the explicit Jacobian; return ``J``."""
        jacobians = self._require()
        shared_blocks = self.shared_rows()
        matrix = torch.cat(shared_blocks, dim=1)
        update = aggregator(matrix)
        offset = 0
        for param, J, shared in zip(self.params, jacobians, self._shared):
            if shared:
                numel = param.numel()
                add_to_grad(param, update[offset : offset + numel].view_as(param) * scale)
                offset += numel
            else:
                add_to_grad(param, J.sum(dim=0) * scale)
        self.release()
        return matrix

    def release(self) -> None:
        self._jacobians = None

    def _require(self) -> list[Tensor]:
        if self._jacobians is None:
            raise RuntimeError("JacobianBackend.compute(losses) must run before using the Jacobian.")
        return self._jacobians


def row_roots(vector: Tensor) -> list | None:
    """The autograd nodes of each entry of a vector built by ``torch.stack`` of scalars, else ``None``."""
    node = vector.grad_fn
    if node is None or type(node).__name__ != "StackBackward0":
        return None
    roots = [next_node for next_node, _ in node.next_functions]
    return roots if len(roots) == vector.numel() else None
