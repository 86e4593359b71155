r"""Rules for ``nn.LayerNorm``, ``nn.RMSNorm`` and ``nn.GroupNorm``: affine maps of a normalised input.

With :math:`\hat a_{it}` the normalised input (recomputed from the kept input with the module's
``eps``), :math:`y = \hat a \odot \gamma + \beta`, so the per-row gradients are
:math:`\sum_t b_{it} \odot \hat a_{it}` for :math:`\gamma` and :math:`\sum_t b_{it}` for :math:`\beta`:
vectors of the size of the normalised shape, always cheap to materialise. Other normalisation
modules (the RMSNorm classes of Hugging Face models, which cast dtypes or use ``1 + w``) go through
the exact generic rule instead.

``nn.GroupNorm`` normalises each example over groups of channels and scales channel :math:`c` by
:math:`\gamma_c`: with :math:`\hat a` recomputed by ``F.group_norm`` without the affine map, the
per-row gradients are :math:`\sum_{s} b_{i c s} \hat a_{i c s}` and :math:`\sum_s b_{i c s}` over the
spatial positions :math:`s` (PoolFormer, diffusion U-Nets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import builtin_rule
from ._rule import PerRowCache, PerRowRule
from ._use import Use
from ._utils import Context, to_dtype

_RMS_NORM = getattr(nn, "RMSNorm", None)


@builtin_rule(nn.LayerNorm if _RMS_NORM is None else (nn.LayerNorm, _RMS_NORM))
class NormRule(PerRowRule):
    """``nn.LayerNorm`` / ``nn.RMSNorm`` with their stock ``forward``."""

    name = "norm"
    row_wise = True
    token_wise = True
    #: Every call of this rule is a call of one of these (``matches``).
    module: nn.LayerNorm | nn.RMSNorm

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        if isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward:
            return True
        return (
            _RMS_NORM is not None
            and isinstance(module, _RMS_NORM)
            and type(module).forward is _RMS_NORM.forward
        )

    def supports(self, use: Use[PerRowCache], ctx: Context) -> bool:
        x = use.inputs[use.primary] if use.primary is not None else None
        return isinstance(x, Tensor) and len(use.edges) == 1

    def compute_rows(self, use: Use[PerRowCache], ctx: Context) -> dict[str, Tensor]:
        module = self.module
        x = use.primary_input
        shape = tuple(module.normalized_shape)
        if isinstance(module, nn.LayerNorm):
            x_hat = F.layer_norm(to_dtype(x, ctx.dtype), shape, eps=module.eps)
        else:
            eps = torch.finfo(x.dtype).eps if module.eps is None else module.eps
            x_hat = F.rms_norm(to_dtype(x, ctx.dtype), shape, eps=eps)
        size = x_hat[(0,) * (x_hat.dim() - len(shape))].numel()
        x_mat = x_hat.reshape(1 if use.input_shared(ctx) else ctx.rows, -1, size)
        b_mat = to_dtype(use.output_grad, ctx.dtype).reshape(ctx.rows, -1, size)
        rows = {}
        if "weight" in self.params:
            rows["weight"] = (b_mat * x_mat).sum(dim=1).reshape(ctx.rows, *shape)
        if "bias" in self.params:
            rows["bias"] = b_mat.sum(dim=1).reshape(ctx.rows, *shape)
        return rows


@builtin_rule(nn.GroupNorm)
class GroupNormRule(PerRowRule):
    """``nn.GroupNorm`` with its stock ``forward`` (channels at dimension 1)."""

    name = "group_norm"
    #: Every call of this rule is a call of an ``nn.GroupNorm`` (``matches``).
    module: nn.GroupNorm

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.GroupNorm) and type(module).forward is nn.GroupNorm.forward

    def supports(self, use: Use[PerRowCache], ctx: Context) -> bool:
        x = use.inputs[use.primary] if use.primary is not None else None
        return isinstance(x, Tensor) and x.dim() >= 2 and len(use.edges) == 1

    def compute_rows(self, use: Use[PerRowCache], ctx: Context) -> dict[str, Tensor]:
        module = self.module
        x = to_dtype(use.primary_input, ctx.dtype)
        channels = module.num_channels
        x_hat = F.group_norm(x, module.num_groups, eps=module.eps)
        x_mat = x_hat.reshape(1 if use.input_shared(ctx) else ctx.rows, -1, channels, x_hat[0, 0].numel())
        b = to_dtype(use.output_grad, ctx.dtype)
        b_mat = b.reshape(ctx.rows, -1, channels, x_mat.shape[-1])
        rows = {}
        if "weight" in self.params:
            rows["weight"] = (b_mat * x_mat).sum(dim=(1, 3))
        if "bias" in self.params:
            rows["bias"] = b_mat.sum(dim=(1, 3))
        return rows
