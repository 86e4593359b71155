r"""Rules for affine maps: ``nn.Linear``, GPT-2's ``Conv1D`` and ``nn.Conv2d`` (via unfold).

With input rows :math:`a_{it}` (token :math:`t` of row :math:`i`) and gradient-outputs :math:`b_{it}`,
the per-row gradient of the weight is :math:`g_i = \sum_t b_{it} a_{it}^\top` (Goodfellow, 2015) and
that of the bias :math:`\sum_t b_{it}`. The weight's Gramian block is computed either by
materialising the :math:`g_i` (one layer at a time, in row chunks) or by the "ghost" product
(Li et al., *Large Language Models Can Be Strong Differentially Private Learners*, ICLR 2022)

.. math:: G_{ij} = \sum_{t,s} (a_{it} \cdot a_{js})\,(b_{it} \cdot b_{js}),

whichever a flop estimate says is cheaper. The weighted gradient is one matmul,
:math:`\sum_i w_i g_i = \sum_{i,t} (w_i b_{it}) a_{it}^\top`, from the kept :math:`a, b`.

A row of the input may be shared by every row of the output gradient (per-task objectives, or an
input broadcast over the batch): then :math:`a` has a single row and the same formulas apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeGuard, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._tensors import gram
from ._registry import builtin_rule
from ._rule import Rule
from ._use import Use
from ._utils import Context, row_chunks, to_dtype

_CONV1D: type[nn.Module] | None
try:  # GPT-2's Conv1D: weight [in, out], y = x W + b.
    from transformers.pytorch_utils import Conv1D as _CONV1D
except ImportError:  # pragma: no cover - transformers is a dependency
    _CONV1D = None

_M = TypeVar("_M", bound=nn.Module)


def _forward_is(module: nn.Module, cls: type[_M]) -> TypeGuard[_M]:
    return isinstance(module, cls) and type(module).forward is cls.forward


@dataclass
class LinearCache:
    """What an affine rule derives from one call."""

    #: ``(a, b)`` as ``[rows, tokens, features]`` (``a`` has 1 row when shared), in ``ctx.dtype``.
    matrices: tuple[Tensor, Tensor] | None = None
    #: Per-row gradients of the bias, ``[m, out]``.
    bias_rows: Tensor | None = None
    #: Per-row gradients of a weight, materialised by ``param_gramian`` when memory-neutral, by name.
    rows: dict[str, Tensor] = field(default_factory=dict)


@builtin_rule(nn.Linear if _CONV1D is None else (nn.Linear, _CONV1D))
class LinearRule(Rule[LinearCache]):
    """``nn.Linear`` (weight ``[out, in]``) and ``Conv1D`` (weight ``[in, out]``)."""

    name = "linear"
    row_wise = True
    token_wise = True

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter]) -> None:
        super().__init__(module, params)
        self.in_out = _CONV1D is not None and isinstance(module, _CONV1D)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return _forward_is(module, nn.Linear) or (_CONV1D is not None and _forward_is(module, _CONV1D))

    def supports(self, use: Use[LinearCache], ctx: Context) -> bool:
        x = use.inputs[use.primary] if use.primary is not None else None
        return isinstance(x, Tensor) and x.dim() >= 1 and len(use.edges) == 1

    def new_cache(self) -> LinearCache:
        return LinearCache()

    # ------------------------------------------------------------------ a, b as [rows, tokens, features]
    def _matrices(self, use: Use[LinearCache], ctx: Context) -> tuple[Tensor, Tensor]:
        cache = self.cache_of(use)
        if cache.matrices is None:
            x = use.primary_input
            b = use.output_grad
            shared = use.input_shared(ctx)
            a_mat = to_dtype(x, ctx.dtype).reshape(1 if shared else ctx.rows, -1, x.shape[-1])
            b_mat = to_dtype(b, ctx.dtype).reshape(ctx.rows, -1, b.shape[-1])
            cache.matrices = (a_mat, b_mat)
        return cache.matrices

    # ------------------------------------------------------------------ per-row gradients
    def _operands(self, a_mat: Tensor, b_mat: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """``(x, y)`` with ``x @ y`` = per-row gradients of weight rows ``[start:stop]``, ``[m, R, cols]``."""
        if self.in_out:  # Conv1D: rows of W are input features, g_i = a_iᵀ b_i
            x, y = a_mat[..., start:stop].transpose(1, 2), b_mat
        else:  # g_i = b_iᵀ a_i
            x, y = b_mat[..., start:stop].transpose(1, 2), a_mat
        m = b_mat.shape[0]
        return x.expand(m, *x.shape[1:]), y.expand(m, *y.shape[1:])

    def _bias_rows(self, use: Use[LinearCache], ctx: Context) -> Tensor:
        cache = self.cache_of(use)
        if cache.bias_rows is None:
            cache.bias_rows = self._matrices(use, ctx)[1].sum(dim=1)
        return cache.bias_rows

    def add_param_rows(
        self, use: Use[LinearCache], ctx: Context, name: str, start: int, stop: int, out: Tensor
    ) -> None:
        if name == "bias":
            out += self._bias_rows(use, ctx)[:, start:stop]
            return
        x, y = self._operands(*self._matrices(use, ctx), start, stop)
        out.view(ctx.rows, stop - start, -1).baddbmm_(x, y)

    def write_param_rows(
        self, use: Use[LinearCache], ctx: Context, name: str, start: int, stop: int, out: Tensor
    ) -> bool:
        if name == "bias":
            return False
        x, y = self._operands(*self._matrices(use, ctx), start, stop)
        torch.bmm(x, y, out=out.view(ctx.rows, stop - start, -1))
        return True

    def param_gramian(self, use: Use[LinearCache], ctx: Context, name: str) -> Tensor:
        a_mat, b_mat = self._matrices(use, ctx)
        if name == "bias":
            return gram(self._bias_rows(use, ctx))
        if self._use_ghost(a_mat, b_mat, ctx):
            return ghost_gramian(a_mat, b_mat)
        n_rows = a_mat.shape[-1] if self.in_out else b_mat.shape[-1]
        cols = b_mat.shape[-1] if self.in_out else a_mat.shape[-1]
        size = ctx.rows * n_rows * cols
        if ctx.reserve(size, freed=a_mat.numel() + b_mat.numel()):
            # Keep the per-row gradients in place of the a, b they replace (within a small memory
            # allowance): the weighted gradient is then Σ_i w_i g_i instead of another matmul.
            rows = torch.bmm(*self._operands(a_mat, b_mat, 0, n_rows))
            self.cache_of(use).rows[name] = rows
            return gram(rows)
        total = torch.zeros(ctx.rows, ctx.rows, dtype=ctx.dtype, device=b_mat.device)
        buffer = None
        for start, stop in row_chunks(n_rows, cols, ctx.rows, ctx.budget):
            count = ctx.rows * (stop - start) * cols
            if buffer is None:
                buffer = torch.empty(count, dtype=ctx.dtype, device=b_mat.device)
            block = buffer[:count].view(ctx.rows, stop - start, cols)
            torch.bmm(*self._operands(a_mat, b_mat, start, stop), out=block)
            total += gram(block)
        return total

    def _use_ghost(self, a_mat: Tensor, b_mat: Tensor, ctx: Context) -> bool:
        return prefers_ghost(a_mat, b_mat, ctx)

    # ------------------------------------------------------------------ weighted gradient
    def compact(self, use: Use[LinearCache]) -> None:
        """Free ``a`` and ``b`` once every parameter's weighted gradient can come from cached rows."""
        cache = self.cache_of(use)
        cached = all(
            cache.bias_rows is not None if name == "bias" else name in cache.rows for name in self.params
        )
        if cached:
            cache.matrices = None
            use.drop_inputs_and_grads()

    def param_weighted(self, use: Use[LinearCache], ctx: Context, name: str, weights: Tensor) -> Tensor:
        if name == "bias":
            bias_rows = self._bias_rows(use, ctx)
            return weights.to(bias_rows.dtype) @ bias_rows
        rows = self.cache_of(use).rows.get(name)
        if rows is not None:
            weights = weights.to(rows.dtype)
            return (weights @ rows.reshape(rows.shape[0], -1)).reshape(self.params[name].shape)
        a_mat, b_mat = self._matrices(use, ctx)
        return weighted_affine(a_mat, b_mat, weights, self.in_out).reshape(self.params[name].shape)


def prefers_ghost(a_mat: Tensor, b_mat: Tensor, ctx: Context) -> bool:
    """Whether the ghost product is cheaper (flop estimate, within the memory budget) than materialising
    the per-row weight gradients of ``a [ra, T, in]``, ``b [m, T, out]`` (``ctx.linear_strategy`` forces it)."""
    m, tokens, d_out = b_mat.shape
    d_in = a_mat.shape[-1]
    ghost_memory = (m * tokens) ** 2
    if ctx.linear_strategy == "ghost":
        return True
    if ctx.linear_strategy == "materialize" or ghost_memory > ctx.budget:
        return False
    materialise = m * tokens * d_in * d_out + m * m * d_in * d_out
    ghost = (a_mat.shape[0] * tokens) ** 2 * d_in + ghost_memory * (d_out + 1)
    return ghost < materialise


def weighted_affine(a_mat: Tensor, b_mat: Tensor, weights: Tensor, in_out: bool = False) -> Tensor:
    r""":math:`\sum_i w_i g_i = \sum_{i,t} (w_i b_{it}) a_{it}^\top` (``[out, in]``; ``[in, out]`` with
    ``in_out``) for ``a [ra, T, in]`` (``ra`` = 1: shared by every row) and ``b [m, T, out]``."""
    weights = weights.to(b_mat.dtype)
    if a_mat.shape[0] == 1:  # shared input: Σ_i w_i b_iᵀ a = (Σ_i w_i b_i)ᵀ a
        b_w, a_w = torch.tensordot(weights, b_mat, dims=1), a_mat[0]
    elif a_mat.shape[-1] <= b_mat.shape[-1]:  # scale the smaller operand by the row weights
        b_w = b_mat.reshape(-1, b_mat.shape[-1])
        a_w = (a_mat * weights[:, None, None]).reshape(-1, a_mat.shape[-1])
    else:
        b_w = (b_mat * weights[:, None, None]).reshape(-1, b_mat.shape[-1])
        a_w = a_mat.reshape(-1, a_mat.shape[-1])
    return a_w.T @ b_w if in_out else b_w.T @ a_w


def ghost_gramian(a_mat: Tensor, b_mat: Tensor) -> Tensor:
    r""":math:`G_{ij} = \sum_{t,s} (a_{it} \cdot a_{js})(b_{it} \cdot b_{js})` for ``a [ra, T, in]``, ``b [m, T, out]``."""
    m, tokens, _ = b_mat.shape
    a_flat = a_mat.reshape(-1, a_mat.shape[-1])
    b_flat = b_mat.reshape(-1, b_mat.shape[-1])
    kernel_b = (b_flat @ b_flat.T).view(m, tokens, m, tokens)
    kernel_a = (a_flat @ a_flat.T).view(a_mat.shape[0], tokens, a_mat.shape[0], tokens)
    return (kernel_a * kernel_b).sum(dim=(1, 3))


@builtin_rule(nn.Conv2d)
class Conv2dRule(LinearRule):
    r"""``nn.Conv2d`` (groups 1, zero padding): a Linear over unfolded patches.

    With :math:`a_{it}` the flattened receptive field of output position :math:`t` (``F.unfold``), the
    weight's per-row gradient is :math:`\sum_t b_{it} a_{it}^\top` reshaped to ``[out, in, kh, kw]``.
    """

    name = "conv2d"
    row_wise = False
    token_wise = False
    #: Every call of this rule is a call of an ``nn.Conv2d`` (``matches``).
    module: nn.Conv2d

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter]) -> None:
        super().__init__(module, params)
        self.in_out = False

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        if not _forward_is(module, nn.Conv2d):
            return False
        padding = module.padding
        return (
            module.groups == 1
            and module.padding_mode == "zeros"
            and (not isinstance(padding, str) or padding == "valid")
        )

    def supports(self, use: Use[LinearCache], ctx: Context) -> bool:
        x = use.inputs[use.primary] if use.primary is not None else None
        return isinstance(x, Tensor) and x.dim() == 4 and len(use.edges) == 1

    def _matrices(self, use: Use[LinearCache], ctx: Context) -> tuple[Tensor, Tensor]:
        cache = self.cache_of(use)
        if cache.matrices is None:
            conv = self.module
            x = to_dtype(use.primary_input, ctx.dtype)
            padding = (
                0 if isinstance(conv.padding, str) else conv.padding
            )  # "valid": matches() refuses others
            a_mat = _patches(x, conv, padding)  # [n, positions, in*kh*kw]
            if use.input_shared(ctx):
                a_mat = a_mat.reshape(1, -1, a_mat.shape[-1])
            b = to_dtype(use.output_grad, ctx.dtype)
            out_channels = b.shape[-3]
            positions = b.shape[-1] * b.shape[-2]
            b_mat = (
                b.reshape(ctx.rows, -1, out_channels, positions)
                .transpose(2, 3)
                .reshape(ctx.rows, -1, out_channels)
            )
            cache.matrices = (a_mat, b_mat)
        return cache.matrices


def _patches(x: Tensor, conv: nn.Conv2d, padding: int | tuple[int, ...]) -> Tensor:
    """``F.unfold(x, ...).transpose(1, 2)``: the receptive field of each output position, flattened
    ``(in, kh, kw)``. Patchify convolutions (stride = kernel, no padding or dilation: ViT, ConvNeXt and
    Swin embeddings, ConvNeXt downsampling) tile the input, so their patches are a reshape, not an im2col."""
    kh, kw = conv.kernel_size
    tiles = tuple(conv.stride) == (kh, kw) and tuple(conv.dilation) == (1, 1) and padding in (0, (0, 0))
    if not tiles:
        cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
        return cols.transpose(1, 2)
    n, channels, height, width = x.shape
    rows, cols_ = height // kh, width // kw
    tiled = x[:, :, : rows * kh, : cols_ * kw].reshape(n, channels, rows, kh, cols_, kw)
    return tiled.permute(0, 2, 4, 1, 3, 5).reshape(n, rows * cols_, channels * kh * kw)
