r"""Objectives that are not batch rows: ``ObjectiveLosses``, a loss vector with its row map.

A loss vector usually has one entry per batch row (``jd_objectives="per_example"``). Some objectives own
several rows instead: a DPO or reward-modelling pair is rows :math:`k` (chosen) and :math:`B + k`
(rejected) of a ``[chosen…, rejected…]`` batch of :math:`2B` rows; a GRPO prompt group is its
completions. ``ObjectiveLosses(losses, row_objective)`` says so: ``losses`` ``[K]`` holds one loss per
objective, ``row_objective`` ``[n_rows]`` the objective of each batch row.

The maths. Let :math:`P \in \{0, 1\}^{K \times n}` be the incidence matrix, :math:`P_{kr} = 1` when row
:math:`r` belongs to objective :math:`k` (every row belongs to exactly one objective, every objective
has at least one row). Suppose the per-example structure of the model: the activations of row
:math:`r` depend on the inputs of row :math:`r` only (no batch statistics, no attention across rows),
and :math:`L_k = f_k(y_r : P_{kr} = 1)` reads the outputs :math:`y_r` of its own rows only (any
nonlinear :math:`f_k`, e.g. :math:`-\log\sigma(\beta(s_{\text{chosen}} - s_{\text{rejected}}))`).
Then, in the single backward of :math:`\sum_k L_k`, the gradient that reaches row :math:`r`'s
activations is :math:`\partial L_{k(r)} / \partial y_r`, and the parameter gradient it produces there,
:math:`g_r`, is row :math:`r`'s contribution to :math:`\nabla L_{k(r)}`:

.. math::

   \nabla L_k = \sum_{r : P_{kr} = 1} g_r, \qquad J_{\text{obj}} = P\, J_{\text{rows}}, \qquad
   G_{\text{obj}} = J_{\text{obj}} J_{\text{obj}}^\top = P\, G_{\text{rows}}\, P^\top, \qquad
   J_{\text{obj}}^\top w = J_{\text{rows}}^\top (P^\top w),

with :math:`J_{\text{rows}} = [g_r]_r` and :math:`(P^\top w)_r = w_{k(r)}`. The Gramian engine uses this
to form the ``[K, K]`` Gramian and the weighted gradient from one backward, at per-example cost; its
self-check compares a few objectives' gradients with autograd, which catches a loss or a model that
couples rows of different objectives. The explicit-Jacobian engine differentiates the ``K`` losses
directly and needs no assumption.

Objectives that are token segments of rows (``ObjectiveLosses.segments(losses, token_objective)``): a
packed or padding-free batch holds several sequences in one row ``[1, Σ T_i]``; objective ``s`` is
sequence ``s``'s loss and ``token_objective`` ``[n_rows, T]`` gives each token's objective (``-1``: a token
no objective reads, e.g. padding). Take every token as a row. For a module applied token-wise (output
token :math:`t` reads input token :math:`t` only: ``nn.Linear``, layer / RMS norms, ``nn.Embedding``),
token :math:`t`'s contribution :math:`g_t = \partial L_{s(t)}/\partial y_t \cdot \partial y_t/\partial
\theta` is its share of :math:`\nabla L_{s(t)}` as long as token :math:`t` influences objective
:math:`s(t)` only — attention confined to the segment (a block-causal mask, or ``position_ids``
restarts honoured by the attention kernel). The same algebra then holds with tokens as rows
(:math:`P \in \{0,1\}^{K \times N}`, :math:`N = n_{\text{rows}} T`, a zero column for a ``-1`` token):
:math:`G_{\text{seg}} = P G_{\text{tokens}} P^\top`, and for a linear layer the ghost form
:math:`G_{\text{seg}}[s, s'] = \sum_{t \in s, t' \in s'} (a_t \cdot a_{t'})(b_t \cdot b_{t'})` (Li et al.,
*Large Language Models Can Be Strong Differentially Private Learners*, 2022; Goodfellow, arXiv:1510.01799,
2015) needs no per-token gradient. Attention with cross-segment leakage breaks the assumption; the
Gramian engine's self-check (per-segment autograd gradients) catches it.

This module is a leaf: it imports nothing from ``hf_jd``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ObjectiveLosses",
    "check_row_objective",
    "check_token_objective",
    "incidence",
    "objective_gramian",
    "row_weights",
]


def check_row_objective(row_objective: object, objectives: int) -> Tensor:
    """``row_objective`` as a ``long`` tensor after checking that it maps rows onto ``range(objectives)``.

    Raises ``TypeError`` for a non-integer tensor, ``ValueError`` for a map that is not 1-D, is empty, names
    an objective outside ``[0, objectives)`` or leaves an objective without rows.
    """
    if not isinstance(row_objective, Tensor):
        raise TypeError(
            f"row_objective must be a LongTensor [n_rows] (the objective of each batch row), got "
            f"{type(row_objective).__name__}."
        )
    if (
        row_objective.dtype.is_floating_point
        or row_objective.dtype.is_complex
        or row_objective.dtype == torch.bool
    ):
        raise TypeError(
            f"row_objective must hold integer objective indices, got dtype {row_objective.dtype}."
        )
    if row_objective.dim() != 1 or row_objective.numel() == 0:
        raise ValueError(
            f"row_objective must be a non-empty 1-D tensor [n_rows] (one objective index per batch row), got "
            f"shape {tuple(row_objective.shape)}."
        )
    row_objective = row_objective.long()
    low, high = int(row_objective.min()), int(row_objective.max())
    if low < 0 or high >= objectives:
        raise ValueError(
            f"row_objective names objectives in [{low}, {high}], but there are {objectives} losses: every entry "
            f"must lie in [0, {objectives})."
        )
    counts = torch.bincount(row_objective.detach(), minlength=objectives)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        shown = empty[:8] + (["…"] if len(empty) > 8 else [])
        raise ValueError(
            f"objectives {shown} have no row in row_objective ({len(empty)} of {objectives}): every loss must own at "
            "least one batch row (a loss that reads no row has no gradient to weight)."
        )
    return row_objective


def check_token_objective(token_objective: object, objectives: int) -> Tensor:
    """``token_objective`` as a ``long`` tensor ``[n_rows, T]`` after checking that it maps tokens onto
    ``range(objectives)`` or ``-1`` (a token of no objective).

    Raises ``TypeError`` for a non-integer tensor, ``ValueError`` for a map that is not 2-D, is empty, names
    an objective outside ``[-1, objectives)`` or leaves an objective without tokens.
    """
    if not isinstance(token_objective, Tensor):
        raise TypeError(
            f"token_objective must be a LongTensor [n_rows, T] (the objective of each token, -1 for none), got "
            f"{type(token_objective).__name__}."
        )
    if (
        token_objective.dtype.is_floating_point
        or token_objective.dtype.is_complex
        or token_objective.dtype == torch.bool
    ):
        raise TypeError(
            f"token_objective must hold integer objective indices, got dtype {token_objective.dtype}."
        )
    if token_objective.dim() != 2 or token_objective.numel() == 0:
        raise ValueError(
            f"token_objective must be a non-empty 2-D tensor [n_rows, T] (one objective index per token, -1 for "
            f"a token of no objective), got shape {tuple(token_objective.shape)}."
        )
    token_objective = token_objective.long()
    low, high = int(token_objective.min()), int(token_objective.max())
    if low < -1 or high >= objectives:
        raise ValueError(
            f"token_objective names objectives in [{low}, {high}], but there are {objectives} losses: every entry "
            f"must lie in [0, {objectives}), or be -1 for a token of no objective."
        )
    flat = token_objective.detach().reshape(-1)
    counts = torch.bincount(flat[flat >= 0], minlength=objectives)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        shown = empty[:8] + (["…"] if len(empty) > 8 else [])
        raise ValueError(
            f"objectives {shown} have no token in token_objective ({len(empty)} of {objectives}): every loss must "
            "own at least one token (a loss that reads no token has no gradient to weight)."
        )
    return token_objective


@dataclass(frozen=True)
class ObjectiveLosses:
    r"""``K`` losses over groups of batch rows: the loss vector of objectives that are not batch rows.

    Attributes:
        losses: ``[K]``, one loss per objective (:math:`L_k`).
        row_objective: ``[n_rows]`` integers, the objective each batch row belongs to (stored as ``long`` on
            the device of ``losses``). Every row belongs to exactly one objective, every objective owns at
            least one row. ``None`` for token segments.
        token_objective: ``[n_rows, T]`` integers or ``None``: objectives that are token segments of rows
            (:meth:`segments`), the objective of each token, ``-1`` for a token of no objective. Exactly one
            of ``row_objective`` and ``token_objective`` is given.

    With the incidence :math:`P` (:math:`P_{kr} = [\text{row } r \in k]`) and the per-example structure of
    the model (see the module docstring), :math:`G_{\text{obj}} = P G_{\text{rows}} P^\top` and
    :math:`J^\top w = J_{\text{rows}}^\top (P^\top w)`: the Gramian engine serves these objectives from one
    backward of :math:`\sum_k L_k`. ``compute_losses`` (or ``compute_losses_func``) of
    :class:`hf_jd.JDTrainerMixin` may return one in place of a loss tensor (``jd_objectives="per_example"``);
    the logged loss is the mean of the ``K`` losses.

    Example (DPO: chosen rows ``0..B-1``, rejected rows ``B..2B-1``)::

        margin = beta * (scores[:B] - scores[B:])
        return ObjectiveLosses.paired(-F.logsigmoid(margin))
    """

    losses: Tensor
    row_objective: Tensor | None = None
    token_objective: Tensor | None = None

    def __post_init__(self) -> None:
        losses = self.losses
        if not isinstance(losses, Tensor):
            raise TypeError(
                f"ObjectiveLosses.losses must be a torch.Tensor [K], got {type(losses).__name__}."
            )
        if losses.dim() != 1 or losses.numel() == 0:
            raise ValueError(
                f"ObjectiveLosses.losses must be a non-empty 1-D tensor [K] (one loss per objective), got shape "
                f"{tuple(losses.shape)}."
            )
        if self.token_objective is not None:
            if self.row_objective is not None:
                raise ValueError(
                    "ObjectiveLosses takes row_objective (objectives over groups of rows) or token_objective "
                    "(token segments of rows), not both."
                )
            tokens = check_token_objective(self.token_objective, losses.numel())
            object.__setattr__(self, "token_objective", tokens.to(losses.device))
            return
        rows = check_row_objective(self.row_objective, losses.numel())
        object.__setattr__(self, "row_objective", rows.to(losses.device))

    @classmethod
    def paired(cls, losses: Tensor, groups: int = 2) -> ObjectiveLosses:
        """Objective ``k`` owns rows ``k, K + k, …, (groups - 1)·K + k`` (DPO / reward modelling: ``groups=2``,
        chosen rows ``0..K-1`` then rejected rows ``K..2K-1``)."""
        if groups < 1:
            raise ValueError(f"groups must be at least 1, got {groups}.")
        count = losses.numel() if isinstance(losses, Tensor) else 0
        device = losses.device if isinstance(losses, Tensor) else None
        return cls(losses, torch.arange(count, device=device).repeat(groups))

    @classmethod
    def grouped(cls, losses: Tensor, sizes: Sequence[int]) -> ObjectiveLosses:
        """Objective ``k`` owns the ``sizes[k]`` consecutive rows after those of objectives ``0..k-1`` (GRPO: a
        prompt's completions are consecutive rows)."""
        if any(int(size) < 1 for size in sizes):
            raise ValueError(f"every group needs at least one row, got sizes {list(sizes)}.")
        device = losses.device if isinstance(losses, Tensor) else None
        counts = torch.as_tensor([int(size) for size in sizes], dtype=torch.long, device=device)
        return cls(losses, torch.repeat_interleave(torch.arange(len(sizes), device=device), counts))

    @classmethod
    def segments(cls, losses: Tensor, token_objective: Tensor) -> ObjectiveLosses:
        """Objective ``s`` owns the tokens ``t`` with ``token_objective[r, t] == s`` (``[n_rows, T]``, ``-1``:
        no objective): the sequences of a packed or padding-free batch, one loss per sequence. Every token a
        sequence's loss reads through attention (its prompt too) belongs to that sequence."""
        return cls(losses, token_objective=token_objective)

    @property
    def num_objectives(self) -> int:
        """``K``."""
        return self.losses.numel()

    @property
    def num_rows(self) -> int:
        """``n_rows``, the batch rows the objectives are made of."""
        return self._rows().shape[0]

    def _rows(self) -> Tensor:
        """The map of the engine's rows: ``row_objective``, or the token map ``[n_rows, T]``."""
        rows = self.row_objective if self.token_objective is None else self.token_objective
        assert rows is not None  # checked in __post_init__
        return rows

    def incidence(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Tensor:
        """``P`` ``[K, n_rows]``: ``P[k, r] = 1`` when row ``r`` belongs to objective ``k`` (``[K, n_rows·T]``
        over the flattened tokens for segments)."""
        return incidence(self._rows().reshape(-1), self.num_objectives, dtype=dtype, device=device)

    def row_weights(self, weights: Tensor) -> Tensor:
        """``Pᵀ w`` (``[n_rows]``, ``[n_rows·T]`` for segments): each row (token) takes its objective's weight
        (0 for a ``-1`` token)."""
        return row_weights(self._rows().reshape(-1), weights)

    def objective_gramian(self, row_gramian: Tensor) -> Tensor:
        """``P G_rows Pᵀ`` (``[K, K]``) from the Gramian of the rows' (tokens') gradient contributions."""
        return objective_gramian(self._rows().reshape(-1), self.num_objectives, row_gramian)


def incidence(
    row_objective: Tensor,
    objectives: int,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """``P`` ``[objectives, n_rows]`` of a checked row map (``P[k, r] = [row_objective[r] == k]``; a ``-1`` row
    has a zero column)."""
    index = row_objective.to(device=device)
    ks = torch.arange(objectives, device=index.device)
    return (ks.unsqueeze(1) == index.unsqueeze(0)).to(dtype or torch.get_default_dtype())


def row_weights(row_objective: Tensor, weights: Tensor) -> Tensor:
    """``Pᵀ w``: ``weights[row_objective]`` on the device of ``weights`` (0 where ``row_objective`` is -1)."""
    index = row_objective.to(weights.device)
    if bool((index < 0).any()):
        padded = torch.cat([weights, weights.new_zeros(1)])
        return padded.index_select(0, torch.where(index < 0, weights.numel(), index))
    return weights.index_select(0, index)


def objective_gramian(row_objective: Tensor, objectives: int, row_gramian: Tensor) -> Tensor:
    """``P G Pᵀ`` as two dense products with the 0/1 incidence (deterministic; every product is exact)."""
    matrix = incidence(row_objective, objectives, dtype=row_gramian.dtype, device=row_gramian.device)
    return matrix @ row_gramian @ matrix.T
