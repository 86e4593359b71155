"""The passes inside ``GramianEngine.gramian``: the planning pipeline (which calls are per example, the
calibration forward, broadcast points and regions, which parameters take the exact fallback), which
returns one :class:`~hf_jd.gramian._plan.Plan`, and the single backward that captures every active
call's gradient-output.

A mixin of :class:`~hf_jd.gramian._engine.GramianEngine`, which owns the state these passes read (the
recorder of the forward, the caches of verdicts kept from one step to the next).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node

from .._tensors import cuda_devices
from ._batch import (
    Decisions,
    Flat,
    Follows,
    classify,
    classify_flat,
    needs_probe,
    run_probe,
    slice_batch,
    update_cache,
    update_flat,
)
from ._broadcast_plan import BroadcastPlan, BroadcastPlanner, ProbeGraph, consumers_of
from ._capture import Recorder, loss_count_mismatch
from ._errors import GramianEngineError
from ._fallback import BatchedBackward
from ._graph import uncovered_parameters
from ._plan import Pass, Plan, Route, decision_of
from ._step import StepState
from ._support import REENTRANT_ADVICE
from ._torch_ops import tree_flatten
from ._use import Call, Use
from ._utils import Context


def classify_tokens(calls: list[Call], tokens: tuple[int, int]) -> Decisions:
    """The token pass (objectives that are token segments of rows): a call whose rule is token-wise
    (``Rule.token_wise``), with a primary tensor input of leading dimensions ``(n_rows, T)``, outputs
    of leading dimension ``n_rows`` and nothing expanded, has its primary input in rows (``n_rows·T`` rows
    of one token, route ``RULE``); every other call is not batched (its parameters take the exact
    per-objective fallback)."""
    decisions: Decisions = {}
    for call in calls:
        primary = call.primary
        value = call.inputs[primary] if primary is not None else None
        token_wise = (
            call.rule.token_wise
            and primary is not None
            and isinstance(value, Tensor)
            and tuple(value.shape[:2]) == tokens
            and not any(call.expanded)
            and all(call.out_lead[j] == tokens[0] for j in call.out_index)
        )
        if token_wise and primary is not None:
            in_rows = tuple(k == primary for k in range(len(call.in_lead)))
            decisions[call.key] = decision_of(Route.RULE, Pass.LAYOUT, in_rows)
        else:
            decisions[call.key] = decision_of(Route.NOT_BATCHED, Pass.BATCH, (False,) * len(call.in_lead))
    return decisions


class EnginePasses:
    """The steps of ``gramian()`` (see the module docstring); the attributes are the engine's."""

    params: list[nn.Parameter]
    per_task: bool
    keeps_graph: bool
    _recorder: Recorder
    _planner: BroadcastPlanner
    _follows: Follows
    _flat: Flat
    _flat_by_graph: Flat
    _probe_failed: bool
    _always_fallback: set[int]
    _batched: BatchedBackward

    def _plan_step(self, losses: Tensor, ctx: Context, tokens: tuple[int, int] | None = None) -> Plan:
        """The planning pipeline: each pass reads the captured calls and returns its decisions. ``tokens``:
        ``(n_rows, T)`` when the engine's rows are the tokens (objectives that are token segments)."""
        calls = self._recorder.calls
        for call in calls:  # an output modified in place after the call: its edge no longer gets b
            call.note_modified_outputs()
        if tokens is not None:
            decisions = classify_tokens(calls, tokens)
            uses_t: list[Use[Any]] = [Use(call, decisions[call.key]) for call in calls]
            fallback_t, _ = self._fallback_ids(losses, calls, uses_t, ctx)
            return self._assemble_plan(decisions, uses_t, fallback_t, None)
        if self.per_task:
            decisions = {
                call.key: decision_of(Route.RULE, Pass.PER_TASK, (False,) * len(call.in_lead))
                for call in calls
            }
        else:
            decisions = self._classify(calls, ctx.rows)
        uses: list[Use[Any]] = [Use(call, decisions[call.key]) for call in calls]
        fallback, uncovered = self._fallback_ids(losses, calls, uses, ctx)
        planned = None
        if not self.per_task:  # broadcast points (parent-owned parameters, relative-position biases)
            consumers = consumers_of([losses.grad_fn] if losses.grad_fn is not None else [])
            planned = self._planner.plan(consumers, uses, set(fallback), ctx)
            decisions = {**decisions, **planned.calls}
            uses = [
                use if use.key not in planned.calls else Use(use.call, planned.calls[use.key])
                for use in uses
                if decisions[use.key].route is not Route.DROPPED
            ]
            fallback = self._call_fallback(uses, ctx)
            fallback.update({pid: Pass.COVERAGE for pid in uncovered if pid not in fallback})
            fallback = {pid: why for pid, why in fallback.items() if pid not in planned.switched}
            uses = [*uses, *planned.synthetic]
            decisions.update({use.key: use.decision for use in planned.synthetic})
        return self._assemble_plan(decisions, uses, fallback, planned)

    def _assemble_plan(
        self,
        decisions: Decisions,
        uses: list[Use[Any]],
        fallback: dict[int, Pass],
        planned: BroadcastPlan | None,
    ) -> Plan:
        active = tuple(
            use
            for use in uses
            if use.batched and any(id(p) not in fallback for p in use.rule.params.values())
        )
        served = planned.params if planned is not None else {}
        return Plan(
            MappingProxyType(decisions), active, MappingProxyType(fallback), MappingProxyType(dict(served))
        )

    def _classify(self, calls: list[Call], m: int) -> Decisions:
        """The batch and layout passes (with the calibration forward when a leading dimension is ambiguous)."""
        recorder = self._recorder
        batch = recorder.batch
        if batch is not None and batch != m:
            raise GramianEngineError(loss_count_mismatch(batch, m))
        if batch is None:
            batch = recorder.batch = m
        if needs_probe(calls, batch, self._follows):
            record = None
            if not self._probe_failed and recorder.outer_calls:
                record = run_probe(recorder.outer_calls, batch, recorder.probe)
            heuristic = record is None
            self._probe_failed = self._probe_failed or heuristic
            leads, bases = (record.leads, record.bases) if record is not None else ({}, {})
            del record  # its edges hold the probe's graph (one example's activations)
            update_cache(calls, batch, leads, self._follows, heuristic=heuristic)
            update_flat(calls, batch, leads, bases, self._flat)
        decisions = classify(calls, batch, self._follows)
        return classify_flat(calls, decisions, batch, self._flat, self._flat_by_graph)

    def _call_fallback(self, uses: list[Use[Any]], ctx: Context) -> dict[int, Pass]:
        """Parameters of calls that no rule serves exactly (plus the always-fallback ones), with why."""
        fallback = dict.fromkeys(self._always_fallback, Pass.SETUP)
        for use in uses:
            if not use.batched:
                why = use.decision.by
            elif use.mutated or not use.rule.supports(use, ctx):
                why = Pass.SUPPORT
            else:
                continue
            for param in use.rule.params.values():
                fallback.setdefault(id(param), why)
        return fallback

    def _fallback_ids(
        self, losses: Tensor, calls: list[Call], uses: list[Use[Any]], ctx: Context
    ) -> tuple[dict[int, Pass], set[int]]:
        """``(fallback parameter ids with why, those among them used outside their owner's calls)``."""
        uncovered, reentrant = uncovered_parameters(losses, calls, self.params)
        if reentrant:
            raise GramianEngineError(REENTRANT_ADVICE.format(name="The model"))
        fallback = self._call_fallback(uses, ctx)
        fallback.update({pid: Pass.COVERAGE for pid in uncovered if pid not in fallback})
        return fallback, uncovered

    def _probe_graph(self) -> ProbeGraph | None:
        """The calibration forward (first example) with gradients enabled: its graph, for broadcast points."""
        recorder = self._recorder
        batch = recorder.batch or 1
        outputs: list[object] = []

        def body() -> None:
            for module, args, kwargs in recorder.outer_calls:
                outputs.append(module(*slice_batch(args, batch), **slice_batch(kwargs, batch)))

        try:  # the planner keeps this graph for its plan only (the recorder does not keep the record)
            with torch.random.fork_rng(devices=cuda_devices()), torch.enable_grad():
                edges = recorder.probe(body).edges
        except Exception:  # noqa: BLE001 - the model refused a one-example batch: no broadcast points
            return None
        roots = [
            leaf.grad_fn
            for leaf in tree_flatten(outputs)[0]
            if isinstance(leaf, Tensor) and leaf.grad_fn is not None
        ]
        return consumers_of(roots), edges

    def _backward(self, losses: Tensor, state: StepState) -> None:
        """The single backward: gradient-outputs of every active call (+ fallback parameters' rows)."""
        edges: list[GradientEdge] = []
        positions: dict[tuple[Node, int], int] = {}
        slots: list[list[int]] = []
        for use in state.active:
            use_slots = []
            for edge in use.edges:
                key = (edge.node, edge.output_nr)
                if key not in positions:
                    positions[key] = len(edges)
                    edges.append(edge)
                use_slots.append(positions[key])
            slots.append(use_slots)
        fallback_params = [p for p in self.params if id(p) in state.fallback]
        # a rule back-propagates later, or the caller back-propagates wᵀL itself (the generic update path)
        keep_graph = self.keeps_graph or any(use.rule.needs_graph for use in state.active)
        # the fallback differentiates the losses themselves: one row per loss (per objective when the batch
        # rows are grouped into objectives, ``state.row_objective``), whatever rows each loss reads
        m = losses.numel()
        with self._recorder.active("replay"):
            if self.per_task:
                eye = torch.eye(m, dtype=losses.dtype, device=losses.device)
                grads = self._batched(losses, [*edges, *fallback_params], eye, retain_graph=keep_graph)
                edge_grads, param_grads = grads[: len(edges)], grads[len(edges) :]
            else:
                edge_grads = []
                if edges:
                    edge_grads = list(
                        torch.autograd.grad(
                            losses,
                            edges,
                            torch.ones_like(losses),
                            retain_graph=bool(fallback_params) or keep_graph,
                            allow_unused=True,
                        )
                    )
                param_grads = []
                if fallback_params:
                    eye = torch.eye(m, dtype=losses.dtype, device=losses.device)
                    param_grads = self._batched(losses, fallback_params, eye, retain_graph=keep_graph)
        for use, use_slots in zip(state.active, slots):
            use.receive([edge_grads[k] for k in use_slots])
        for param, rows in zip(fallback_params, param_grads):
            state.fallback_rows[id(param)] = (
                rows.detach()
                if rows is not None
                else torch.zeros((m, *param.shape), dtype=param.dtype, device=param.device)
            )
        state.index_uses()
