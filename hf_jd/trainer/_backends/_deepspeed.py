r"""DeepSpeed ZeRO-0/1/2/3: the Gramian from the engine's own pass, the update as DeepSpeed's own backward.

**Detection**: accelerate's DeepSpeed plugin on the accelerator state (what ``Trainer.is_deepspeed_enabled``
reads, set by ``--deepspeed`` or an accelerate config with ``distributed_type: DEEPSPEED``), with its ZeRO
stage and its ``zero_optimization`` settings.

**Where gradients live.** Under ZeRO, ``param.grad`` is not the optimizer's input: DeepSpeed's backward
reduces (stage 1–2) or reduce-scatters (stage 3) each gradient into its partitions from hooks on the
parameters, and accelerate's ``backward`` also calls ``engine.step()`` at the end of each accumulation window
(DeepSpeed's clipping and optimizer). Writing ``.grad`` from outside is ignored (stage 1–2) or breaks the step
(stage 3). So the update is written by **the generic path** (:class:`~._base.Backend`): the Gramian engine
forms :math:`G` with the graph of the losses kept (``keep_graph=True``) — its pass (and its first-step
self-check) takes gradients with ``torch.autograd.grad``, which never runs a parameter's ``AccumulateGrad``,
so DeepSpeed's gradient hooks do not fire —, the aggregator's
weights :math:`w` come from :math:`G`, and :math:`s\,w^\top L` is back-propagated **once**, by DeepSpeed's own
``backward`` (:meth:`DeepSpeedBackend.backward`, the stock step's ``accelerator.backward`` with its keyword
arguments, e.g. ``scale_wrt_gas=False``). Since :math:`\nabla_\theta (w^\top L) = J^\top w` with :math:`w`
held constant, DeepSpeed then reduces, clips and steps on exactly the JD update.

**The engine's own hooks.** DeepSpeed's engine puts hooks on the outputs of its forward that start its
backward bookkeeping (and, under ZeRO-1/2, end it with the gradient reduction) at the first gradient through
them: in the Gramian pass they would reduce gradients that do not exist. So the JD forward runs the module
under the engine (as under DDP), and the update's backward carries those hooks instead
(:func:`backward_prologue_hooks`), as a stock backward through the engine's outputs does.

**Scopes.** ``jd_scope="local"``: each rank's update :math:`s\,J_r^\top w_r`, which DeepSpeed averages over
the ranks, as DDP's JD does. ``"global"`` (per example): the global Gramian (every rank's rows,
:mod:`hf_jd.gramian._global`), each rank back-propagating its rows' weights; DeepSpeed's average is
undone by scaling the rank's loss by the number of ranks, so that the ranks' shares add up to
:math:`s\,J^\top w` of the global batch. Per task (local scope): the shared parameters get
:math:`s\,J^\top w` and each task-specific parameter its plain task gradient, from one DeepSpeed backward
(:meth:`DeepSpeedBackend._write_per_task`).

**ZeRO-3** gathers a module's parameters before its backward and releases them after, counting backward
passes with per-module counters that the Gramian pass would use up: :class:`Zero3BackwardCounters` puts
them back before the update's backward. Outside its module's forward and backward a ZeRO-3 parameter is an
empty partition: the Gramian engine reads parameter shapes from ``ds_shape`` then
(:func:`hf_jd.gramian._utils.full_shape`), e.g. to size the per-example rows the global scope exchanges.

**Refused** (:meth:`DeepSpeedBackend.check`, by name): the explicit-Jacobian engine and the aggregators that
need :math:`J` itself (they differentiate with respect to the parameters outside DeepSpeed's backward);
``--scalarizer`` (not served under DeepSpeed yet), per-task objectives in the global scope over several
processes (the explicit Jacobian); parameter or optimizer offload and
ZeRO++'s quantised weights or gradients and hierarchical partitioning (not tested).

**Finiteness**: the losses, the Gramian and the weights are checked before the write; DeepSpeed steps inside
its backward, so what is left (an overflow in the backward itself) is DeepSpeed's to handle, as in a stock
step (its fp16 loss scaler; fp16 is not tested here, bf16 and float32 are).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ...aggregation import Aggregator, GramianWeightedAggregator
from ...distributed import world_size
from ...training_args import JDTrainingArguments
from .._compat import deepspeed_zero_stage
from .._engines import JDEngine
from ._base import Backend, EngineChoice, gramian_engine_choices, task_parameters
from ._ddp import build_engine

#: ``zero_optimization`` settings that JD does not serve yet, and what each is.
UNSERVED_ZERO_SETTINGS = {
    "offload_param": "parameter offload",
    "offload_optimizer": "optimizer offload",
    "zero_quantized_weights": "ZeRO++ quantised weights",
    "zero_quantized_gradients": "ZeRO++ quantised gradients",
    "zero_hpz_partition_size": "ZeRO++ hierarchical partitioning",
}


def _is_set(name: str, value: Any) -> bool:
    """Whether a ``zero_optimization`` setting turns its feature on."""
    if name.startswith("offload_"):
        device = value.get("device") if isinstance(value, Mapping) else value
        return device not in (None, "none")
    if name == "zero_hpz_partition_size":
        return value not in (None, 1, "auto")
    return bool(value)


def deepspeed_refusal(what: str, why: str) -> ValueError:
    """The error for a setting JD does not serve under DeepSpeed: what it is, why, and what to do."""
    return ValueError(f"JD under DeepSpeed ZeRO does not support {what}: {why}")


def zero_settings(accelerator: Any) -> dict[str, Any]:
    """The ``zero_optimization`` section of accelerate's DeepSpeed plugin (empty when it has none)."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    config = getattr(plugin, "deepspeed_config", None)
    section = config.get("zero_optimization") if isinstance(config, Mapping) else None
    return dict(section) if isinstance(section, Mapping) else {}


def backward_prologue_hooks(engine: nn.Module, loss: Tensor) -> None:
    """Put on ``loss`` the hooks DeepSpeed's engine puts on the outputs of its forward (DeepSpeed 0.19,
    ``DeepSpeedEngine.forward``): the first gradient through them runs the engine's backward prologue (ZeRO's
    ``backward_prologue``, ``enter_backward``, the accumulation-boundary flag of the optimizer). The JD forward
    runs the module under the engine, without those hooks (they would fire in the Gramian pass), so the update's
    backward carries them instead, as a stock backward through the engine's outputs would."""
    prologue = getattr(engine, "_backward_prologue", None)
    per_tensor = getattr(engine, "_backward_prologue_per_tensor", None)
    if prologue is None or per_tensor is None:
        return  # not a DeepSpeed engine (a module trained without DeepSpeed's wrapper)
    from deepspeed.runtime.utils import register_output_backward_hooks

    # what the engine's forward does first (ZeRO: a new backward of this micro-batch)
    clear_seen = getattr(getattr(engine, "optimizer", None), "clear_backward_seen_flag", None)
    if clear_seen is not None:
        clear_seen()
    register_output_backward_hooks(loss, preprocess_once_fn=prologue, preprocess_per_tensor_fn=per_tensor)


def _replaced(gradient: Tensor, arriving: Tensor) -> Tensor:
    """A parameter hook's result: ``gradient`` in place of the one ``arriving``."""
    return gradient.to(arriving.dtype)


class Zero3BackwardCounters:
    """ZeRO-3's per-module backward bookkeeping, as the forward leaves it, put back before the update's backward.

    ZeRO-3 gathers a module's parameters before its backward and releases them after, counting with two
    attributes it sets on every module during the forward (DeepSpeed 0.19, ``parameter_offload.py``):
    ``applied_pre_backward_ref_cnt`` (backward passes still to gather for) and ``ds_grads_remaining`` (output
    gradients still to come before the release). The Gramian pass is a backward through the same graph: it
    uses them up, so the update's backward would find the parameters released and never gathered again
    (``AccumulateGrad`` then meets an empty partition). A forward hook on the model, run after DeepSpeed's own,
    records both counters of every module; :meth:`restore` writes them back, so that the update's backward
    gathers, reduce-scatters and releases as a stock backward does.
    """

    COUNTERS = ("applied_pre_backward_ref_cnt", "ds_grads_remaining")

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.saved: list[tuple[Any, ...]] = []
        self.handle = model.register_forward_hook(self._record)

    def _record(self, *unused: Any) -> None:
        self.saved = [tuple(getattr(module, name, None) for name in self.COUNTERS) for module in self.modules]

    def restore(self) -> None:
        for module, values in zip(self.modules, self.saved, strict=True):
            for name, value in zip(self.COUNTERS, values, strict=True):
                if value is not None:
                    setattr(module, name, value)


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO under ``JDTrainer`` (module docstring).

    Args:
        zero_stage: the ZeRO stage of accelerate's DeepSpeed plugin (``None`` when it does not say).
        zero: the plugin's ``zero_optimization`` settings.
    """

    name = "deepspeed"

    def __init__(self, zero_stage: int | None = None, zero: Mapping[str, Any] | None = None) -> None:
        self.zero_stage = zero_stage
        self.zero = dict(zero or {})
        #: the stock step's ``accelerator.backward`` and its keyword arguments, bound for each micro-batch
        self._backward: Callable[..., None] | None = None
        self._backward_kwargs: dict[str, Any] = {}
        self._engine: nn.Module | None = None
        #: the global per-example step: undo DeepSpeed's average over the ranks
        self._sum_over_ranks = False
        #: ZeRO-3: its per-module backward counters as the forward left them (restored before the update)
        self._zero3_counters: Zero3BackwardCounters | None = None

    @classmethod
    def detect(cls, accelerator: Any, model: nn.Module) -> DeepSpeedBackend | None:
        """The backend of a run with accelerate's DeepSpeed plugin, ``None`` without it."""
        enabled, stage = deepspeed_zero_stage(accelerator)
        return cls(stage, zero_settings(accelerator)) if enabled else None

    def check(self, args: JDTrainingArguments, aggregator: Aggregator | None) -> None:
        for name, what in UNSERVED_ZERO_SETTINGS.items():
            if _is_set(name, self.zero.get(name)):
                raise deepspeed_refusal(
                    f"{what} (zero_optimization.{name}={self.zero[name]!r})",
                    "it is not tested with the JD update yet. Remove it from the DeepSpeed config.",
                )
        if args.jd_engine == "jacobian":
            raise deepspeed_refusal(
                "jd_engine='jacobian'",
                "the explicit-Jacobian engine differentiates with respect to the parameters outside DeepSpeed's "
                "backward, which ZeRO's gradient hooks do not allow. Use jd_engine='auto' or 'gramian'.",
            )
        if aggregator is not None and not isinstance(aggregator, GramianWeightedAggregator):
            raise deepspeed_refusal(
                f"--aggregator {args.aggregator}",
                "it needs the Jacobian itself, which is formed with respect to the parameters outside DeepSpeed's "
                "backward. Use a Gramian-weighted aggregator (e.g. upgrad, mgda, mean; `hf-jd aggregators`).",
            )
        if args.scalarizer is not None:
            raise deepspeed_refusal(
                f"--scalarizer {args.scalarizer}", "it is not served under DeepSpeed yet."
            )
        several = world_size() > 1
        representation = args.jd_gramian == "representation"
        if args.jd_objectives == "per_task" and several and args.jd_scope == "global" and not representation:
            raise deepspeed_refusal(
                "jd_objectives='per_task' with jd_scope='global' over several processes",
                "the global per-task step averages the task Jacobian over the ranks, which needs the explicit "
                "Jacobian with respect to the parameters. Use jd_scope='local' (each rank's per-task step, "
                "averaged by DeepSpeed), or DDP for the global per-task step.",
            )
        # the global per-example weights are each rank's rows' share; the representation Gramian's global
        # per-task weights are every rank's, and DeepSpeed's mean over ranks makes the global step
        self._sum_over_ranks = several and args.jd_scope == "global" and args.jd_objectives == "per_example"

    def engine_choices(
        self, args: JDTrainingArguments, aggregator: Aggregator, world_size: int
    ) -> list[EngineChoice]:
        """The Gramian engine, with and without broadcast expansion (it keeps the graph for the update)."""
        return gramian_engine_choices(args)

    def build_engine(
        self, choice: EngineChoice, module: nn.Module, args: JDTrainingArguments, world_size: int
    ) -> JDEngine:
        if self.zero_stage == 3 and self._zero3_counters is None:
            self._zero3_counters = Zero3BackwardCounters(module)
        return build_engine(choice, module, args, world_size, keep_graph=True)

    def bind_backward(
        self, backward: Callable[..., None], kwargs: Mapping[str, Any], model: nn.Module
    ) -> None:
        """The stock step's ``accelerator.backward``, the keyword arguments it passed and the DeepSpeed engine."""
        self._backward = backward
        self._backward_kwargs = dict(kwargs)
        self._engine = model

    def write_update(
        self, engine: JDEngine, losses: Tensor, weights: Tensor, scale: float, *, per_task: bool
    ) -> None:
        if self._sum_over_ranks:
            scale *= world_size()
        if self._zero3_counters is not None:
            self._zero3_counters.restore()
        if not per_task:
            super().write_update(engine, losses, weights, scale, per_task=False)
            return
        try:
            self._write_per_task(engine.params, losses, weights, scale)
        finally:
            engine.release()

    def _write_per_task(
        self, params: Sequence[nn.Parameter], losses: Tensor, weights: Tensor, scale: float
    ) -> None:
        r"""Per task, in one DeepSpeed backward: :math:`s\,J^\top w` for the shared parameters and the plain
        task gradient :math:`s\,\nabla L_k` for a parameter only task :math:`k` reaches (a head), as the
        engines' writers give them.

        The backward of :math:`s\,w^\top L` gives a task-specific parameter :math:`s\,w_k \nabla L_k`; its
        plain gradient is taken first by ``torch.autograd.grad`` of :math:`s \sum_k L_k` with respect to the
        task-specific parameters (their ``AccumulateGrad`` does not run, so DeepSpeed's gradient hooks do not
        fire; under ZeRO-3 its counters are put back after), and a hook on each of them hands DeepSpeed that
        gradient instead during the backward (a tensor hook on the parameter runs before ``AccumulateGrad``,
        DeepSpeed's hooks after it)."""
        common, specific = task_parameters(losses, params)
        plain: Sequence[Tensor] = ()
        if specific:
            plain = torch.autograd.grad(losses.sum() * scale, specific, retain_graph=True)
            if self._zero3_counters is not None:
                self._zero3_counters.restore()
        handles = [p.register_hook(partial(_replaced, gradient)) for p, gradient in zip(specific, plain)]
        try:
            self.backward(
                (weights.detach().to(losses.dtype) * losses).sum() * scale, [*common, *specific], False
            )
        finally:
            for handle in handles:
                handle.remove()

    def backward(self, loss: Tensor, inputs: Sequence[Tensor], retain_graph: bool) -> None:
        """DeepSpeed's backward of ``loss`` (through accelerate: reduction into ZeRO's partitions, and
        ``engine.step()`` at the end of the accumulation window). It back-propagates into every trainable
        parameter: ``inputs`` are those the loss reaches, the others get no gradient either way."""
        if self._backward is None:
            raise RuntimeError(
                "DeepSpeedBackend.backward needs the stock step's accelerator.backward (bind_backward): it is "
                "called by JDTrainerMixin inside training_step."
            )
        kwargs = dict(self._backward_kwargs)
        if retain_graph:
            kwargs["retain_graph"] = True
        if self._engine is not None:
            backward_prologue_hooks(self._engine, loss)
        self._backward(loss, **kwargs)

    def gradients_are_finite(self, engine: JDEngine) -> bool:
        """DeepSpeed stepped inside its backward; an overflow there is its loss scaler's (module docstring)."""
        return True
