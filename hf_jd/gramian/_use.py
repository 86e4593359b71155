"""The record of one captured module call (a *use* of the module's parameters)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from ._errors import GramianEngineError
from ._replay import AutocastState, RngState
from ._torch_ops import TreeSpec, version

if TYPE_CHECKING:
    from ._rule import Rule
    from ._utils import Context

#: The per-call cache type of a rule (each rule declares its own small dataclass).
CacheT = TypeVar("CacheT")

#: ``(index of the owning module among the hooked modules, call number of that module in the forward)``.
CallKey = tuple[int, int]


@dataclass(eq=False)
class Use(Generic[CacheT]):
    """One forward call of a module that owns trainable parameters.

    The fields come in four groups, filled one after the other:

    * what the forward hook captured (``rule`` ... ``autocast``): the kept inputs ``a``, the layout of
      the call's inputs and outputs, and the gradient edges of its outputs;
    * what the per-example classification decided (``in_rows``, ``batched``);
    * what the engine's single backward produced (``grads``: the gradient-outputs ``b``, one per
      captured output, with a leading dimension of ``m`` rows: examples, or tasks; ``live``);
    * the rule's own per-call cache (``cache``, created by the rule on first use), in which it keeps
      what it derives from ``(a, b)``: reshaped matrices, per-row gradients.
    """

    # ------------------------------------------------------------------ captured by the forward hook
    #: The rule of the module called (``rule.module``, ``rule.params``).
    rule: Rule[CacheT]
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
    #: ``edges`` no longer receive its gradient (see :meth:`outputs_modified`).
    out_versions: list[tuple[Tensor, int]] = field(default_factory=list)
    #: Turns the gradients at ``edges`` into the per-row gradient-outputs ``grads`` (broadcast points,
    #: :mod:`hf_jd.gramian._broadcast`); ``None``: ``edges`` are the outputs themselves.
    remap: Callable[[list[Tensor | None]], list[Tensor | None]] | None = None

    # ------------------------------------------------------------------ per-example classification
    #: Which input leaves hold one slice per row (sliced per example when recomputing).
    in_rows: list[bool] = field(default_factory=list)
    #: Whether the call's outputs follow the batch (else its parameters use the fallback).
    batched: bool = True

    # ------------------------------------------------------------------ produced by the backward
    #: Gradient-output ``b`` of each captured output (``None`` where the losses do not reach it).
    grads: list[Tensor | None] = field(default_factory=list)
    #: Whether the losses reach at least one captured output.
    live: bool = False

    # ------------------------------------------------------------------ the rule's state
    cache: CacheT | None = None

    @property
    def primary_input(self) -> Tensor:
        value = self.inputs[self.primary] if self.primary is not None else None
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
        return self.primary is None or not self.in_rows[self.primary]

    def check_versions(self) -> None:
        for tensor, before in self.versions:
            if version(tensor) != before:
                raise GramianEngineError(
                    f"An input of {type(self.rule.module).__name__} was modified in place after the module used "
                    "it, so the Gramian engine cannot recover its per-example gradients. Avoid the in-place "
                    "operation or use jd_engine='jacobian'."
                )

    def outputs_modified(self) -> bool:
        """Whether a captured view output was modified in place after the call (then releases them)."""
        modified = any(version(tensor) != before for tensor, before in self.out_versions)
        self.out_versions = []
        return modified

    def drop_inputs_and_grads(self) -> None:
        """Free ``a`` and ``b`` (when the rule's cache holds all that its weighted gradient needs)."""
        self.inputs = []
        self.grads = [None] * len(self.grads)

    def release(self) -> None:
        self.inputs = []
        self.grads = []
        self.edges = []
        self.in_nodes = []
        self.primary_output = None
        self.out_versions = []
        self.cache = None
        self.versions = []
        self.rng = None
        self.remap = None
