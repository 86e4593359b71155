r"""The Gramian engine on a model sharded with FSDP2 (``fully_shard``).

The engine's rules need the captured inputs :math:`a` and gradient-outputs :math:`b` of each layer,
never the parameter values: under FSDP2 each rank sees the unsharded computation of its own examples
(FSDP all-gathers a unit's parameters for its forward and backward), so its per-layer Gramian blocks
are those of the unsharded model. For one step this engine runs the base engine on FSDP's full-size
*unsharded* parameters (the leaves of the autograd graph) and changes only what crosses ranks:

* **Local scope** (``scope="local"``, per example or per task): rank :math:`r` forms its own
  :math:`G_r = J_r J_r^\top` and weights :math:`w_r`; per parameter, the full-size :math:`J_r^\top w_r`
  exists transiently and is reduce-scattered (mean over ranks) into the ``DTensor`` gradient shard —
  what DDP's all-reduce of the local step gives, one parameter's traffic at a time.
* **Per-task, global scope**: the objectives are the rank-mean task losses, :math:`\bar J =
  \tfrac1N \sum_r J_r` (``k`` rows). Per shared parameter, the ``k`` per-task gradients are
  reduce-scattered (mean): rank :math:`s` holds :math:`\bar J_{[:, R_s]}`; :math:`G = \sum_s \bar J_{[:,
  R_s]} \bar J_{[:, R_s]}^\top` by one all-reduce of ``k x k``. The update :math:`\bar J^\top w = \tfrac1N
  \sum_r J_r^\top w` is reduce-scattered (mean) into the shards.
* **Per-example, global scope** (:meth:`global_gramian`): the objectives are the examples of every
  rank. Per parameter, one all-to-all gives rank :math:`s` the column shard :math:`J_{[:, R_s]}`
  (``B x |R_s|``) of the global Jacobian; :math:`G = \sum_s J_{[:, R_s]} J_{[:, R_s]}^\top` by one
  all-reduce of ``B x B``; rank :math:`r` then writes its rows' share :math:`J_r^\top w_r`, and the
  reduce-scatter (sum) of those gives each shard of :math:`J^\top w`.

Memory: one parameter's per-row gradients (``m`` times its size) or full-size update at a time, plus
what FSDP itself all-gathers; never the full parameter set. The rows :math:`R_s` are FSDP's dim-0 chunks.

Not served (refused with :class:`GramianEngineError`): modules without a specialised rule (the
generic rule re-runs a module with its full parameter values, which FSDP has freed), parameters that
need the batched-autograd fallback, the exactness self-check (it would materialise full-size
gradients of every parameter), and aggregators that need :math:`J` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._tensors import gram
from ..aggregation import Aggregator
from ..gramian import GramianEngine, GramianEngineError
from ._collectives import all_gather_sizes, all_reduce_sum_on_, any_across_ranks, on_any_rank, world_size
from ._fsdp import (
    ShardedParameter,
    add_to_sharded_grad,
    all_to_all_rows,
    check_all_sharded,
    is_fsdp2_model,
    local_shard,
    reduce_scatter_rows,
    sharded_parameters,
)

_SUPPORTED = "Linear, GPT-2 Conv1D, Conv2d, Embedding, LayerNorm and RMSNorm"


class FSDPGramianEngine(GramianEngine):
    """:class:`~hf_jd.gramian.GramianEngine` for a ``fully_shard`` model: gradients land in the shards.

    Args:
        model: the FSDP2 model (``fully_shard`` applied to its layers and to the root).
        objectives: ``"per_example"`` or ``"per_task"``.
        scope: ``"local"`` (each rank aggregates its own rows, updates averaged) or ``"global"``.
        **kwargs: as :class:`~hf_jd.gramian.GramianEngine`.

    ``.grad`` of every parameter is its ``DTensor`` shard, written by a collective in
    :meth:`accumulate_grad` on every micro-batch: no further gradient synchronisation is needed.
    """

    name = "gramian"
    #: the self-check would materialise full-size per-row gradients of every parameter
    self_check = False
    #: ``.grad`` is synchronised (reduce-scattered) by :meth:`accumulate_grad` itself
    synchronises_gradients = True

    def __init__(
        self,
        model: nn.Module,
        objectives: Literal["per_example", "per_task"] = "per_example",
        *,
        scope: Literal["local", "global"] = "local",
        **kwargs: Any,
    ) -> None:
        if scope not in ("local", "global"):
            raise ValueError(f"scope must be 'local' or 'global', got {scope!r}.")
        super().__init__(model, objectives, **kwargs)
        self._recorder.op_level_only = True  # a generic record would re-run a module with freed parameters
        self.scope = scope
        self._sharded_params = list(self.params)
        self._shards: dict[int, ShardedParameter] | None = None  # by id of the unsharded parameter
        self._sizes: list[int] | None = None  # per-example global: every rank's row count

    def check_supported(self) -> None:
        super().check_supported()
        if not is_fsdp2_model(self.model):
            raise GramianEngineError("FSDPGramianEngine needs a model sharded with FSDP2 (fully_shard).")
        if self._always_fallback:
            raise GramianEngineError(
                "Under FSDP2 the Gramian engine cannot serve parameters owned by the root module or by batch-norm "
                "layers (they need the batched-autograd fallback over full-size parameters)."
            )
        for index, (module, rule) in enumerate(self._recorder.owners):
            if rule.recomputes and index not in self._recorder.op_rules:
                which = (
                    "has no specialised Gramian rule; the generic rule"
                    if rule.name == "generic"
                    else f"is served by the {rule.name!r} Gramian rule, which"
                )
                raise GramianEngineError(
                    f"{type(module).__name__} {which} re-runs a module with its full parameters, which FSDP2 frees "
                    f"after use. Under FSDP2 the Gramian engine serves {_SUPPORTED} layers only."
                )

    # ------------------------------------------------------------------ unsharded view of one step
    def _enter_unsharded(self) -> None:
        """Run the step on FSDP's unsharded parameters: the leaves the captured graph reaches."""
        shards = sharded_parameters(self.model)
        check_all_sharded(self._sharded_params, shards)
        self._shards = {id(shards[id(p)].unsharded): shards[id(p)] for p in self._sharded_params}
        self._swap({id(p): shards[id(p)].unsharded for p in self._sharded_params})

    def _swap(self, by_id: dict[int, nn.Parameter]) -> None:
        self.params = [by_id.get(id(p), p) for p in self.params]
        for rule in self._recorder.rules():
            rule.params = {name: by_id.get(id(p), p) for name, p in rule.params.items()}

    def release(self) -> None:
        super().release()
        if self._shards is not None:
            self._swap({uid: info.sharded for uid, info in self._shards.items()})
            self._shards = None
        self._sizes = None

    def gramian(
        self,
        losses: Tensor,
        *,
        verify_rows: Sequence[int] = (),
        dtype: torch.dtype | None = None,
        row_objective: Tensor | None = None,
        token_objective: Tensor | None = None,
    ) -> Tensor:
        """This rank's Gramian (local scope) or the global one (per-task global); see the module docstring.

        Objectives over groups of rows (``row_objective``) or token segments (``token_objective``) are refused
        under FSDP2 for now."""
        if row_objective is not None or token_objective is not None:
            raise GramianEngineError(
                "FSDPGramianEngine does not serve objectives over groups of rows or token segments (ObjectiveLosses) "
                "yet; without FSDP2, the Gramian engine and the explicit-Jacobian engine both do."
            )
        if len(verify_rows):
            raise GramianEngineError("The exactness self-check is not available under FSDP2.")
        self._enter_unsharded()
        return super().gramian(losses, dtype=dtype)

    def global_gramian(
        self,
        losses: Tensor,
        *,
        verify_rows: Sequence[int] = (),
        dtype: torch.dtype | None = None,
        row_objective: Tensor | None = None,
        token_objective: Tensor | None = None,
    ) -> tuple[Tensor, list[int]]:
        """Per-example global scope: the ``[B, B]`` Gramian of every rank's examples, and each rank's count
        (objectives over groups of rows, ``row_objective``, are refused, as by :meth:`gramian`)."""
        if row_objective is not None or token_objective is not None:
            self.gramian(
                losses, row_objective=row_objective, token_objective=token_objective
            )  # raises the refusal
        if self.per_task or self.scope != "global":
            raise GramianEngineError("global_gramian() serves per-example objectives in the global scope.")
        self._sizes = all_gather_sizes(losses.numel(), losses.device)
        return self.gramian(losses, verify_rows=verify_rows, dtype=dtype), list(self._sizes)

    def aggregate(self, aggregator: Aggregator, losses: Tensor, scale: float) -> Tensor:
        raise TypeError(
            f"FSDPGramianEngine never forms the Jacobian, so it cannot aggregate it with {aggregator!r} (the trainer's "
            "FSDP2 backend refuses such aggregators up front)."
        )

    # ------------------------------------------------------------------ what crosses ranks
    def _exchanges(self) -> bool:
        return self.scope == "global" and world_size() > 1

    def _assemble(self, state: Any, device: torch.device) -> Tensor:
        if not self._exchanges():
            return super()._assemble(state, device)
        ctx = state.ctx
        state.find_shared(self.per_task)
        self._agree_on_shared(state, device)
        rows_total = ctx.rows if self.per_task else sum(self._require_sizes())
        gramian = torch.zeros(rows_total, rows_total, dtype=ctx.dtype, device=device)
        for param in self.params:
            if not state.shared.get(id(param), False):
                continue
            info = self._info(param)
            rows = self._local_rows(state, param)
            if self.per_task:  # rank s: rows R_s of the rank-mean task gradients, [k, |R_s|, ...]
                shard = reduce_scatter_rows(rows.transpose(0, 1), info, mean=True).transpose(0, 1)
            else:  # rank s: rows R_s of every rank's per-example gradients, [B, chunk, ...]
                shard = all_to_all_rows(rows, info, self._require_sizes())
            gramian += gram(shard)
            del rows, shard
        group = self._info(self.params[0]).group if self.params else None
        all_reduce_sum_on_(gramian, group)
        self._state = state
        return gramian

    def _agree_on_shared(self, state: Any, device: torch.device) -> None:
        """Every rank must exchange the same parameters: a parameter shared on one rank is shared on all."""
        flags = on_any_rank([state.shared.get(id(p), False) for p in self.params], device)
        state.shared = {id(p): flag for p, flag in zip(self.params, flags)}

    def _reached(self, state: Any, device: torch.device) -> set[int]:
        """A parameter reached on any rank gets a gradient on every rank: the reduce-scatter is collective."""
        flags = on_any_rank([id(p) in state.reached for p in self.params], device)
        return {id(p) for p, flag in zip(self.params, flags) if flag}

    def _local_rows(self, state: Any, param: nn.Parameter) -> Tensor:
        """This rank's per-row gradients of ``param``, ``[m, *param.shape]``, summed over its calls."""
        ctx = state.ctx
        pid = id(param)
        if pid in state.fallback_rows:
            return state.fallback_rows[pid].to(ctx.dtype)
        rows = torch.zeros(ctx.rows, *param.shape, dtype=ctx.dtype, device=param.device)
        for use, name in state.param_uses.get(pid, []):
            use.rule.add_param_rows(use, ctx, name, 0, param.shape[0], rows)
        return rows

    def _add_update(self, param: nn.Parameter, update: Tensor) -> None:
        """Reduce-scatter the full-size update into the ``DTensor`` shard (sum: per-example global rows)."""
        if update.is_sparse:
            update = update.to_dense()
        mean = not (self._exchanges() and not self.per_task)
        info = self._info(param)
        local = reduce_scatter_rows(update.reshape(param.shape), info, mean=mean)
        add_to_sharded_grad(info, local.reshape(local_shard(info.sharded).shape))

    def _info(self, param: nn.Parameter) -> ShardedParameter:
        if self._shards is None or id(param) not in self._shards:
            raise GramianEngineError("accumulate_grad() needs gramian() on the captured forward first.")
        return self._shards[id(param)]

    def _require_sizes(self) -> list[int]:
        if self._sizes is None:
            raise GramianEngineError(
                "Per-example objectives in the global scope go through global_gramian(losses), not gramian()."
            )
        return self._sizes

    def gradients_are_finite(self) -> bool:
        """Whether every gradient shard is finite on every rank (one decision, the same on all ranks)."""
        grads = [local_shard(p.grad) for p in self._sharded_params if p.grad is not None]
        finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        device = grads[0].device if grads else torch.device("cpu")
        return not any_across_ranks(not finite, device)
