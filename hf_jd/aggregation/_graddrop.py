r"""GradDrop: Gradient Sign Dropout (needs the explicit Jacobian).

Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, *Just Pick a Sign: Optimizing Deep
Multitask Models with Gradient Sign Dropout*, NeurIPS 2020 (arXiv:2010.06808, Algorithm 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._seeded import SeededGenerator
from .._validation import ArgumentTypeError
from ._aggregator_bases import Aggregator, check_finite_jacobian
from ._attributes import Checked, vector_str
from ._preference import as_vector
from ._spec import Paper, aggregator_spec
from ._stateful import Stateful


def _identity(purity: Tensor) -> Tensor:
    return purity


@aggregator_spec(
    name="graddrop",
    summary="gradient sign dropout",
    papers=(
        Paper(
            "Chen et al.",
            "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
            "NeurIPS",
            2020,
            "2010.06808",
        ),
    ),
    needs_jacobian=True,
    state="generator",
    example_kwargs=lambda m: {"seed": 0},
)
class GradDrop(SeededGenerator, Stateful, Aggregator):
    r"""Gradient Sign Dropout (Chen et al., *Just Pick a Sign: Optimizing Deep Multitask Models with
    Gradient Sign Dropout*, NeurIPS 2020, arXiv:2010.06808, lines 10–15 of Algorithm 1).

    For every coordinate (column) :math:`k`, the positive sign purity
    :math:`P_k = \frac12 \big(1 + \frac{\sum_i J_{ik}}{\sum_i |J_{ik}|}\big) \in [0, 1]` is computed,
    one uniform :math:`U_k \sim \mathcal U(0, 1)` is drawn, and only the entries of one sign are
    kept: the positive ones when :math:`f(P_k) > U_k`, the negative ones when :math:`f(P_k) < U_k`.
    With per-row leak coefficients :math:`\ell_i`,

    .. math:: A(J)_k = \sum_i \big(\ell_i + (1 - \ell_i) M_{ik}\big) J_{ik}, \qquad
              M_{ik} = \mathbb 1[f(P_k) > U_k]\,\mathbb 1[J_{ik} > 0]
                     + \mathbb 1[f(P_k) < U_k]\,\mathbb 1[J_{ik} < 0].

    A column of zeros has no sign (:math:`P_k = 1/2`) and gives 0. The mask is a per-coordinate
    decision, not a function of :math:`J J^\top`: GradDrop needs the explicit Jacobian (the
    Gramian engine cannot serve it). The result does not depend on the order of the rows (for a
    given draw of :math:`U`).

    Random and stateful: :math:`U` is drawn from a CPU ``torch.Generator`` owned by the aggregator
    (float64, then cast to the input's dtype and device), whose state is part of
    :meth:`state_dict`; :meth:`reset` re-seeds it with ``seed``.

    Args:
        f: Monotonically increasing map :math:`[0, 1] \to [0, 1]` applied to the purity (default the
            identity, as in the paper's experiments and TorchJD).
        leak: Leak coefficients :math:`\ell_i \in [0, 1]`, one per objective (a list or 1-D tensor);
            ``None`` (default) for no leak. The paper leaks the task-specific parts fully.
        seed: Seed of the generator; ``None`` seeds it from a non-deterministic source.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    f = Checked("GradDrop", lambda owner, name, value: _check_f(owner, value))
    leak = Checked("GradDrop", lambda owner, name, value: _check_leak(owner, name, value))

    def __init__(
        self,
        f: Callable[[Tensor], Tensor] = _identity,
        leak: Tensor | Sequence[float] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.f = f
        self.leak = leak
        self._init_generator("GradDrop", seed)

    @property
    def required_rows(self) -> int | None:
        return None if self.leak is None else self.leak.numel()

    def forward(self, matrix: Tensor) -> Tensor:
        m, n = matrix.shape
        if self.leak is not None and self.leak.numel() != m:
            raise ValueError(
                f"GradDrop has {self.leak.numel()} leak values but there are {m} objectives (losses). "
                "Give one leak value per loss."
            )
        check_finite_jacobian("GradDrop", matrix)
        if m == 0:  # no objective: the zero update, nothing drawn
            return matrix.new_zeros(n)
        U = torch.rand(n, generator=self._generator, dtype=torch.float64)
        J = matrix.detach()
        U = U.to(dtype=J.dtype, device=J.device)
        total = J.sum(dim=0)
        absolute = J.abs().sum(dim=0)
        ratio = torch.where(absolute > 0, total / torch.where(absolute > 0, absolute, 1), 0)
        purity = self.f(0.5 * (1 + ratio))
        mask = (purity > U) & (J > 0) | (purity < U) & (J < 0)
        keep = mask.to(J.dtype)
        if self.leak is not None:
            leak = self.leak.to(dtype=J.dtype, device=J.device)[:, None]
            keep = leak + (1 - leak) * keep
        return (keep * J).sum(dim=0)

    def __repr__(self) -> str:
        leak = None if self.leak is None else self.leak.tolist()
        f = "" if self.f is _identity else f"f={self.f!r}, "
        return f"GradDrop({f}leak={leak}, seed={self.seed})"

    def __str__(self) -> str:
        return "GradDrop" if self.leak is None else f"GradDrop({vector_str(self.leak)})"


def _check_f(owner: str, f: object) -> Callable[[Tensor], Tensor]:
    if not callable(f):
        raise TypeError(f"{owner}'s f must be a callable mapping the purity tensor, got {f!r}.")
    return f  # type: ignore[return-value]


def _check_leak(owner: str, name: str, leak: object) -> Tensor | None:
    """``None``, or a 1-D vector of values in [0, 1] (a float tensor is kept as it is; empty: no row)."""
    if leak is None:
        return None
    if not isinstance(leak, (Tensor, list, tuple)):
        raise ArgumentTypeError(f"{owner}'s {name} must be a 1-D list of numbers, got {leak!r}.")
    if isinstance(leak, Tensor) and leak.dim() != 1:
        raise ValueError(f"{owner}'s {name} must be a 1-D list, got shape {tuple(leak.shape)}.")
    vector = as_vector(owner, name, leak, allow_empty=True)
    if not bool(((vector >= 0) & (vector <= 1)).all()):
        raise ValueError(f"{owner}'s {name} values must be in [0, 1], got {vector.tolist()}.")
    return vector
