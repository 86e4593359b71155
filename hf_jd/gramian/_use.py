"""A captured module call (:class:`Call`), and a call as its rule sees it (:class:`Use`).

* :class:`Call` is what the forward hook recorded: the kept inputs ``a``, the layout of the call's
  inputs and outputs, the gradient edges of its outputs, the RNG and autocast state to replay it. The
  engine frees parts of it as the step goes (the edges after the backward, everything on release).
* :class:`~hf_jd.gramian._plan.CallDecision` (in :mod:`hf_jd.gramian._plan`) is what the planning passes
  decided for the call: an immutable value.
* :class:`Use` binds one call to its decision, and holds what the step produces for it: the
  gradient-outputs ``b`` of the engine's single backward and the rule's per-call cache. The rules read
  everything through it (``use.primary_input``, ``use.output_grad``, ``use.inputs``, ``use.in_rows``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from ._errors import GramianEngineError
from ._plan import CallDecision, CallKey
from ._replay import AutocastState, RngState
from ._torch_ops import TreeSpec, version

if TYPE_CHECKING:
    from ._rule import Rule
    from ._utils import Context

#: The per-call cache type of a rule (each rule declares its own small dataclass).
CacheT = TypeVar("CacheT")


@dataclass(eq=False)
class Call:
    """One forward call of a module that owns trainable parameters, as the forward hook recorded it."""

    #: The rule of the module called (``rule.module``, ``rule.params``).
    rule: Rule[Any]
    key: CallKey
    #: Flattened ``(args, kwargs)`` leaves: detached tensors; ``None`` for the leaves not kept (a rule
    #: without ``keep_all_inputs`` keeps only the ``primary`` tensor); emptied once no longer needed.
    inputs: list[object]
    #: Pytree structure of ``(args, kwargs)``, to rebuild the call from ``inputs``.
    in_spec: TreeSpec
    #: Leading dimension of every input leaf (``None`` for non-tensors and scalars).
    in_lead: list[int | None]
    #: Position in ``inputs`` of the first tensor input (``None`` when the call had none).
    primary: int | None
    #: Leading dimension of every output leaf, before any broadcast expansion.
    out_lead: list[int | None]
    #: Positions, among the output leaves, of the outputs that require grad (the captured outputs).
    out_index: list[int]
    #: Gradient edges of the captured outputs (dropped after the backward).
    edges: list[GradientEdge]
    #: For each captured output: whether the engine expanded its leading 1 to the batch size.
    expanded: list[bool]
    #: Graph nodes of the inputs that require grad: where the call's region of the graph stops.
    in_nodes: list[Node]
    #: ``(tensor, version)`` of every kept input tensor, to detect later in-place modifications.
    versions: list[tuple[Tensor, int]]
    #: The module modified one of its own inputs in place: its inputs no longer hold ``a``.
    mutated: bool
    #: RNG state before the call, when the call drew random numbers and the rule replays them.
    rng: RngState | None = None
    #: Autocast state of the call, when the rule recomputes it.
    autocast: AutocastState | None = None
    #: Layout evidence of a primary input whose leading dimension is a multiple of the batch (flattened
    #: tokens, windows): the leading dimension and producing op of the contiguous tensor it is a reshape
    #: of, if any (:func:`hf_jd.gramian._capture.base_lead`) ...
    base_lead: tuple[int, str] | None = None
    #: ... or the call whose output it is (through elementwise ops only), if any.
    source: CallKey | None = None
    #: Graph position ``(node, output_nr)`` of the primary input when it requires grad, for the layout
    #: proof of :mod:`hf_jd.gramian._layout` (dropped with the rest of the call's state in :meth:`release`).
    primary_output: tuple[Node, int] | None = None
    #: ``(output, version)`` of every captured output that is a view: modified in place later (an
    #: ``nn.ReLU(inplace=True)`` after a linear layer on ``[B, T, H]``), its graph node is replaced and
    #: ``edges`` no longer receive its gradient (see :meth:`note_modified_outputs`).
    out_versions: list[tuple[Tensor, int]] = field(default_factory=list)

    def note_modified_outputs(self) -> None:
        """After the forward: a captured view output modified in place since the call (its edge no
        longer receives ``b``) marks the call ``mutated``, like a modified input. Drops the versions."""
        if any(version(tensor) != before for tensor, before in self.out_versions):
            self.mutated = True
        self.out_versions = []

    def check_versions(self) -> None:
        for tensor, before in self.versions:
            if version(tensor) != before:
                raise GramianEngineError(
                    f"An input of {type(self.rule.module).__name__} was modified in place after the module used "
                    "it, so the Gramian engine cannot recover its per-example gradients. Avoid the in-place "
                    "operation or use jd_engine='jacobian'."
                )

    def drop_graph(self) -> None:
        """Forget the call's place in the autograd graph (once the backward has run)."""
        self.edges = []
        self.in_nodes = []

    def release(self) -> None:
        self.inputs = []
        self.drop_graph()
        self.primary_output = None
        self.out_versions = []
        self.versions = []
        self.rng = None


@dataclass(eq=False)
class Use(Generic[CacheT]):
    """A call as its rule serves it this step: the captured call, the decision of the planning passes,
    the gradient-outputs of the engine's single backward and the rule's own per-call cache."""

    call: Call
    decision: CallDecision
    #: Gradient-output ``b`` of each captured output (``None`` where the losses do not reach it), with a
    #: leading dimension of ``m`` rows (examples, or tasks).
    grads: list[Tensor | None] = field(default_factory=list)
    #: Whether the losses reach at least one captured output.
    live: bool = False
    #: What the rule derives from ``(a, b)`` (reshaped matrices, per-row gradients), created by the
    #: rule on first use (:meth:`~hf_jd.gramian._rule.Rule.cache_of`).
    cache: CacheT | None = None
    #: Copied from the call and the decision, which do not change during the step (read often).
    rule: Rule[CacheT] = field(init=False, repr=False)
    key: CallKey = field(init=False, repr=False)
    batched: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rule = self.call.rule
        self.key = self.call.key
        self.batched = self.decision.batched

    # ------------------------------------------------------------------ the captured call

    @property
    def inputs(self) -> list[object]:
        return self.call.inputs

    @property
    def in_spec(self) -> TreeSpec:
        return self.call.in_spec

    @property
    def primary(self) -> int | None:
        return self.call.primary

    @property
    def out_index(self) -> list[int]:
        return self.call.out_index

    @property
    def mutated(self) -> bool:
        return self.call.mutated

    @property
    def rng(self) -> RngState | None:
        return self.call.rng

    @property
    def autocast(self) -> AutocastState | None:
        return self.call.autocast

    # ------------------------------------------------------------------ as decided
    @property
    def edges(self) -> list[GradientEdge]:
        """The edges the backward captures: the call's outputs, or its broadcast points."""
        edges = self.decision.edges
        return list(edges) if edges is not None else self.call.edges

    @property
    def expanded(self) -> list[bool]:
        """Per captured output: whether it is shared by the batch (expanded, or fed by broadcast points)."""
        expanded = self.decision.expanded
        return list(expanded) if expanded is not None else self.call.expanded

    @property
    def in_rows(self) -> tuple[bool, ...]:
        """Which input leaves hold one slice per row."""
        return self.decision.in_rows

    # ------------------------------------------------------------------ for the rules
    @property
    def primary_input(self) -> Tensor:
        primary = self.call.primary
        value = self.call.inputs[primary] if primary is not None else None
        if not isinstance(value, Tensor):
            raise GramianEngineError(f"{type(self.rule.module).__name__} was called without a tensor input.")
        return value

    @property
    def output_grad(self) -> Tensor:
        """The gradient-output ``b`` of a call with a single captured output that the losses reach."""
        grad = self.grads[0] if self.grads else None
        if grad is None:
            raise GramianEngineError(f"{type(self.rule.module).__name__} has no gradient-output.")
        return grad

    def input_shared(self, ctx: Context) -> bool:
        """Whether the primary input is common to every row (per task, or broadcast over the batch)."""
        if ctx.per_task:
            return True
        primary = self.call.primary
        return primary is None or not self.decision.in_rows[primary]

    # ------------------------------------------------------------------ the step's lifecycle
    def receive(self, grads: list[Tensor | None]) -> None:
        """Take the gradients the backward captured at :attr:`edges` (remapped to per-row ``b``)."""
        remap = self.decision.remap
        self.grads = remap(grads) if remap is not None else grads
        self.live = any(g is not None for g in self.grads)
        self.call.drop_graph()

    def check_versions(self) -> None:
        """Raise if a kept input was modified in place since the call (its ``a`` is gone)."""
        self.call.check_versions()

    def drop_inputs_and_grads(self) -> None:
        """Free ``a`` and ``b`` (when the rule's cache holds all that its weighted gradient needs)."""
        self.call.inputs = []
        self.grads = [None] * len(self.grads)

    def release(self) -> None:
        self.call.release()
        self.grads = []
        self.cache = None


__all__ = ["CacheT", "Call", "CallKey", "Use"]
