r"""Rule for grouped and depthwise convolutions: ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups > 1``.

A grouped convolution with ``G`` groups maps input channels :math:`C_{in}` to :math:`C_{out}` with a
weight of shape ``[C_out, C_in / G, *k]``: small (ConvNeXt's depthwise ``7x7`` convolution has
:math:`C \cdot 49` weights), so per-row gradients are cheap to materialise, while the ghost product
would pay one ``(n P)^2`` kernel per group. The per-example weight gradient

.. math:: g_i = \nabla_W \langle b_i, \operatorname{conv}(a_i; W) \rangle

is computed for all examples at once by ONE convolution. Written out, with :math:`\tilde a` the
zero-padded input, stride :math:`s` and dilation :math:`d`,

.. math:: g_i[o, c, \kappa] = \sum_{t} b_i[o, t]\, \tilde a_i[\gamma(o) C_{in}/G + c,\; s t + d \kappa],

a correlation of :math:`\tilde a` with :math:`b` used as the kernel: a convolution whose *batch* is
the :math:`C_{in}/G` channels of a group, whose ``n G`` groups are the (example, group) pairs (one
input channel each, the :math:`C_{out}/G` gradient-outputs of that group as kernels), with stride
:math:`d` and dilation :math:`s` swapped; its output, cropped to the kernel size, is the stack of the
:math:`g_i`. Unlike the weight-gradient kernel of a convolution of the batch folded into the
channels (Opacus' grad-sampler trick, kept for the per-row case below), this is one forward
convolution with a large kernel and a small output, 4-12x faster on CPU for ConvNeXt's depthwise
``7x7`` layers. The bias
gradient is :math:`\sum_t b_{it}`. When the input is shared by every row (per-task objectives, or an
input broadcast over the batch), :math:`g_r` is the weight gradient of row :math:`r`'s
gradient-output alone. The per-row gradients are then reused for :math:`\sum_i w_i g_i`
(:class:`~hf_jd.gramian._rule.PerRowRule`): no second product.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._registry import builtin_rule
from ._rule import PerRowCache, PerRowRule
from ._use import Use
from ._utils import Context, to_dtype

_CONVS: tuple[type[nn.Conv1d] | type[nn.Conv2d], ...] = (nn.Conv1d, nn.Conv2d)


@builtin_rule(_CONVS)
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

    def _per_example_weight_grads(self, x: Tensor, b: Tensor) -> Tensor:
        """``[n, C_out, C_in/G, *k]``: the weight gradient of each example (see the module docstring)."""
        conv = self.module
        spatial = len(conv.kernel_size)
        padding = [0] * spatial if isinstance(conv.padding, str) else list(conv.padding)
        n, channels = x.shape[:2]
        groups, per_group = conv.groups, channels // conv.groups
        pad = [side for size in reversed(padding) for side in (size, size)]
        padded = torch.nn.functional.pad(x, pad) if any(padding) else x
        inputs = padded.reshape(n, groups, per_group, *padded.shape[2:]).movedim(2, 0)
        inputs = inputs.reshape(per_group, n * groups, *padded.shape[2:])
        kernels = b.reshape(n * conv.out_channels, 1, *b.shape[2:])
        correlate = torch.nn.functional.conv1d if spatial == 1 else torch.nn.functional.conv2d
        out = correlate(
            inputs, kernels, stride=tuple(conv.dilation), dilation=tuple(conv.stride), groups=n * groups
        )
        for dim, size in enumerate(conv.kernel_size):  # crop to the kernel: [C_in/G, n C_out, *k]
            out = out.narrow(2 + dim, 0, size)
        return out.reshape(per_group, n, conv.out_channels, *conv.kernel_size).movedim(0, 2)

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
            else:  # one correlation of the inputs with the gradient-outputs, for all rows
                weight = self._per_example_weight_grads(x, b)
            rows["weight"] = weight
        if "bias" in self.params:
            positions = math.prod(b.shape[-len(conv.kernel_size) :])  # b: [m, (N,) C_out, *spatial']
            rows["bias"] = b.reshape(m, -1, conv.out_channels, positions).sum(dim=(1, 3))
        return rows
