"""The plan of one step: how each captured call and each trainable parameter is served, and which
pass decided it.

The forward hooks record :class:`~hf_jd.gramian._use.Call` values (what a call of a parameter-owning
module saw). The planning passes of ``gramian()`` (:mod:`hf_jd.gramian._passes`) read those calls and
return *decisions*, immutable values keyed by :class:`CallKey`:

* the batch pass (:func:`hf_jd.gramian._batch.classify`): do the call's outputs follow the batch, and
  which of its inputs hold one slice per example;
* the layout pass (:func:`hf_jd.gramian._batch.classify_flat`): a row-wise call on ``B·k`` rows whose
  examples are proven contiguous;
* the broadcast pass (:mod:`hf_jd.gramian._broadcast_plan`): a non-batch call or a parameter reaching
  the examples only through broadcast points, and the calls it supersedes;
* the region pass (:mod:`hf_jd.gramian._region`): parameters served by their batch-free region;
* the fallback set: every parameter no rule serves exactly takes batched autograd.

:class:`Plan` gathers them: per call a :class:`CallDecision`, the parameters on the fallback with the
pass that sent each there, those served by broadcast points or regions, and the calls the backward
captures, each bound to its decision as a :class:`~hf_jd.gramian._use.Use`; :meth:`Plan.param` reads a
parameter's :class:`ParamDecision` from them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import Tensor
from torch.autograd.graph import GradientEdge

if TYPE_CHECKING:
    from ._use import Use


class CallKind(Enum):
    """Where a call comes from."""

    #: A call of a hooked module: ``owner`` is its index among the hooked modules.
    MODULE = "module"
    #: A call of the functional op (``F.linear``, ...) of an op-level owner (:mod:`hf_jd.gramian._functional`).
    OP = "op"
    #: A parameter fed through its broadcast points (synthetic): ``owner`` is the parameter's index.
    PARAM = "param"
    #: The batch-free region of parameters otherwise on the fallback (synthetic).
    REGION = "region"
    #: The batch-free region of parameters a module's generic-rule calls use directly (synthetic).
    MODULE_REGION = "module_region"


class CallKey(NamedTuple):
    """The identity of a call, stable from one step to the next (the passes cache verdicts by it)."""

    kind: CallKind
    #: The owning module's index (``MODULE``, ``OP``) or the parameter's index (``PARAM``).
    owner: int = 0
    #: The call number of that owner in the forward.
    call: int = 0


class Pass(Enum):
    """The pass that made a decision."""

    #: Per task: every call reads the whole batch; no classification.
    PER_TASK = "per_task"
    #: Leading dimensions against the one-example calibration forward (:mod:`hf_jd.gramian._batch`).
    BATCH = "batch"
    #: ``B·k`` rows with the examples in contiguous blocks (:mod:`hf_jd.gramian._layout`).
    LAYOUT = "layout"
    #: Broadcast points (:mod:`hf_jd.gramian._broadcast_plan`).
    BROADCAST = "broadcast"
    #: Batch-free regions (:mod:`hf_jd.gramian._region`).
    REGION = "region"
    #: The call's rule refuses it, or the module modified its own input or output in place.
    SUPPORT = "support"
    #: The parameter is used outside every captured call of its owner (:mod:`hf_jd.gramian._graph`).
    COVERAGE = "coverage"
    #: The engine's construction: parameters of the root model and of batch-norm layers.
    SETUP = "setup"


class Route(Enum):
    """How a call is served."""

    #: By its rule, on rows that follow the batch (or on the tasks, per task).
    RULE = "rule"
    #: By its rule, on per-row gradient-outputs gathered from its broadcast points.
    BROADCAST = "broadcast"
    #: Synthetic: its "outputs" are the broadcast points or region boundaries of its parameters.
    SYNTHETIC = "synthetic"
    #: Its outputs do not follow the batch: its parameters take the fallback (unless a later pass serves them).
    NOT_BATCHED = "not_batched"
    #: Superseded: broadcast points or a batch-free region serve every parameter it would serve.
    DROPPED = "dropped"


#: The routes on which a call's rule serves it per row.
_PER_ROW = frozenset({Route.RULE, Route.BROADCAST, Route.SYNTHETIC})
#: Turns the gradients at a call's edges into its per-row gradient-outputs (broadcast points, regions).
Remap = Callable[[list[Tensor | None]], list[Tensor | None]]


@dataclass(frozen=True)
class CallDecision:
    """What the passes decided for one call."""

    route: Route
    #: The pass that decided it.
    by: Pass
    #: Which input leaves hold one slice per row (sliced per example when a rule recomputes the call).
    in_rows: tuple[bool, ...] = ()
    #: Per-row gradient-outputs from the gradients at ``edges`` (``None``: the call's own outputs).
    remap: Remap | None = None
    #: The edges the backward captures instead of the call's outputs (``None``: the outputs').
    edges: tuple[GradientEdge, ...] | None = None
    #: Per captured output, whether it is shared by the batch (``None``: as captured).
    expanded: tuple[bool, ...] | None = None

    @property
    def batched(self) -> bool:
        """Whether the call's rule serves it per row (its outputs follow the batch, or are made to)."""
        return self.route in _PER_ROW


@cache
def decision_of(route: Route, by: Pass, in_rows: tuple[bool, ...]) -> CallDecision:
    """The decision ``(route, by, in_rows)`` without broadcast points: one shared instance per value
    (the passes decide every call on every step)."""
    return CallDecision(route, by, in_rows)


class ParamRoute(Enum):
    """How a trainable parameter is served."""

    #: By the rules of the calls that use it (several calls: their per-row gradients summed).
    RULE = "rule"
    #: By its broadcast points (a synthetic call of its own).
    BROADCAST = "broadcast"
    #: By its batch-free region.
    REGION = "region"
    #: By batched autograd with respect to the parameter itself (exact, the slow path).
    FALLBACK = "fallback"
    #: No captured call uses it and the losses do not use it elsewhere.
    NONE = "none"


@dataclass(frozen=True)
class ParamDecision:
    """How one trainable parameter is served this step, and the pass that decided it."""

    route: ParamRoute
    by: Pass


@dataclass(frozen=True)
class Plan:
    """Every decision of one step, and the calls its single backward captures."""

    #: Per call (captured and synthetic), its decision.
    calls: Mapping[CallKey, CallDecision]
    #: The calls whose rules serve at least one parameter, in capture order (synthetic ones last).
    active: tuple[Use[Any], ...]
    #: The parameters on the fallback (by ``id``), with the pass that sent each there.
    fallback: Mapping[int, Pass]
    #: The parameters served by broadcast points or regions (by ``id``), with how.
    served: Mapping[int, ParamDecision]

    def param(self, param: Tensor) -> ParamDecision:
        """How ``param`` is served this step, and which pass decided it (read on demand: the step
        itself reads ``active`` and ``fallback`` only)."""
        pid = id(param)
        if pid in self.fallback:
            return ParamDecision(ParamRoute.FALLBACK, self.fallback[pid])
        if pid in self.served:
            return self.served[pid]
        for use in self.active:
            if any(p is param for p in use.rule.params.values()):
                return ParamDecision(ParamRoute.RULE, use.decision.by)
        return ParamDecision(ParamRoute.NONE, Pass.COVERAGE)


__all__ = [
    "CallDecision",
    "CallKey",
    "CallKind",
    "ParamDecision",
    "ParamRoute",
    "Pass",
    "Plan",
    "Remap",
    "Route",
    "decision_of",
]
