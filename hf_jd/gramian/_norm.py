r"""Rule for ``nn.LayerNorm`` and ``nn.RMSNorm``: elementwise affine maps of a normalised input.

With :math:`\hat a_{it}` the normalised input (recomputed from the kept input with the module's
``eps``), :math:`y = \hat a \odot \gamma + \beta`, so the per-row gradients are
:math:`\sum_t b_{it} \odot \hat a_{it}` for :math:`\gamma` and :math:`\sum_t b_{it}` for :math:`\beta`:
vectors of the size of the normalised shape, always cheap to materialise. Other normalisation
modules (the RMSNorm classes of Hugging Face models, which cast dtypes or use ``1 + w``) go through
the exact generic rule instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._rule import Rule
from ._use import Use
from ._utils import Context, gram, to_dtype

_RMS_NORM = getattr(nn, "RMSNorm", None)


class NormRule(Rule):
    """``nn.LayerNorm`` / ``nn.RMSNorm`` with their stock ``forward``."""

    name = "norm"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        if isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward:
            return True
        return (
            _RMS_NORM is not None
            and isinstance(module, _RMS_NORM)
            and type(module).forward is _RMS_NORM.forward
        )

    def supports(self, use: Use, ctx: Context) -> bool:
        x = use.inputs[use.primary] if use.primary is not None else None
        return isinstance(x, Tensor) and len(use.edges) == 1

    def _per_row(self, use: Use, ctx: Context) -> dict[str, Tensor]:
        cached = use.cache.get("rows")
        if cached is None:
            module = self.module
            x = use.primary_input
            shape = tuple(module.normalized_shape)
            eps = module.eps
            if isinstance(module, nn.LayerNorm):
                x_hat = F.layer_norm(to_dtype(x, ctx.dtype), shape, eps=eps)
            else:
                eps = torch.finfo(x.dtype).eps if eps is None else eps
                x_hat = F.rms_norm(to_dtype(x, ctx.dtype), shape, eps=eps)
            size = x_hat[(0,) * (x_hat.dim() - len(shape))].numel()
            x_mat = x_hat.reshape(1 if use.input_shared(ctx) else ctx.rows, -1, size)
            b_mat = to_dtype(use.grads[0], ctx.dtype).reshape(ctx.rows, -1, size)
            cached = {}
            if "weight" in self.params:
                cached["weight"] = (b_mat * x_mat).sum(dim=1).reshape(ctx.rows, *shape)
            if "bias" in self.params:
                cached["bias"] = b_mat.sum(dim=1).reshape(ctx.rows, *shape)
            use.cache["rows"] = cached
        return cached

    def add_param_rows(self, use: Use, ctx: Context, name: str, start: int, stop: int, out: Tensor) -> None:
        out += self._per_row(use, ctx)[name][:, start:stop]

    def param_gramian(self, use: Use, ctx: Context, name: str) -> Tensor:
        return gram(self._per_row(use, ctx)[name])

    def param_weighted(self, use: Use, ctx: Context, name: str, weights: Tensor) -> Tensor:
        rows = self._per_row(use, ctx)[name]
        return torch.tensordot(weights.to(rows.dtype), rows, dims=1)
