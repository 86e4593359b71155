"""Which parameters and calls take the broadcast-point path (:mod:`hf_jd.gramian._broadcast`) this step.

* A parameter qualifies when every use of it in the graph is a broadcast point, and no module rule
  still serves it: it is on the fallback (its owner's call is not per-example, or it is used outside
  its owner), or it is owned by a module of the generic rule all of whose parameters qualify (that
  module's calls are then dropped: the generic rule would re-run the whole module per example).
* A call qualifies when its outputs do not follow the batch (it was sent to the fallback), its rule
  reads one primary input (not the generic rule), that input is shared by all rows, and every
  captured output reaches the examples through broadcast points only.

Each candidate is confirmed once by the calibration forward (first example, gradients enabled):
the same broadcast points with a leading dimension of 1; the verdict is cached per candidate.

Then the batch-free regions (:mod:`hf_jd.gramian._region`) of the parameters still on the fallback,
and of those a module's generic-rule calls use directly. The planner returns its decisions
(:class:`BroadcastPlan`); it edits no call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.autograd.graph import GradientEdge, Node

from ._batch import row_sources
from ._broadcast import Broadcast, Consumers, Terminal, consumers_of, param_use, resolve, same_structure
from ._generic import GenericRule
from ._layout import Layout, Output, infer_layout
from ._plan import CallDecision, CallKey, CallKind, ParamDecision, ParamRoute, Pass, Route
from ._region import plan_region, rows_in_example_blocks
from ._torch_ops import output_shape
from ._use import Use
from ._utils import Context

logger = logging.getLogger(__name__)

#: The calibration graph: its consumers map and the output edges of each call, by call key.
ProbeGraph = tuple[Consumers, dict[CallKey, list[GradientEdge]]]
#: Cached verdicts, by call key (a parameter's: ``CallKey(CallKind.PARAM, its index)``).
Verdicts = dict[CallKey, bool]


@dataclass(frozen=True)
class BroadcastPlan:
    """The decisions of the broadcast and region passes for one step."""

    #: New decisions of captured calls: ``BROADCAST`` (served through their broadcast points) or
    #: ``DROPPED`` (broadcast points or a region serve all their parameters).
    calls: Mapping[CallKey, CallDecision]
    #: The synthetic calls (broadcast parameters, batch-free regions), in order.
    synthetic: tuple[Use[Any], ...]
    #: The parameters these passes serve, with how.
    params: Mapping[int, ParamDecision]
    #: The ids of the parameters taken off the fallback (all of ``params`` but a module region's).
    switched: frozenset[int]


class BroadcastPlanner:
    """Plans the broadcast points and batch-free regions of each step; ``probe`` runs the calibration
    forward (``None`` when the model refuses). The verdicts are kept from one step to the next."""

    def __init__(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        owners: dict[int, tuple[nn.Module, str]],
        verdicts: Verdicts,
        probe: Callable[[], ProbeGraph | None],
    ) -> None:
        self.model = model
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.params = params
        self.owners = owners
        self.verdicts = verdicts
        self.probe = probe

    def plan(
        self, consumers: Consumers, uses: list[Use[Any]], fallback: set[int], ctx: Context
    ) -> BroadcastPlan:
        """The decisions of this step, from the captured calls bound to their batch and layout decisions
        (``uses``) and the parameters on the ``fallback`` so far."""
        return _StepPlanner(self, consumers, uses, ctx.rows).plan(fallback, ctx)


class _StepPlanner:
    """The planning of one step: its graph, the calibration graph (run at most once, on demand) and
    the layouts proven so far, all dropped with the step."""

    def __init__(
        self,
        planner: BroadcastPlanner,
        consumers: Consumers,
        uses: list[Use[Any]],
        batch: int,
    ) -> None:
        self.planner = planner
        self.consumers = consumers
        self.uses = uses
        self.calls = [use.call for use in uses]
        self.decisions = {use.key: use.decision for use in uses}
        self.batch = batch
        self._graph: ProbeGraph | None = None
        self._probed = False
        #: Outputs with their rows in example blocks (:func:`row_sources`), computed on first use.
        self._sources: set[Output] | None = None
        self._layouts: dict[Node, Layout] = {}

    def _probe_graph(self) -> ProbeGraph | None:
        if not self._probed:
            self._probed = True
            self._graph = self.planner.probe()
        return self._graph

    def _confirmed(
        self, key: CallKey, main: list[Terminal], probe: Callable[[ProbeGraph], Any], batch: int
    ) -> bool:
        if key not in self.planner.verdicts:
            graph = None if batch <= 1 else self._probe_graph()
            seen = probe(graph) if graph is not None else None
            self.planner.verdicts[key] = same_structure(main, seen, batch, self._in_row_blocks)
        return self.planner.verdicts[key]

    def _in_row_blocks(self, terminal: Terminal) -> bool:
        """Whether the broadcast point's output holds the examples in contiguous blocks of rows."""
        return rows_in_example_blocks(self.consumers, terminal.node, self._layout)

    def plan(self, fallback: set[int], ctx: Context) -> BroadcastPlan:
        consumers, batch = self.consumers, self.batch
        resolved: dict[int, list[Terminal]] = {}
        for index, param in enumerate(self.planner.params):
            terminals = resolve(consumers, ("param", id(param)), tuple(param.shape))
            if terminals is None:
                continue
            shape = tuple(param.shape)
            pid = id(param)

            def seen(graph: ProbeGraph, pid: int = pid, shape: tuple[int, ...] = shape) -> Any:
                return resolve(graph[0], ("param", pid), shape)

            if self._confirmed(CallKey(CallKind.PARAM, index), terminals, seen, batch):
                resolved[id(param)] = terminals
        # Generic-rule modules whose every parameter qualifies are dropped; other served parameters stay.
        decided: dict[CallKey, CallDecision] = {}
        served: set[int] = set()
        for use in self.uses:
            ids = [id(p) for p in use.rule.params.values()]
            if isinstance(use.rule, GenericRule) and all(pid in resolved for pid in ids):
                decided[use.key] = _dropped(use.decision, Pass.BROADCAST)
            elif use.batched:
                served.update(pid for pid in ids if pid not in fallback)
        kept = [use for use in self.uses if use.key not in decided]
        extra: list[Use[Any]] = []
        params: dict[int, ParamDecision] = {}
        for index, param in enumerate(self.planner.params):
            pid = id(param)
            if pid in resolved and pid not in served:
                module, name = self.planner.owners[pid]
                plan = Broadcast([(resolved[pid], tuple(param.shape))], batch)
                extra.append(param_use(module, name, param, plan, CallKey(CallKind.PARAM, index)))
                params[pid] = ParamDecision(ParamRoute.BROADCAST, Pass.BROADCAST)
        for use in kept:
            decision = self._call_decision(consumers, use, ctx)
            if decision is not None:
                decided[use.key] = decision
                params.update(
                    {id(p): ParamDecision(ParamRoute.RULE, Pass.BROADCAST) for p in use.rule.params.values()}
                )
        switched = set(params)
        # Parameters still on the fallback: their batch-free region, if every path qualifies.
        uses = [use if use.key not in decided else Use(use.call, decided[use.key]) for use in kept]
        candidates = [p for p in self.planner.params if id(p) in fallback and id(p) not in switched]
        serving = [u for u in uses if u.batched and not u.mutated and u.rule.supports(u, ctx)]
        region = self._region(consumers, serving, candidates, CallKey(CallKind.REGION))
        if region is not None:
            extra.append(region)
            served_here = {
                id(p): ParamDecision(ParamRoute.REGION, Pass.REGION) for p in region.rule.params.values()
            }
            params.update(served_here)
            switched.update(served_here)
        dropped, generic_region = self._generic_region(consumers, uses, serving, fallback | switched)
        if generic_region is not None:
            extra.append(generic_region)
            decided.update({use.key: _dropped(use.decision, Pass.REGION) for use in dropped})
            params.update(
                {
                    id(p): ParamDecision(ParamRoute.REGION, Pass.REGION)
                    for p in generic_region.rule.params.values()
                }
            )
        return BroadcastPlan(decided, tuple(extra), params, frozenset(switched))

    def _region(
        self, consumers: Consumers, serving: list[Use[Any]], candidates: list[nn.Parameter], key: CallKey
    ) -> Use[Any] | None:
        try:
            return plan_region(
                consumers,
                serving,
                candidates,
                self.planner.names,
                self.planner.model,
                self._layout,
                self.batch,
                key,
            )
        except (AttributeError, IndexError, TypeError, RuntimeError) as error:  # an unreadable graph
            logger.warning(
                "Gramian engine: batch-free regions skipped (%s); those parameters stay exact.", error
            )
            return None

    def _generic_region(
        self, consumers: Consumers, kept: list[Use[Any]], serving: list[Use[Any]], excluded: set[int]
    ) -> tuple[list[Use[Any]], Use[Any] | None]:
        """Parameters that a module's generic-rule calls use directly (Swinv2's ``logit_scale``): their
        batch-free region replaces the per-example re-run of the module, when it serves every parameter
        of every generic call of that module. Returns the calls it replaces and the region (else
        nothing)."""
        generic = [u for u in kept if isinstance(u.rule, GenericRule) and u.batched]
        params: dict[int, nn.Parameter] = {}
        for use in generic:
            params.update({id(p): p for p in use.rule.params.values() if id(p) not in excluded})
        if not params:
            return [], None
        others = [u for u in serving if not isinstance(u.rule, GenericRule)]
        region = self._region(consumers, others, list(params.values()), CallKey(CallKind.MODULE_REGION))
        if region is None:
            return [], None
        served = {id(p) for p in region.rule.params.values()}
        touched = [u for u in generic if any(id(p) in served for p in u.rule.params.values())]
        if any(id(p) not in served for u in touched for p in u.rule.params.values()):
            region.release()  # a call would be served twice for some parameters: keep the generic rule
            return [], None
        return touched, region

    def _layout(self, output: Output) -> Layout:
        if self._sources is None:
            self._sources = row_sources(self.calls, self.decisions, self.batch)
        return infer_layout(output, self._sources, self.batch, self._layouts)

    def _call_decision(self, consumers: Consumers, use: Use[Any], ctx: Context) -> CallDecision | None:
        """A non-batch call served per row through its broadcast points, if it qualifies."""
        rule = use.rule
        if use.batched or use.mutated or rule.keep_all_inputs or any(use.expanded):
            return None
        if use.primary is None or use.in_rows[use.primary] or not rule.supports(use, ctx):
            return None
        outputs = []
        for edge in use.edges:
            shape = output_shape(edge.node, edge.output_nr)
            terminals = resolve(consumers, (edge.node, edge.output_nr), shape)
            if not terminals:  # no broadcast point, or an output edge no longer in the graph (in place)
                return None
            outputs.append((terminals, shape))
        main = [t for terminals, _ in outputs for t in terminals]

        def seen(graph: ProbeGraph) -> Any:
            edges = graph[1].get(use.key)
            if edges is None or len(edges) != len(use.edges):
                return None
            found: list[Terminal] = []
            for edge in edges:
                shape = output_shape(edge.node, edge.output_nr)
                terminals = resolve(graph[0], (edge.node, edge.output_nr), shape)
                if terminals is None:
                    return None
                found.extend(terminals)
            return found

        if not self._confirmed(use.key, main, seen, ctx.rows):
            return None
        plan = Broadcast(outputs, ctx.rows)
        return CallDecision(
            Route.BROADCAST,
            Pass.BROADCAST,
            use.in_rows,
            remap=plan,
            edges=tuple(plan.edges),
            expanded=(True,) * len(use.expanded),
        )


def _dropped(decision: CallDecision, by: Pass) -> CallDecision:
    return CallDecision(Route.DROPPED, by, decision.in_rows)


__all__ = ["BroadcastPlan", "BroadcastPlanner", "ProbeGraph", "Verdicts", "consumers_of"]
