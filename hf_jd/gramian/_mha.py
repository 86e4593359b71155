r"""Rule for ``nn.MultiheadAttention``: its affine maps as linear layers, from one recomputation.

The stock ``forward`` (``F.multi_head_attention_forward``) reads its parameters only through affine
maps :math:`y = x W^\top + c`: the in-projections of the query, key and value (row blocks of
``in_proj_weight`` / ``in_proj_bias``, or ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``) and
the out-projection (the weight and bias of the ``out_proj`` child, which the module never *calls*:
the rule claims it, :meth:`~hf_jd.gramian.Rule.claims`), plus ``bias_k`` / ``bias_v``, repeated over
the batch and appended to the projected keys and values. For each map the per-example gradient is
Goodfellow's (*Efficient per-example gradient computations*, arXiv:1510.01799, 2015)

.. math:: g_i^{(W)} = \sum_t b_{it}\, x_{it}^\top, \qquad g_i^{(c)} = \sum_t b_{it},

with :math:`x` the map's input and :math:`b = \partial L / \partial y` its gradient-output; for
``bias_k`` (``bias_v``) it is the gradient at the key (value) appended to example :math:`i`.

The rule recomputes the call once from its captured inputs, with the RNG and autocast state of the
original call replayed (attention dropout draws the same mask): it projects the query, key and value
itself, turns the projections :math:`Q, K, V` (and the appended ``bias_k`` / ``bias_v`` rows) into
leaves of a new graph, runs ``F.multi_head_attention_forward`` on them with identity projections
(exact: :math:`x I = x`) — the attention output :math:`O` before the out-projection — and adds a zero
leaf :math:`Z` to :math:`O W_o^\top + c_o`. One backward of the call's captured gradient-outputs
through this graph gives every map's :math:`b` at once (:math:`b` at :math:`Z` is that of the
out-projection): per example, slice :math:`i` of each :math:`b` is :math:`\partial L_i/\partial y_i`
since example :math:`i` attends within itself only; per task, one batched backward of the ``k``
task rows. From there each map is a linear layer (:mod:`hf_jd.gramian._linear`): Gramian blocks by
the ghost product of Li et al. (ICLR 2022) or by materialised per-example gradients, whichever is
cheaper (:func:`~hf_jd.gramian._linear.prefers_ghost`), and :math:`\sum_i w_i g_i` by one matmul.
``in_proj_weight``, read by three maps (query, key and value rows), has the sum of the three blocks'
Gramians: its per-example gradient is their concatenation.

Supported: batched 3-D inputs, self- and cross-attention, ``kdim`` / ``vdim`` (separate projection
weights), ``bias=False``, ``add_bias_kv``, ``add_zero_attn``, key-padding and attention masks (2-D,
or 3-D per example and head), ``is_causal``, ``need_weights`` with or without averaged weights,
dropout, frozen parameters. Per example, ``batch_first=True`` only: with ``batch_first=False`` the
batch is dimension 1 of the call's inputs and outputs, which the engine's per-example classification
(dimension 0) does not follow, so those calls stay on the exact batched-autograd fallback (per task,
both layouts are served). Cost: the recomputation adds the four ``E x E`` identity products to one
forward and backward of the attention.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._tensors import gram
from ._linear import ghost_gramian, prefers_ghost, weighted_affine
from ._registry import builtin_rule
from ._replay import replay_autocast, replay_rng
from ._rule import Rule
from ._torch_ops import tree_flatten, tree_unflatten
from ._use import Use
from ._utils import Context, row_chunks, to_dtype

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


@dataclass
class Segment:
    """One affine map of the call that reads rows ``[offset, offset + out)`` of a weight parameter."""

    offset: int
    #: Its input ``[ra, T, in]`` (``ra`` = 1 when shared by every row) and gradient-output ``[m, T, out]``.
    a: Tensor
    b: Tensor


@dataclass
class AttentionCache:
    """What the rule derives from one call (filled at once by the recomputation)."""

    #: The affine maps reading each weight parameter, by name.
    segments: dict[str, list[Segment]] | None = None
    #: Per-row gradients ``[m, *shape]`` of the biases, ``bias_k`` and ``bias_v``, by name.
    rows: dict[str, Tensor] = field(default_factory=dict)


@builtin_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(Rule[AttentionCache]):
    """``nn.MultiheadAttention`` with its stock ``forward``; serves ``out_proj``'s parameters too."""

    name = "multihead_attention"
    keep_all_inputs = True  # query, key, value, masks: the call is recomputed
    needs_rng = True  # attention dropout
    recomputes = True
    #: Every call of this rule is a call of an ``nn.MultiheadAttention`` (``matches``).
    module: nn.MultiheadAttention

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return type(module).forward is nn.MultiheadAttention.forward

    @classmethod
    def claims(cls, module: nn.Module) -> list[nn.Module]:
        out_proj = getattr(module, "out_proj", None)
        return [out_proj] if isinstance(out_proj, nn.Module) else []

    def _arguments(self, use: Use[AttentionCache]) -> dict[str, Any]:
        """The call's arguments by name (``query``, ``key``, ``value``, ``attn_mask``, ...), defaults included."""
        args, kwargs = tree_unflatten(use.inputs, use.in_spec)
        bound = _SIGNATURE.bind(self.module, *args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def supports(self, use: Use[AttentionCache], ctx: Context) -> bool:
        if any(use.expanded) or not use.inputs:
            return False
        try:
            arguments = self._arguments(use)
        except TypeError:
            return False
        query = arguments["query"]
        if not isinstance(query, Tensor) or query.dim() != 3:
            return False  # unbatched
        # Per example the rows are dimension 0 of the inputs and outputs: batch-first calls only.
        return ctx.per_task or (self.module.batch_first and query.shape[0] == ctx.rows)

    def new_cache(self) -> AttentionCache:
        return AttentionCache()

    # ------------------------------------------------------------------ the recomputation
    def _segments(self, use: Use[AttentionCache], ctx: Context) -> dict[str, list[Segment]]:
        cache = self.cache_of(use)
        if cache.segments is None:
            cache.segments = self._recompute(use, ctx, cache.rows)
        return cache.segments

    def _recompute(
        self, use: Use[AttentionCache], ctx: Context, rows: dict[str, Tensor]
    ) -> dict[str, list[Segment]]:
        """Every map's ``(x, b)`` from one recomputation of the call (see the module docstring)."""
        module = self.module
        arguments = self._arguments(use)
        query, key, value = arguments["query"], arguments["key"], arguments["value"]
        if module.batch_first:  # inside, the attention is sequence-first: [T, batch, features]
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        batch, embed = query.shape[1], module.embed_dim
        key_padding_mask, attn_mask = arguments["key_padding_mask"], arguments["attn_mask"]
        # (input, leaf at the output, weight name, its first row, bias name, its first row) of every map.
        taps: list[tuple[Tensor, Tensor, str, int, str, int]] = []
        packed = module.in_proj_weight is not None  # else q_proj_weight, k_proj_weight, v_proj_weight
        names = ["in_proj_weight"] * 3 if packed else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        with replay_rng(use.rng), replay_autocast(use.autocast), torch.enable_grad():
            projected = []
            for index, (x, weight_name) in enumerate(zip((query, key, value), names)):
                row, bias_row = (index * embed if packed else 0), index * embed
                weight = getattr(module, weight_name)[row : row + embed].detach()
                bias = (
                    None if module.in_proj_bias is None else module.in_proj_bias[bias_row : bias_row + embed]
                )
                y = F.linear(x, weight, None if bias is None else bias.detach()).detach().requires_grad_()
                taps.append((x, y, weight_name, row, "in_proj_bias", bias_row))
                projected.append(y)
            q, k, v = projected
            appended: list[tuple[str, Tensor]] = []
            if module.bias_k is not None and module.bias_v is not None:
                extra_k = module.bias_k.detach().repeat(1, batch, 1).requires_grad_()
                extra_v = module.bias_v.detach().repeat(1, batch, 1).requires_grad_()
                appended = [("bias_k", extra_k), ("bias_v", extra_v)]
                k, v = torch.cat([k, extra_k]), torch.cat([v, extra_v])
                # as F.multi_head_attention_forward does when it appends them itself
                attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
                key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
            eye = torch.eye(embed, dtype=q.dtype, device=q.device)
            attended, attention = F.multi_head_attention_forward(
                q,
                k,
                v,
                embed,
                module.num_heads,
                None,
                None,
                None,
                None,
                module.add_zero_attn,
                module.dropout,
                eye,
                None,
                training=module.training,
                key_padding_mask=key_padding_mask,
                need_weights=arguments["need_weights"],
                attn_mask=attn_mask,
                use_separate_proj_weight=True,
                q_proj_weight=eye,
                k_proj_weight=eye,
                v_proj_weight=eye,
                average_attn_weights=arguments["average_attn_weights"],
                is_causal=arguments["is_causal"],
            )
            out_proj = module.out_proj
            zero = torch.zeros_like(attended, requires_grad=True)
            output = (
                F.linear(
                    attended,
                    out_proj.weight.detach(),
                    None if out_proj.bias is None else out_proj.bias.detach(),
                )
                + zero
            )
            if module.batch_first:
                output = output.transpose(0, 1)
        taps.append((attended.detach(), zero, "out_proj.weight", 0, "out_proj.bias", 0))
        outputs = tree_flatten((output, attention))[0]
        pairs = [(outputs[j], g) for j, g in zip(use.out_index, use.grads) if g is not None]
        leaves = [tap[1] for tap in taps] + [leaf for _, leaf in appended]
        grads = _backward([o for o, _ in pairs], leaves, [g for _, g in pairs], ctx)
        m, shared = ctx.rows, ctx.per_task

        def rows_of(value: Tensor, grad: bool) -> Tensor:
            """``[rows, T, features]`` of a ``[T, batch, features]`` tensor (``[m, T, batch, features]`` for the
            gradients per task); an input shared by every task has one row of all the batch's tokens."""
            value = to_dtype(value, ctx.dtype)
            if shared:
                return value.reshape(m if grad else 1, -1, value.shape[-1])
            return value.transpose(0, 1).contiguous()

        segments: dict[str, list[Segment]] = {}
        for (x, leaf, weight_name, row, bias_name, bias_row), grad in zip(taps, grads):
            b_mat = rows_of(_zeros(leaf, m, shared) if grad is None else grad, grad=True)
            if weight_name in self.params:
                segments.setdefault(weight_name, []).append(Segment(row, rows_of(x, grad=False), b_mat))
            if bias_name in self.params:
                param = self.params[bias_name]
                if bias_name not in rows:
                    rows[bias_name] = torch.zeros(m, *param.shape, dtype=ctx.dtype, device=param.device)
                rows[bias_name][:, bias_row : bias_row + b_mat.shape[-1]] += b_mat.sum(dim=1)
        for (name, leaf), grad in zip(appended, grads[len(taps) :]):
            if name in self.params:  # [1, batch, E]: per example its slice, per task the sum over the batch
                g = _zeros(leaf, m, shared) if grad is None else grad
                summed = g.reshape(m, -1, g.shape[-1]).sum(dim=1) if shared else g.reshape(batch, -1)
                rows[name] = to_dtype(summed, ctx.dtype).reshape(m, *self.params[name].shape)
        return segments

    def compact(self, use: Use[AttentionCache]) -> None:
        if use.cache is not None and use.cache.segments is not None:
            use.drop_inputs_and_grads()  # every parameter's rows now follow from the cache

    # ------------------------------------------------------------------ per-row gradients
    def add_param_rows(
        self, use: Use[AttentionCache], ctx: Context, name: str, start: int, stop: int, out: Tensor
    ) -> None:
        segments = self._segments(use, ctx)
        rows = self.cache_of(use).rows.get(name)
        if rows is not None:
            out += rows[:, start:stop]
            return
        for segment in segments.get(name, []):
            low, high = max(start, segment.offset), min(stop, segment.offset + segment.b.shape[-1])
            if low >= high:
                continue
            x = segment.b[..., low - segment.offset : high - segment.offset].transpose(1, 2)
            y = segment.a.expand(ctx.rows, *segment.a.shape[1:])
            out[:, low - start : high - start] += torch.bmm(x, y).view(ctx.rows, high - low, *out.shape[2:])

    def param_gramian(self, use: Use[AttentionCache], ctx: Context, name: str) -> Tensor:
        segments = self._segments(use, ctx)
        rows = self.cache_of(use).rows.get(name)
        if rows is not None:
            return gram(rows)
        total = torch.zeros(ctx.rows, ctx.rows, dtype=ctx.dtype, device=self.params[name].device)
        for segment in segments.get(name, []):  # disjoint row blocks: the Gramians add up
            total += _affine_gramian(segment.a, segment.b, ctx)
        return total

    def param_weighted(self, use: Use[AttentionCache], ctx: Context, name: str, weights: Tensor) -> Tensor:
        segments = self._segments(use, ctx)
        rows = self.cache_of(use).rows.get(name)
        if rows is not None:
            return torch.tensordot(weights.to(rows.dtype), rows, dims=1)
        param = self.params[name]
        update = torch.zeros(param.shape, dtype=ctx.dtype, device=param.device)
        for segment in segments.get(name, []):
            size = segment.b.shape[-1]
            update[segment.offset : segment.offset + size] += weighted_affine(segment.a, segment.b, weights)
        return update


def _zeros(leaf: Tensor, m: int, per_task: bool) -> Tensor:
    """The gradient at a leaf the losses do not reach: zeros (``m`` of them per task)."""
    return torch.zeros((m, *leaf.shape) if per_task else leaf.shape, dtype=leaf.dtype, device=leaf.device)


def _backward(
    outputs: list[Tensor], leaves: list[Tensor], grads: list[Tensor], ctx: Context
) -> list[Tensor | None]:
    """Gradients of the recomputed outputs, with cotangents ``grads``, at ``leaves`` (``[m, ...]`` per task)."""
    if not outputs or not leaves:
        return [None] * len(leaves)
    if not ctx.per_task:
        return list(torch.autograd.grad(outputs, leaves, grads, allow_unused=True))
    try:
        return list(
            torch.autograd.grad(
                outputs, leaves, grads, allow_unused=True, is_grads_batched=True, retain_graph=True
            )
        )
    except Exception:  # noqa: BLE001 - some backward has no batching rule: one backward per task
        per_task = [
            torch.autograd.grad(outputs, leaves, [g[r] for g in grads], allow_unused=True, retain_graph=True)
            for r in range(ctx.rows)
        ]
        stacked: list[Tensor | None] = []
        for k, leaf in enumerate(leaves):
            values = [row[k] for row in per_task]
            stacked.append(
                None
                if all(v is None for v in values)
                else torch.stack([torch.zeros_like(leaf) if v is None else v for v in values])
            )
        return stacked


def _affine_gramian(a_mat: Tensor, b_mat: Tensor, ctx: Context) -> Tensor:
    r""":math:`G_{ij} = \langle \sum_t b_{it} a_{it}^\top, \sum_s b_{js} a_{js}^\top \rangle`: the ghost
    product, or per-row gradients materialised by chunks of output features (within ``ctx.budget``)."""
    if prefers_ghost(a_mat, b_mat, ctx):
        return ghost_gramian(a_mat, b_mat)
    m, cols = ctx.rows, a_mat.shape[-1]
    a_rows = a_mat.expand(m, *a_mat.shape[1:])
    total = torch.zeros(m, m, dtype=ctx.dtype, device=b_mat.device)
    for start, stop in row_chunks(b_mat.shape[-1], cols, m, ctx.budget):
        total += gram(torch.bmm(b_mat[..., start:stop].transpose(1, 2), a_rows))
    return total


__all__ = ["MultiheadAttentionRule"]
