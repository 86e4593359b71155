r"""The exact generic rule: module-local per-row vector-Jacobian products with ``torch.func``.

For a module :math:`y = f(a; \theta)` that treats the examples of its input independently, the
gradient of :math:`L_i` with respect to the module's own parameters is the VJP of the module alone,
:math:`g_i = (\partial f(a_i; \theta)/\partial \theta)^\top b_i`, with the captured input :math:`a_i`
and gradient-output :math:`b_i` of example :math:`i` — no pass through the rest of the model.

* Deterministic call, per-example rows: ``vmap`` over examples of ``vjp(functional_call(module,
  ...))`` (each example keeps a leading batch dimension of 1, so shape logic in the module still
  holds); a per-example loop if ``vmap`` fails.
* Call that drew random numbers (dropout), or per-task rows: one recomputation of the whole call
  with the RNG state of the original forward replayed (same dropout masks), then ``vmap`` of its VJP
  over the ``m`` row cotangents (for examples: :math:`b` masked to example :math:`i`); a loop if
  ``vmap`` fails.

Parameters used *functionally* by their owner (ViT's ``cls_token`` and ``position_embeddings`` in
``ViTEmbeddings``) are exact this way, as are normalisation layers with dtype casts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from ._replay import replay_autocast, replay_rng
from ._rule import PerRowCache, PerRowRule
from ._torch_ops import tree_flatten, tree_unflatten
from ._use import Use
from ._utils import Context, to_dtype

_CACHE: type | None
try:
    from transformers.cache_utils import Cache as _CACHE
except ImportError:  # pragma: no cover - transformers is a dependency
    _CACHE = None


class GenericRule(PerRowRule):
    """Any module owning trainable parameters that no specialised rule knows."""

    name = "generic"
    keep_all_inputs = True
    needs_rng = True
    recomputes = True

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return True

    def supports(self, use: Use[PerRowCache], ctx: Context) -> bool:
        # Re-running a call that updates a KV cache would update it twice.
        return _CACHE is None or not any(isinstance(leaf, _CACHE) for leaf in use.inputs)

    # ------------------------------------------------------------------ per-row gradients
    def compute_rows(self, use: Use[PerRowCache], ctx: Context) -> dict[str, Tensor]:
        grads = list(use.grads)
        if ctx.per_task or use.rng is not None:
            rows = self._recompute_rows(use, ctx, grads)
        else:
            rows = self._per_example_rows(use, ctx, grads)
        return {name: to_dtype(value, ctx.dtype) for name, value in rows.items()}

    def _leaves(self, use: Use[PerRowCache]) -> list[object]:
        return [leaf.detach() if isinstance(leaf, Tensor) else leaf for leaf in use.inputs]

    def _call(
        self, params: dict[str, Tensor], leaves: list[object], use: Use[PerRowCache]
    ) -> tuple[Tensor, ...]:
        args, kwargs = tree_unflatten(leaves, use.in_spec)
        output = functional_call(self.module, params, tuple(args), dict(kwargs))
        flat = tree_flatten(output)[0]
        return tuple(flat[j] for j in use.out_index)

    def _zeros_like_outputs(
        self, use: Use[PerRowCache], grads: list[Tensor | None], ctx: Context
    ) -> list[Tensor]:
        """Replace unreached outputs' gradients by zeros of the right shape (computed lazily)."""
        reached = [g for g in grads if g is not None]
        if len(reached) == len(grads):
            return reached
        with torch.no_grad(), replay_rng(use.rng), replay_autocast(use.autocast):
            outs = self._call(dict(self.params), self._leaves(use), use)
        filled = []
        for g, out, expanded in zip(grads, outs, use.expanded):
            if g is None:
                m = ctx.rows
                shape = (m, *out.shape[1:]) if expanded else ((m, *out.shape) if ctx.per_task else out.shape)
                g = torch.zeros(shape, dtype=out.dtype, device=out.device)
            filled.append(g)
        return filled

    def _per_example_rows(
        self, use: Use[PerRowCache], ctx: Context, out_grads: list[Tensor | None]
    ) -> dict[str, Tensor]:
        grads = self._zeros_like_outputs(use, out_grads, ctx)
        leaves = self._leaves(use)
        # The input tensors that hold one slice per example, by position among the leaves.
        row_inputs = {k: leaf for k, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and use.in_rows[k]}
        primals = {name: p.detach() for name, p in self.params.items()}

        def one(row_values: tuple[Tensor, ...], cotangents: tuple[Tensor, ...]) -> dict[str, Tensor]:
            def f(params: dict[str, Tensor]) -> tuple[Tensor, ...]:
                values = list(leaves)
                for k, value in zip(row_inputs, row_values):
                    values[k] = value
                return self._call(params, values, use)

            vjp_fn = vjp(f, primals)[1]
            return vjp_fn(cotangents)[0]

        row_values = tuple(value.unsqueeze(1) for value in row_inputs.values())
        cotangents = tuple(g.unsqueeze(1) for g in grads)
        try:
            with replay_autocast(use.autocast):
                return vmap(one, randomness="error")(row_values, cotangents)
        except Exception:  # noqa: BLE001 - vmap has no rule for some op: exact loop instead
            return self._loop_rows(use, ctx, grads, leaves, row_inputs)

    def _loop_rows(
        self,
        use: Use[PerRowCache],
        ctx: Context,
        grads: list[Tensor],
        leaves: list[object],
        row_inputs: dict[int, Tensor],
    ) -> dict[str, Tensor]:
        names = list(self.params)
        rows: dict[str, list[Tensor]] = {name: [] for name in names}
        for i in range(ctx.rows):
            values = list(leaves)
            for k, value in row_inputs.items():
                values[k] = value[i : i + 1]
            with torch.enable_grad(), replay_autocast(use.autocast):
                outs = self._call(dict(self.params), values, use)
                cotangents = [g[i : i + 1] for g in grads]
                result = torch.autograd.grad(
                    outs, [self.params[n] for n in names], cotangents, allow_unused=True
                )
            for name, value in zip(names, result):
                rows[name].append(torch.zeros_like(self.params[name]) if value is None else value)
        return {name: torch.stack(values) for name, values in rows.items()}

    def _recompute_rows(
        self, use: Use[PerRowCache], ctx: Context, out_grads: list[Tensor | None]
    ) -> dict[str, Tensor]:
        grads = self._zeros_like_outputs(use, out_grads, ctx)
        leaves = self._leaves(use)
        primals = {name: p.detach() for name, p in self.params.items()}
        with replay_rng(use.rng), replay_autocast(use.autocast), torch.enable_grad():
            vjp_fn = vjp(lambda params: self._call(params, leaves, use), primals)[1]
        cotangents = tuple(self._row_cotangents(g, expanded, ctx) for g, expanded in zip(grads, use.expanded))
        per_row = sum(c[0].numel() for c in cotangents)
        chunk = max(1, ctx.budget // max(1, per_row))
        try:
            return vmap(vjp_fn, chunk_size=chunk)(cotangents)[0]
        except Exception:  # noqa: BLE001 - exact loop instead
            names = list(self.params)
            with replay_rng(use.rng), replay_autocast(use.autocast), torch.enable_grad():
                outs = self._call(dict(self.params), leaves, use)
            rows: list[list[Tensor]] = []
            for i in range(ctx.rows):
                result = torch.autograd.grad(
                    outs,
                    [self.params[n] for n in names],
                    [c[i] for c in cotangents],
                    retain_graph=i + 1 < ctx.rows,
                    allow_unused=True,
                )
                rows.append(
                    [torch.zeros_like(self.params[n]) if r is None else r for n, r in zip(names, result)]
                )
            return {name: torch.stack([row[k] for row in rows]) for k, name in enumerate(names)}

    @staticmethod
    def _row_cotangents(grad: Tensor, expanded: bool, ctx: Context) -> Tensor:
        """Cotangents ``[m, *output.shape]``: per task as given, per example ``b`` restricted to example ``i``."""
        if ctx.per_task:
            return grad
        if expanded:  # the module's own output has a leading 1 that the engine broadcast over the batch
            return grad.unsqueeze(1)
        m = ctx.rows
        rows = torch.zeros((m, *grad.shape), dtype=grad.dtype, device=grad.device)
        index = torch.arange(m, device=grad.device)
        rows[index, index] = grad
        return rows
