"""The record of one captured module call (a *use* of the module's parameters)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from ._errors import GramianEngineError

if TYPE_CHECKING:
    from ._rule import Rule
    from ._utils import Context


@dataclass(eq=False)
class Use:
    """One forward call of a module that owns trainable parameters.

    The forward hook fills the capture fields (inputs ``a`` and the gradient edges of the outputs);
    the engine's single backward fills ``grads`` (the gradient-outputs ``b``, one per captured output,
    with a leading dimension of ``m`` rows: examples, or tasks); the rule turns ``(a, b)`` into
    per-row gradients, Gramian blocks and weighted gradients.
    """

    module: nn.Module
    rule: Rule
    key: tuple[int, int]
    inputs: list[Any]
    spec: Any
    in_lead: list[int | None]
    primary: int | None
    out_lead: list[int | None]
    out_index: list[int]
    edges: list[GradientEdge]
    expanded: list[bool]
    out_spec: Any = None
    rng: Any = None
    autocast: Any = None
    versions: list[tuple[Tensor, int]] = field(default_factory=list)
    #: The module modified one of its own inputs in place: its inputs no longer hold ``a``.
    mutated: bool = False
    # Filled by the per-example classification (which input leaves are per example).
    in_rows: list[bool] = field(default_factory=list)
    batched: bool = True
    # Filled by the backward.
    grads: list[Tensor | None] | None = None
    live: bool = False
    in_nodes: list[Any] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def primary_input(self) -> Tensor:
        if self.primary is None:
            raise GramianEngineError(f"{type(self.module).__name__} was called without a tensor input.")
        return self.inputs[self.primary]

    def input_shared(self, ctx: Context) -> bool:
        """Whether the primary input is common to every row (per task, or broadcast over the batch)."""
        if ctx.per_task:
            return True
        return self.primary is None or not self.in_rows[self.primary]

    def check_versions(self) -> None:
        for tensor, version in self.versions:
            if tensor._version != version:
                raise GramianEngineError(
                    f"An input of {type(self.module).__name__} was modified in place after the module used it, "
                    "so the Gramian engine cannot recover its per-example gradients. Avoid the in-place operation "
                    "or use jd_engine='jacobian'."
                )

    def release(self) -> None:
        self.inputs = []
        self.grads = None
        self.edges = []
        self.in_nodes = []
        self.cache.clear()
        self.versions = []
        self.rng = None
