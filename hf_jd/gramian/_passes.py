"""The passes inside ``GramianEngine.gramian``: which calls are per example, the calibration forward, which
parameters take the exact fallback, and the single backward that captures every call's gradient-output.

A mixin of :class:`~hf_jd.gramian._engine.GramianEngine`, which owns the state these passes read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node

from .._tensors import cuda_devices
from ._batch import (
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
from ._broadcast_plan import ProbeGraph, consumers_of
from ._capture import ProbeLeads, Recorder, loss_count_mismatch
from ._errors import GramianEngineError
from ._fallback import BatchedBackward
from ._graph import uncovered_parameters
from ._step import StepState
from ._support import REENTRANT_ADVICE
from ._torch_ops import tree_flatten
from ._use import Use
from ._utils import Context


class EnginePasses:
    """The steps of ``gramian()`` (see the module docstring); the attributes are the engine's."""

    params: list[nn.Parameter]
    per_task: bool
    _recorder: Recorder
    _follows: Follows
    _flat: Flat
    _flat_by_graph: Flat
    _probe_failed: bool
    _always_fallback: set[int]
    _batched: BatchedBackward

    def _classify(self, uses: list[Use[Any]], m: int) -> None:
        recorder = self._recorder
        batch = recorder.batch
        if batch is not None and batch != m:
            raise GramianEngineError(loss_count_mismatch(batch, m))
        if batch is None:
            batch = recorder.batch = m
        if needs_probe(uses, batch, self._follows):
            leads = None
            if not self._probe_failed and recorder.outer_calls:
                leads = run_probe(recorder.outer_calls, batch, self._probe_body)
                recorder.probe_edges = {}  # they hold the probe's graph (one example's activations)
            self._probe_failed = self._probe_failed or leads is None
            update_cache(uses, batch, leads or {}, self._follows, heuristic=leads is None)
            bases = recorder.probe_bases if leads is not None else {}
            update_flat(uses, batch, leads or {}, bases, self._flat)
        classify(uses, batch, self._follows)
        classify_flat(uses, batch, self._flat, self._flat_by_graph)

    def _probe_body(self, body: Callable[[], None]) -> ProbeLeads:
        recorder = self._recorder
        saved = (recorder.uses, recorder.outer_calls, recorder.batch, recorder.expanded_any)
        recorder.probe_leads = {}
        recorder.probe_bases = {}
        try:
            with recorder.active("probe"):
                body()
            return dict(recorder.probe_leads)
        finally:
            recorder.uses, recorder.outer_calls, recorder.batch, recorder.expanded_any = saved

    def _call_fallback(self, uses: list[Use[Any]], ctx: Context) -> set[int]:
        """Parameters of calls that no rule serves exactly (plus the always-fallback ones)."""
        fallback = set(self._always_fallback)
        for use in uses:
            if not use.batched or use.mutated or not use.rule.supports(use, ctx):
                fallback.update(id(p) for p in use.rule.params.values())
        return fallback

    def _fallback_ids(self, losses: Tensor, uses: list[Use[Any]], ctx: Context) -> tuple[set[int], set[int]]:
        """``(fallback parameter ids, those among them used outside their owner's calls)``."""
        uncovered, reentrant = uncovered_parameters(losses, uses, self.params)
        if reentrant:
            raise GramianEngineError(REENTRANT_ADVICE.format(name="The model"))
        return self._call_fallback(uses, ctx) | uncovered, uncovered

    def _probe_graph(self) -> ProbeGraph | None:
        """The calibration forward (first example) with gradients enabled: its graph, for broadcast points."""
        recorder = self._recorder
        batch = recorder.batch or 1
        outputs: list[object] = []

        def body() -> None:
            for module, args, kwargs in recorder.outer_calls:
                outputs.append(module(*slice_batch(args, batch), **slice_batch(kwargs, batch)))

        try:
            with torch.random.fork_rng(devices=cuda_devices()), torch.enable_grad():
                recorder.probe_edges = {}
                self._probe_body(body)
                edges = dict(recorder.probe_edges)
        except Exception:  # noqa: BLE001 - the model refused a one-example batch: no broadcast points
            return None
        finally:  # the planner keeps this graph for its plan only; the recorder must not keep it to the step's end
            recorder.probe_edges = {}
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
        keep_graph = any(use.rule.needs_graph for use in state.active)  # a rule back-propagates later
        m = state.ctx.rows
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
            grads = [edge_grads[k] for k in use_slots]
            use.grads = use.remap(grads) if use.remap is not None else grads
            use.live = any(g is not None for g in use.grads)
            use.edges = []
            use.in_nodes = []
        for param, rows in zip(fallback_params, param_grads):
            state.fallback_rows[id(param)] = (
                rows.detach()
                if rows is not None
                else torch.zeros((m, *param.shape), dtype=param.dtype, device=param.device)
            )
        state.index_uses()
