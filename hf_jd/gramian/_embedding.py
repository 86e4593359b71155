r"""Rule for ``nn.Embedding``: sparse per-row gradients.

With ids :math:`x_{it}` and gradient-outputs :math:`b_{it}`, the per-row gradient of the table is
:math:`g_i = \sum_t e_{x_{it}} b_{it}^\top`: only the rows of the ids that row :math:`i` uses are
non-zero. The Gramian is the ghost form with an id-equality kernel,
:math:`G_{ij} = \sum_{t,s} [x_{it} = x_{js}]\,(b_{it} \cdot b_{js})`, evaluated from per-(row, id) sums
(sparse: only the ids a row uses); the weighted gradient is one accumulation of :math:`w_i b_{it}` at
the ids. ``padding_idx`` tokens contribute nothing and ``scale_grad_by_freq`` divides by
the id counts of the call, as PyTorch's backward does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._tensors import gram
from ._registry import builtin_rule
from ._rule import Rule
from ._use import Use
from ._utils import Context, row_chunks, to_dtype


@dataclass
class EmbeddingCache:
    """What the embedding rule derives from one call."""

    #: Ids ``[ra, T]`` (``ra`` = 1 when shared by all rows) and gradients ``[m, T, d]`` (scaled).
    matrices: tuple[Tensor, Tensor] | None = None
    #: Tokens of all rows sorted by id: ``(sorted_ids, token_order, row_of_token)``.
    sorted: tuple[Tensor, Tensor, Tensor] | None = None


@builtin_rule(nn.Embedding)
class EmbeddingRule(Rule[EmbeddingCache]):
    """``nn.Embedding`` (dense or ``sparse=True``; the weighted gradient keeps the module's layout)."""

    name = "embedding"
    #: Token ``t``'s output row reads id ``t`` only (``row_wise`` stays off: the layout pass never needed it).
    token_wise = True
    #: Every call of this rule is a call of an ``nn.Embedding`` (``matches``).
    module: nn.Embedding

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward

    def supports(self, use: Use[EmbeddingCache], ctx: Context) -> bool:
        ids = use.inputs[use.primary] if use.primary is not None else None
        return isinstance(ids, Tensor) and not ids.is_floating_point() and len(use.edges) == 1

    def new_cache(self) -> EmbeddingCache:
        return EmbeddingCache()

    def _matrices(self, use: Use[EmbeddingCache], ctx: Context) -> tuple[Tensor, Tensor]:
        """Ids ``[ra, T]`` (``ra`` = 1 when shared by all rows) and gradients ``[m, T, d]`` (scaled)."""
        cache = self.cache_of(use)
        if cache.matrices is None:
            module = self.module
            ids = use.primary_input
            b = to_dtype(use.output_grad, ctx.dtype)
            id_mat = ids.reshape(1 if use.input_shared(ctx) else ctx.rows, -1)
            b_mat = b.reshape(ctx.rows, -1, b.shape[-1])
            scale = None
            if module.padding_idx is not None:
                scale = (id_mat != module.padding_idx).to(b_mat.dtype)
            if module.scale_grad_by_freq:
                counts = torch.bincount(ids.reshape(-1), minlength=module.num_embeddings).to(b_mat.dtype)
                inverse = 1.0 / counts.clamp(min=1)[id_mat]
                scale = inverse if scale is None else scale * inverse
            if scale is not None:
                b_mat = b_mat * scale[..., None]
            cache.matrices = (id_mat, b_mat)
        return cache.matrices

    def _sorted(self, use: Use[EmbeddingCache], ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens of all rows sorted by id: ``(sorted_ids, token_order, row_of_token)``.

        Tokens index ``b.reshape(m * T, d)``; a chunk of table rows is then a contiguous slice.
        """
        cache = self.cache_of(use)
        if cache.sorted is None:
            id_mat, b_mat = self._matrices(use, ctx)
            m, tokens, _ = b_mat.shape
            ids = id_mat.expand(m, tokens).reshape(-1)
            keys, order = torch.sort(ids, stable=True)
            cache.sorted = (keys, order, order // tokens)
        return cache.sorted

    def _add_rows(self, use: Use[EmbeddingCache], ctx: Context, start: int, stop: int, out: Tensor) -> None:
        """``out[i, x_it - start] += b_it`` for the tokens whose id lies in ``[start, stop)``."""
        keys, order, rows = self._sorted(use, ctx)
        bounds = torch.searchsorted(keys, torch.tensor([start, stop], device=keys.device, dtype=keys.dtype))
        low, high = int(bounds[0]), int(bounds[1])
        if low == high:
            return
        b_flat = self._matrices(use, ctx)[1].reshape(-1, out.shape[-1])
        index = rows[low:high] * (stop - start) + (keys[low:high] - start)
        out.view(-1, out.shape[-1]).index_put_((index,), b_flat[order[low:high]], accumulate=True)

    def add_param_rows(
        self, use: Use[EmbeddingCache], ctx: Context, name: str, start: int, stop: int, out: Tensor
    ) -> None:
        self._add_rows(use, ctx, start, stop, out)

    def param_gramian(self, use: Use[EmbeddingCache], ctx: Context, name: str) -> Tensor:
        r"""Gramian from per-(row, id) sums :math:`s_{iu} = \sum_{t: x_{it} = u} b_{it}`.

        :math:`G_{ij} = \sum_u \langle s_{iu}, s_{ju} \rangle`: an id used by a single row only adds
        :math:`\|s_{iu}\|^2` to :math:`G_{ii}`; ids shared by several rows (frequent tokens, positions)
        go through a dense ``[m, |U_shared|, d]`` block, chunked over :math:`U_{shared}`.
        """
        id_mat, b_mat = self._matrices(use, ctx)
        m, tokens, dim = b_mat.shape
        device = b_mat.device
        n_ids = self.module.num_embeddings
        rows = torch.arange(m, device=device).repeat_interleave(tokens)
        keys, inverse = torch.unique(rows * n_ids + id_mat.expand(m, tokens).reshape(-1), return_inverse=True)
        sums = torch.zeros(keys.numel(), dim, dtype=b_mat.dtype, device=device)
        sums.index_put_((inverse,), b_mat.reshape(-1, dim), accumulate=True)
        key_rows, key_ids = keys // n_ids, keys % n_ids
        _, id_index, counts = torch.unique(key_ids, return_inverse=True, return_counts=True)
        multi = counts >= 2
        shared_key = multi[id_index]
        total = torch.zeros(m, m, dtype=ctx.dtype, device=device)
        single = ~shared_key
        diagonal = torch.zeros(m, dtype=ctx.dtype, device=device)
        diagonal.index_put_((key_rows[single],), sums[single].square().sum(dim=1), accumulate=True)
        total += torch.diag(diagonal)
        n_shared = int(multi.sum())
        if n_shared:
            column = (multi.cumsum(0) - 1)[id_index[shared_key]]
            shared_rows, shared_sums = key_rows[shared_key], sums[shared_key]
            for start, stop in row_chunks(n_shared, dim, m, ctx.budget):
                select = (column >= start) & (column < stop)
                block = torch.zeros(m * (stop - start), dim, dtype=b_mat.dtype, device=device)
                block[shared_rows[select] * (stop - start) + column[select] - start] = shared_sums[select]
                total += gram(block.view(m, -1))
        return total

    def param_weighted(self, use: Use[EmbeddingCache], ctx: Context, name: str, weights: Tensor) -> Tensor:
        id_mat, b_mat = self._matrices(use, ctx)
        weights = weights.to(b_mat.dtype)
        if id_mat.shape[0] == 1:
            index, values = id_mat[0], torch.tensordot(weights, b_mat, dims=1)
        else:
            index, values = id_mat.reshape(-1), (b_mat * weights[:, None, None]).reshape(-1, b_mat.shape[-1])
        weight = self.params[name]
        if self.module.sparse:
            return torch.sparse_coo_tensor(index[None], values, weight.shape).coalesce()
        out = torch.zeros(weight.shape, dtype=values.dtype, device=values.device)
        return out.index_put_((index,), values, accumulate=True)
