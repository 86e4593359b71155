r"""Rule for grouped and depthwise convolutions: ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups > 1``.

A grouped convolution with ``G`` groups maps input channels :math:`C_{in}` to :math:`C_{out}` with a
weight of shape ``[C_out, C_in / G, *k]``: small (ConvNeXt's depthwise ``7x7`` convolution has
:math:`C \cdot 49` weights), so per-row gradients are cheap to materialise, while the ghost product
would pay one ``(n P)^2`` kernel per group. The per-example weight gradient

.. math:: g_i = \nabla_W \langle b_i, \operatorname{conv}(a_i; W) \rangle

is computed for all examples at once by ONE weight-gradient convolution of the batch folded into the
channels: input ``a`` viewed as ``[1, n C_in, *spatial]``, gradient-output ``b`` as
``[1, n C_out, *spatial']``, ``groups = n G`` — group ``(i, g)`` of the folded convolution is group
``g`` of example ``i``, so the folded weight gradient ``[n C_out, C_in/G, *k]`` is exactly the stack
of the :math:`g_i` (the same per-sample trick as Opacus' grad sampler for convolutions). The bias
gradient is :math:`\sum_t b_{it}`. When the input is shared by every row (per-task objectives, or an
input broadcast over the batch), :math:`g_r` is the weight gradient of row :math:`r`'s
gradient-output alone. The per-row gradients are then reused for :math:`\sum_i w_i g_i`
(:class:`~hf_jd.gramian._rule.PerRowRule`): no second product.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._rule import PerRowCache, PerRowRule
from ._use import Use
from ._utils import Context, to_dtype

_CONVS: tuple[type[nn.Conv1d] | type[nn.Conv2d], ...] = (nn.Conv1d, nn.Conv2d)


class GroupedConvRule(PerRowRule):
    """``nn.Conv1d`` / ``nn.Conv2d`` with their stock ``forward``, ``groups > 1``, zero padding given as ints."""

    name = "grouped_conv"
    #: Every call of this rule is a call of one of these (``matches``).
    module: nn.Conv1d | nn.Conv2d

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        for conv in _CONVS:
            if isinstance(module, conv) and type(module).forward is conv.forward:
                padding = module.padding
                return (
                    module.groups > 1
                    and module.padding_mode == "zeros"
                    and (not isinstance(padding, str) or padding == "valid")
                )
        return False

    def supports(self, use: Use[PerRowCache], ctx: Context) -> bool:
        x = use.inputs[use.primary] if use.primary is not None else None
        spatial = len(self.module.kernel_size)
        return isinstance(x, Tensor) and x.dim() == spatial + 2 and len(use.edges) == 1

    def _weight_grad(self, x: Tensor, b: Tensor, folds: int) -> Tensor:
        """Weight gradient of a convolution of ``x`` with ``groups * folds`` groups and gradient-output ``b``."""
        conv = self.module
        spatial = len(conv.kernel_size)
        padding = [0] * spatial if isinstance(conv.padding, str) else list(conv.padding)
        shape = (conv.out_channels * folds, conv.in_channels // conv.groups, *conv.kernel_size)
        weight = x.new_zeros(()).expand(shape)  # only its shape is read
        _, grad_weight, _ = torch.ops.aten.convolution_backward(
            b,
            x,
            weight,
            None,
            list(conv.stride),
            padding,
            list(conv.dilation),
            False,
            [0] * spatial,
            conv.groups * folds,
            [False, True, False],
        )
        return grad_weight

    def compute_rows(self, use: Use[PerRowCache], ctx: Context) -> dict[str, Tensor]:
        x = to_dtype(use.primary_input, ctx.dtype)
        b = to_dtype(use.output_grad, ctx.dtype)
        m = ctx.rows
        conv = self.module
        rows: dict[str, Tensor] = {}
        if "weight" in self.params:
            if use.input_shared(ctx):  # b is [m, *output]; one weight gradient per row
                b = b.reshape(m, -1, *b.shape[-len(conv.kernel_size) - 1 :])
                weight = torch.stack([self._weight_grad(x, b[r], 1) for r in range(m)])
            else:  # fold the examples into the channels: one convolution for all rows
                folded_x = x.reshape(1, -1, *x.shape[2:])
                folded_b = b.reshape(1, -1, *b.shape[2:])
                weight = self._weight_grad(folded_x, folded_b, m).reshape(m, *conv.weight.shape)
            rows["weight"] = weight
        if "bias" in self.params:
            positions = math.prod(b.shape[-len(conv.kernel_size) :])  # b: [m, (N,) C_out, *spatial']
            rows["bias"] = b.reshape(m, -1, conv.out_channels, positions).sum(dim=(1, 3))
        return rows
