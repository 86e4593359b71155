r"""What a backend is: the interface the trainer talks to, and the generic update path every backend has.

A backend is how a run is laid out over processes (one process or DDP, FSDP2, DeepSpeed). The JD
step itself (capture → Gramian → weights, :mod:`hf_jd.trainer._jd_step`) is the same under every
backend; what differs is what the backend serves (:meth:`Backend.check`), which engines it can run
(:meth:`Backend.engine_choices`, :meth:`Backend.build_engine`), how the update :math:`s\,J^\top w`
reaches ``.grad`` (:meth:`Backend.write_update`), what must happen before the optimizer reads it
(:meth:`Backend.after_micro_batch`) and how it is checked (:meth:`Backend.gradients_are_finite`).

**The generic update path** (:meth:`Backend.write_update`, the default): once the weights :math:`w` are
known, back-propagate :math:`s\, w^\top L` through the graph of the loss vector with the backend's own
:meth:`Backend.backward`. Since :math:`\nabla_\theta (w^\top L) = J^\top w` with :math:`w` held constant,
this writes exactly what an engine's one-backward writer (``engine.accumulate_grad(w, s)``) writes, up
to float rounding. It needs the graph of :math:`L` alive after the Gramian was formed: the engine keeps
it (``engine.keeps_graph``: :class:`~hf_jd.trainer._jacobian_backend.JacobianBackend` with
``keep_graph=True`` back-propagates its rows with ``retain_graph=True``). That choice is exact by
construction; a second forward would be exact only for a forward without side effects (batch-norm
statistics move twice) and under the same random state, and costs a forward. Per task, a
task-specific parameter (reached by one task only: a head) gets its plain task gradient, as from the
one-backward writers: the shared and task-specific parameters are told apart by the autograd graph
(:func:`hf_jd.autojac.shared_by_graph`, the contract of both engines), and two backwards restricted
to each set (``inputs=``) write :math:`s\,J^\top w` and :math:`s\,\nabla\sum_k L_k`.

The one-backward writers stay the default of the backends that have them (DDP, FSDP2): they need no
second backward and, under FSDP2, land in the gradient shards.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ...aggregation import Aggregator
from ...autojac import reached_by_graph, shared_by_graph
from ...training_args import JDTrainingArguments
from .._engines import JDEngine

#: ``backward(loss, inputs, retain_graph)``: a backend's own backward (:meth:`Backend.backward`).
BackwardFn = Callable[[Tensor, Sequence[Tensor], bool], None]


@dataclass(frozen=True)
class EngineChoice:
    """One candidate engine and its settings."""

    kind: Literal["gramian", "jacobian", "representation"]
    expand_broadcast: bool = True

    def __str__(self) -> str:
        if self.kind == "jacobian":
            return "the explicit-Jacobian engine"
        if self.kind == "representation":
            return "the representation Gramian (an approximation of the per-task JD step)"
        return "the Gramian engine" + ("" if self.expand_broadcast else " without broadcast expansion")


class Backend(ABC):
    """How a run is laid out over processes, as the JD step sees it (see the module docstring).

    Attributes:
        name: ``"ddp"`` (one process or DDP), ``"fsdp2"`` or ``"deepspeed"`` (messages, logs).
    """

    name: ClassVar[str]

    def check(self, args: JDTrainingArguments, aggregator: Aggregator | None) -> None:
        """Refuse, with the reason, a setting this backend does not serve. Called once before the aggregator
        is built (``aggregator=None``: what the arguments alone decide) and once with it. Serves all by default."""
        return None

    @abstractmethod
    def engine_choices(
        self, args: JDTrainingArguments, aggregator: Aggregator, world_size: int
    ) -> list[EngineChoice]:
        """The engines to try, in order (``jd_engine="auto"`` falls back along them)."""

    @abstractmethod
    def build_engine(
        self, choice: EngineChoice, module: nn.Module, args: JDTrainingArguments, world_size: int
    ) -> JDEngine:
        """Instantiate ``choice`` for the (unwrapped) ``module``; raises when it cannot serve the model."""

    def write_update(
        self, engine: JDEngine, losses: Tensor, weights: Tensor, scale: float, *, per_task: bool
    ) -> None:
        """Write ``scale · Jᵀ w`` of this rank's ``losses`` into ``.grad``: the generic path (module docstring).

        ``weights`` are this rank's rows' weights (per example in the global scope: its slice of the global
        weights). Needs ``engine.keeps_graph``; the engine is released after.
        """
        if not engine.keeps_graph:
            raise ValueError(
                f"The generic JD update back-propagates wᵀL through the graph of the losses, which the {engine.name} "
                "engine frees when it forms the Gramian. Use an engine that keeps it (JacobianBackend(keep_graph=True)) "
                "or the engine's own writer (engine.accumulate_grad)."
            )
        try:
            backward_update(self.backward, engine.params, losses, weights, scale, per_task=per_task)
        finally:
            engine.release()

    def backward(self, loss: Tensor, inputs: Sequence[Tensor], retain_graph: bool) -> None:
        """The backend's own backward of a scalar ``loss`` into the ``.grad`` of ``inputs`` (accumulated).

        ``torch.autograd.backward`` here; a DeepSpeed backend calls ``engine.backward(loss)``, which also
        scales an fp16 loss and reduces the gradients into ZeRO's partitions."""
        torch.autograd.backward(loss, inputs=list(inputs), retain_graph=retain_graph)

    def bind_backward(
        self, backward: Callable[..., None], kwargs: Mapping[str, Any], model: nn.Module
    ) -> None:
        """The stock step's own ``accelerator.backward``, the keyword arguments it passed and the (wrapped) model
        of this micro-batch (called by the trainer before the update). Ignored by default; DeepSpeed's backward
        is that one."""
        return None

    def after_micro_batch(self, engine: JDEngine, args: JDTrainingArguments, sync_gradients: bool) -> None:
        """What the optimizer needs after a micro-batch was written (``sync_gradients``: it was the last of an
        optimizer step). Nothing by default."""
        return None

    def gradients_are_finite(self, engine: JDEngine) -> bool:
        """Whether the gradients the optimizer will read are finite, the same answer on every rank."""
        return engine.gradients_are_finite()


def gramian_engine_choices(args: JDTrainingArguments) -> list[EngineChoice]:
    """The Gramian engine, with and without broadcast expansion (no Jacobian engine): the candidates of the
    backends that cannot differentiate with respect to the parameters themselves (FSDP2, DeepSpeed); or the
    representation Gramian alone, when the arguments ask for it."""
    if args.jd_gramian == "representation":
        return [EngineChoice("representation")]
    choices = [EngineChoice("gramian", expand_broadcast=args.jd_expand_broadcast)]
    if args.jd_expand_broadcast:
        choices.append(EngineChoice("gramian", expand_broadcast=False))
    return choices


def task_parameters(
    losses: Tensor, params: Sequence[nn.Parameter]
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The reached ``params`` of a per-task loss vector, split into those several tasks share and those one
    task reaches alone (a head), by the autograd graph (:func:`hf_jd.autojac.shared_by_graph`)."""
    reached = reached_by_graph(losses, params)
    shared = shared_by_graph(losses, params)
    if shared is None:
        raise ValueError(
            "The per-task JD update tells shared from task-specific parameters by the autograd graph, which "
            "needs the loss vector built by torch.stack of the task losses."
        )
    common = [p for p, hit, flag in zip(params, reached, shared) if hit and flag]
    specific = [p for p, hit, flag in zip(params, reached, shared) if hit and not flag]
    return common, specific


def backward_update(
    backward: BackwardFn,
    params: Sequence[nn.Parameter],
    losses: Tensor,
    weights: Tensor,
    scale: float,
    *,
    per_task: bool,
) -> None:
    """``scale · Jᵀ w`` into the ``.grad`` of the reached ``params`` by ``backward`` of ``scale · wᵀL``.

    Per task, the task-specific parameters get ``scale · ∇ Σ_k L_k`` instead (a second backward restricted
    to them), as from the engines' writers. Parameters the losses do not reach keep their ``.grad``.
    """
    weights = weights.detach().to(losses.dtype)
    if not per_task:
        targets = [p for p, hit in zip(params, reached_by_graph(losses, params)) if hit]
        if targets:
            backward((weights * losses).sum() * scale, targets, False)
        return
    common, specific = task_parameters(losses, params)
    if common:
        backward((weights * losses).sum() * scale, common, bool(specific))
    if specific:
        backward(losses.sum() * scale, specific, False)
