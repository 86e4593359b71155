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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.autograd.graph import GradientEdge, Node

from ._batch import row_sources
from ._broadcast import Broadcast, Consumers, Terminal, consumers_of, param_use, resolve, same_structure
from ._generic import GenericRule
from ._layout import Layout, Output, infer_layout
from ._region import plan_region, rows_in_example_blocks
from ._torch_ops import output_shape
from ._use import CallKey, Use
from ._utils import Context

logger = logging.getLogger(__name__)

#: The calibration graph: its consumers map and the output edges of each call, by call key.
ProbeGraph = tuple[Consumers, dict[CallKey, list[GradientEdge]]]
#: Cached verdicts, by ``("param", index)`` or ``("call", call key)``.
Verdicts = dict[tuple[str, Any], bool]


class BroadcastPlanner:
    """Plans one step; ``probe`` runs the calibration forward (``None`` when the model refuses)."""

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
        self._graph: ProbeGraph | None = None
        self._probed = False
        #: This step's batch size, outputs with rows in example blocks, and layouts inferred so far.
        self._batch = 0
        self._uses: list[Use[Any]] = []
        #: Outputs with their rows in example blocks (:func:`row_sources`), computed on first use.
        self._sources: set[Output] | None = None
        self._layouts: dict[Node, Layout] = {}
        self._consumers: Consumers = {}

    def _probe_graph(self) -> ProbeGraph | None:
        if not self._probed:
            self._probed = True
            self._graph = self.probe()
        return self._graph

    def _confirmed(
        self, key: tuple[str, Any], main: list[Terminal], probe: Callable[[ProbeGraph], Any], batch: int
    ) -> bool:
        if key not in self.verdicts:
            graph = None if batch <= 1 else self._probe_graph()
            seen = probe(graph) if graph is not None else None
            self.verdicts[key] = same_structure(main, seen, batch, self._in_row_blocks)
        return self.verdicts[key]

    def _in_row_blocks(self, terminal: Terminal) -> bool:
        """Whether the broadcast point's output holds the examples in contiguous blocks of rows."""
        return rows_in_example_blocks(self._consumers, terminal.node, self._layout)

    def plan(
        self, consumers: Consumers, uses: list[Use[Any]], fallback: set[int], ctx: Context
    ) -> tuple[list[Use[Any]], list[Use[Any]], set[int]]:
        """``(uses kept, synthetic parameter uses, ids of the parameters taken off the fallback)``."""
        try:
            return self._plan(consumers, uses, fallback, ctx)
        finally:
            self._graph, self._probed = None, False  # the calibration graph lives for one step at most
            self._uses, self._sources, self._layouts, self._consumers = [], None, {}, {}

    def _plan(
        self, consumers: Consumers, uses: list[Use[Any]], fallback: set[int], ctx: Context
    ) -> tuple[list[Use[Any]], list[Use[Any]], set[int]]:
        batch = ctx.rows
        self._batch, self._uses, self._sources, self._layouts = batch, uses, None, {}
        self._consumers = consumers
        resolved: dict[int, list[Terminal]] = {}
        for index, param in enumerate(self.params):
            terminals = resolve(consumers, ("param", id(param)), tuple(param.shape))
            if terminals is None:
                continue
            shape = tuple(param.shape)
            pid = id(param)

            def seen(graph: ProbeGraph, pid: int = pid, shape: tuple[int, ...] = shape) -> Any:
                return resolve(graph[0], ("param", pid), shape)

            if self._confirmed(("param", index), terminals, seen, batch):
                resolved[id(param)] = terminals
        # Generic-rule modules whose every parameter qualifies are dropped; other served parameters stay.
        superseded: set[int] = set()
        served: set[int] = set()
        for use in uses:
            ids = [id(p) for p in use.rule.params.values()]
            if isinstance(use.rule, GenericRule) and all(pid in resolved for pid in ids):
                superseded.add(id(use))
            elif use.batched:
                served.update(pid for pid in ids if pid not in fallback)
        kept = [use for use in uses if id(use) not in superseded]
        extra: list[Use[Any]] = []
        switched: set[int] = set()
        for index, param in enumerate(self.params):
            pid = id(param)
            if pid in resolved and pid not in served:
                module, name = self.owners[pid]
                plan = Broadcast([(resolved[pid], tuple(param.shape))], batch)
                extra.append(param_use(module, name, param, plan, (-1, index)))
                switched.add(pid)
        for use in kept:
            if self._call_qualifies(consumers, use, ctx):
                switched.update(id(p) for p in use.rule.params.values())
        # Parameters still on the fallback: their batch-free region, if every path qualifies.
        candidates = [p for p in self.params if id(p) in fallback and id(p) not in switched]
        serving = [u for u in kept if u.batched and not u.mutated and u.rule.supports(u, ctx)]
        region = self._region(consumers, serving, candidates, (-2, 0))
        if region is not None:
            extra.append(region)
            switched.update(id(p) for p in region.rule.params.values())
        kept, generic_region = self._generic_region(consumers, kept, serving, fallback | switched)
        if generic_region is not None:
            extra.append(generic_region)
        return kept, extra, switched

    def _region(
        self, consumers: Consumers, serving: list[Use[Any]], candidates: list[nn.Parameter], key: CallKey
    ) -> Use[Any] | None:
        try:
            return plan_region(
                consumers, serving, candidates, self.names, self.model, self._layout, self._batch, key
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
        of every generic call of that module (else nothing changes)."""
        generic = [u for u in kept if isinstance(u.rule, GenericRule) and u.batched]
        params: dict[int, nn.Parameter] = {}
        for use in generic:
            params.update({id(p): p for p in use.rule.params.values() if id(p) not in excluded})
        if not params:
            return kept, None
        others = [u for u in serving if not isinstance(u.rule, GenericRule)]
        region = self._region(consumers, others, list(params.values()), (-2, 1))
        if region is None:
            return kept, None
        served = {id(p) for p in region.rule.params.values()}
        touched = [u for u in generic if any(id(p) in served for p in u.rule.params.values())]
        if any(id(p) not in served for u in touched for p in u.rule.params.values()):
            region.release()  # a call would be served twice for some parameters: keep the generic rule
            return kept, None
        dropped = {id(u) for u in touched}
        return [u for u in kept if id(u) not in dropped], region

    def _layout(self, output: Output) -> Layout:
        if self._sources is None:
            self._sources = row_sources(self._uses, self._batch)
        return infer_layout(output, self._sources, self._batch, self._layouts)

    def _call_qualifies(self, consumers: Consumers, use: Use[Any], ctx: Context) -> bool:
        """Turn a non-batch call into a per-row one through its broadcast points, if it qualifies."""
        rule = use.rule
        if use.batched or use.mutated or rule.keep_all_inputs or any(use.expanded):
            return False
        if use.primary is None or use.in_rows[use.primary] or not rule.supports(use, ctx):
            return False
        outputs = []
        for edge in use.edges:
            shape = output_shape(edge.node, edge.output_nr)
            terminals = resolve(consumers, (edge.node, edge.output_nr), shape)
            if not terminals:  # no broadcast point, or an output edge no longer in the graph (in place)
                return False
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

        if not self._confirmed(("call", use.key), main, seen, ctx.rows):
            return False
        plan = Broadcast(outputs, ctx.rows)
        use.remap = plan
        use.edges = list(plan.edges)
        use.batched = True
        use.expanded = [True] * len(use.expanded)
        return True


__all__ = ["BroadcastPlanner", "ProbeGraph", "Verdicts", "consumers_of"]
