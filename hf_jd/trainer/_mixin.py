"""``JDTrainerMixin``: the Jacobian-descent step for any ``transformers.Trainer`` subclass.

``class MyTrainer(JDTrainerMixin, SomeTrainer)`` trains on a loss *vector* (one loss per example or per
task) by Jacobian descent; ``JDTrainer`` is ``JDTrainerMixin`` on the stock ``Trainer``.

The mixin does not replace ``training_step``: it wraps the parent's. For one micro-batch,

1. ``self.compute_loss`` is replaced (on the instance, for the step only) by the JD forward: the loss
   vector is computed under the engine's capture, inside the parent's ``compute_loss_context_manager``
   (autocast), and a detached scalar is handed back to the parent;
2. ``accelerator.backward`` is intercepted for the step: where the parent back-propagates that scalar,
   the JD update runs instead (outside autocast), writing ``scale · A(J)`` into ``.grad``. The retries of
   ``jd_engine="auto"`` (another engine, a float64 Gramian) run the forward again from there, re-entering
   ``compute_loss_context_manager``;
3. the parent's ``training_step`` runs everything else as it is: context parallelism's context,
   ``model.train()``, ``optimizer.train()``, ``_prepare_inputs``, ``torch_empty_cache_steps``, and whatever a
   subclass adds around ``super().training_step`` (TRL's activation offloading, counters).

The step returns ``mean(losses) / current_gradient_accumulation_steps`` whatever the parent returns.
Everything private of ``Trainer`` / Accelerate that this relies on is in :mod:`._compat`. The calls into
the JD engines (to be rewired to a backend object) are in the methods under "backend call sites".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from .._objectives import ObjectiveLosses
from ..aggregation import Aggregator
from ..distributed import any_across_ranks, world_size
from ..losses import infer_loss_type, per_example_losses, task_losses
from ..scalarization import Scalarizer
from ..training_args import JDTrainingArguments
from ._backends import Backend, select_backend
from ._checkpoint import AGGREGATOR, SCALARIZER, StateFile, load_method_state, save_method_state
from ._compat import (
    compute_loss_context,
    current_gradient_accumulation_steps,
    grad_scale,
    grad_scaler,
    intercepted_backward,
    is_stock_compute_loss,
    patched_attribute,
    refuse_unservable_setups,
    syncs_gradients,
)
from ._engine_choice import EngineSelector
from ._engines import JDEngine
from ._guards import (
    check_fixed_rows,
    check_per_task_model,
    check_process_count,
    check_reentrant_checkpointing,
    check_representation_module,
    launched_processes,
)
from ._jd_step import (
    GramianOverflow,
    NonFiniteUpdate,
    StepSettings,
    jd_update,
)
from ._loss_vector import (
    JDInputError,
    LossVector,
    check_loss_vector,
    loss_derivation_message,
    loss_values,
    non_finite_loss_message,
    non_finite_update_message,
    row_objective_of,
)
from ._metrics import MetricsAccumulator, step_metrics
from ._model_card import JDModelCardMixin
from ._model_utils import (
    RankConsistencyCallback,
    broadcast_state_from_rank_zero,
    freeze_batch_norm,
    unwrap_parallel,
)
from ._peft import apply_peft_config
from ._retry import MicroBatchSnapshot
from ._scalarized import ScalarizerHooksCallback, scalarized_backward
from ._uneven_batches import equal_length_loader

if TYPE_CHECKING:
    from transformers import Trainer

    _TrainerBase = Trainer  # the mixin is only ever combined with a Trainer: type-check it as one
else:
    _TrainerBase = object

logger = logging.getLogger(__name__)

LossesFunc = Callable[[Any, dict[str, Any]], Tensor | ObjectiveLosses]


@dataclass
class MicroBatch:
    """What one ``training_step`` carries from the JD forward (in ``compute_loss``) to the JD update (in the
    intercepted ``accelerator.backward``)."""

    model: nn.Module
    scale: float  # 1 / current_gradient_accumulation_steps
    #: the parent's ``accelerator.backward`` (the ``--scalarizer`` step's one ordinary backward)
    backward: Callable[..., None] | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    num_items_in_batch: Tensor | int | None = None
    forward_done: bool = False
    losses: Tensor | None = None  # the checked loss vector of the first forward
    #: the row map of the first forward's losses when they are objectives over groups of rows (ObjectiveLosses)
    row_objective: Tensor | None = None
    error: Exception | None = None  # or the failure of the first forward, re-run on the next engine
    # Jacobian descent only:
    engine: JDEngine | None = None
    verify: bool = False
    on_trial: bool = False
    snapshot: MicroBatchSnapshot | None = None
    update_started: bool = False  # the intercepted backward was reached
    result: Tensor | None = None  # what training_step returns, once the update (or a skip) is done

    @property
    def module(self) -> nn.Module:
        """The model under any DDP wrapper or DeepSpeed engine (:func:`._model_utils.unwrap_parallel`)."""
        return unwrap_parallel(self.model)

    def first_forward(self) -> Tensor:
        """The first forward's loss vector (once), or its failure raised again."""
        losses, error, self.losses, self.error = self.losses, self.error, None, None
        if error is not None:
            raise error
        if losses is None:
            raise RuntimeError("JDTrainerMixin: the loss vector of this micro-batch was already used.")
        return losses


class JDTrainerMixin(JDModelCardMixin, _TrainerBase):
    """Jacobian descent for a ``transformers.Trainer`` subclass: ``class T(JDTrainerMixin, SomeTrainer)``.

    The mixin comes first: listed after a ``Trainer`` it would be shadowed by ``Trainer``'s own methods, so
    that order is refused when the class is created. ``_tag_names`` holds the tags of every class combined
    (``hf_jd``, ``jacobian-descent``, then e.g. TRL's ``trl``, ``sft``).

    Args:
        compute_losses_func: Optional ``(outputs, inputs) -> Tensor[m]`` returning the loss vector
            from the model outputs (one loss per example, or per task), or an :class:`hf_jd.ObjectiveLosses`
            (one loss per objective over groups of batch rows: DPO pairs, GRPO groups). Without it, per-example losses
            are derived from the outputs (see ``JDTrainingArguments.jd_loss_type``) and per-task losses
            are read from ``outputs.losses`` / ``outputs.loss`` (a dict, tuple or 1-D tensor).
        peft_config: Optional ``peft.PeftConfig`` (e.g. ``LoraConfig``): the model is wrapped in adapters
            and JD trains the adapter parameters only, as with TRL's trainers (needs ``pip install peft``).
        All other arguments are those of the parent trainer; ``args`` must be a
        :class:`hf_jd.JDTrainingArguments`.

    Override :meth:`compute_losses` for full control. Outside a training step (evaluation,
    ``prediction_step``) ``compute_loss`` is the parent's, scalar. When the parent overrides
    ``compute_loss`` (TRL's ``SFTTrainer`` computes its metrics there), the model outputs of the JD
    forward come from it, called with ``return_outputs=True``, so that its metrics are kept.

    Refused at construction: DataParallel (``n_gpu > 1``), FSDP1, what the FSDP2 and DeepSpeed backends do not
    serve (``_backends``), and the setups of
    :func:`._compat.refuse_unservable_setups` (SageMaker model parallelism, LOMO / AdaLomo and layer-wise
    optimizers, context / sequence / tensor parallelism).
    """

    args: JDTrainingArguments

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse a class that puts ``Trainer`` before the mixin (``class T(SFTTrainer, JDTrainerMixin)``): there
        ``Trainer``'s own ``__init__``, ``training_step`` and ``log`` shadow the mixin's, and the class would train
        by plain gradient descent without a word."""
        super().__init_subclass__(**kwargs)
        from transformers import Trainer

        mro = cls.__mro__
        if Trainer in mro and mro.index(Trainer) < mro.index(JDTrainerMixin):
            parent = next(klass for klass in mro[1:] if issubclass(klass, Trainer))
            raise TypeError(
                f"{cls.__name__} lists {parent.__name__} before JDTrainerMixin, so Trainer's training_step would "
                f"shadow the Jacobian-descent step. Put the mixin first: class {cls.__name__}(JDTrainerMixin, "
                f"{parent.__name__})."
            )

    def __init__(
        self,
        *args: Any,
        compute_losses_func: LossesFunc | None = None,
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        args, kwargs = apply_peft_config(args, kwargs, peft_config)
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        if not isinstance(self.args, JDTrainingArguments):
            raise TypeError(
                f"{name} needs hf_jd.JDTrainingArguments (it holds the aggregator and the JD settings); "
                f"got {type(self.args).__name__}. Replace TrainingArguments(...) by JDTrainingArguments(...)."
            )
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{name} does not support torch.nn.DataParallel (several GPUs in one process). Launch one "
                "process per GPU with `accelerate launch` or `torchrun` instead (DDP)."
            )
        if self.compute_loss_func is not None and compute_losses_func is None:
            raise ValueError(
                f"{name} trains on a loss vector, so a scalar `compute_loss_func` cannot drive training. Pass "
                "`compute_losses_func=(outputs, inputs) -> Tensor[m]` (it may coexist with compute_loss_func, "
                "which then only serves evaluation)."
            )
        refuse_unservable_setups(self)
        self.compute_losses_func = compute_losses_func
        self._jd_micro_batch: MicroBatch | None = None  # set during a training step only
        self._method_state_synced = False
        self._engines: EngineSelector | None = None  # Jacobian-descent runs: the engine and its fallbacks
        self._jd_metrics = MetricsAccumulator()
        self._task_names: list[str] = []  # per task: the names of the last loss vector's tasks
        #: ``--scalarizer`` runs: the scalarizer, and the last micro-batch of a step (for FAMO's update).
        self.scalarizer: Scalarizer | None = None
        self._scalarizer_last_step: tuple[dict[str, Any], Tensor] | None = None
        self.aggregator: Aggregator | None = None
        self._set_up_backend(compute_losses_func is not None)

    # ------------------------------------------------------------------ backend call sites: construction
    def _set_up_backend(self, custom_losses: bool) -> None:
        """Check the setup against the engines, and build the engine selector (or the scalarizer)."""
        check_process_count(self.accelerator.num_processes, launched_processes(world_size()))
        if self.args.jd_check_rank_consistency:
            self.add_callback(RankConsistencyCallback())
        model = cast(nn.Module, self.model)  # Trainer.__init__ has built it (from model_init if needed)
        #: DDP (or one process), FSDP2 or DeepSpeed: refusals, engines and how the update reaches the optimizer
        self._backend: Backend = select_backend(self.accelerator, model)
        self._backend.check(self.args, None)
        check_per_task_model(
            model,
            self.args,
            custom_losses=custom_losses or type(self).compute_losses is not JDTrainerMixin.compute_losses,
        )
        check_representation_module(model, self.args)
        if self.args.scalarizer is not None:
            self.scalarizer = self.args.build_scalarizer().to(self.args.device)
            self.add_callback(ScalarizerHooksCallback(self, self.scalarizer))
            return
        self.aggregator = self.args.build_aggregator()
        check_fixed_rows(self.aggregator, self.args, self.train_dataset, world_size())
        check_reentrant_checkpointing(model)
        self._backend.check(self.args, self.aggregator)
        choices = self._backend.engine_choices(self.args, self.aggregator, world_size())
        self._engines = EngineSelector(choices, self.args, self._backend)
        if self.args.torch_compile:
            # Compiled graphs donate their saved buffers to the first backward; the JD pass back-propagates
            # several rows through one graph (rows are then computed one by one, see _engine_choice.build_engine).
            import torch._functorch.config as functorch_config

            functorch_config.donated_buffer = False

    # ------------------------------------------------------------------ loss vector
    def compute_losses(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor | ObjectiveLosses:
        """Return the loss vector ``[m]`` of a batch: one loss per example, or one per task; or an
        :class:`hf_jd.ObjectiveLosses`: ``K`` losses over groups of batch rows (a DPO / reward pair is rows
        ``k`` and ``B + k``, a GRPO group its completions) with the objective of each row, which both engines
        serve exactly (``jd_objectives="per_example"``; the Gramian engine at per-example cost, see
        :mod:`hf_jd._objectives`). Metrics and the logged loss are then over the ``K`` objectives."""
        outputs = self._model_outputs(model, inputs)
        if self.compute_losses_func is not None:
            return self.compute_losses_func(outputs, inputs)
        if self.args.jd_objectives == "per_task":
            try:
                losses, self._task_names = task_losses(outputs)
            except ValueError as error:  # the outputs do not fit the settings: no engine can change that
                raise JDInputError(str(error)) from None
            return losses
        loss_type = self._loss_type(unwrap_parallel(model))
        try:
            return per_example_losses(
                outputs, inputs, loss_type, label_smoothing=self.args.label_smoothing_factor
            )
        except Exception as error:  # the outputs do not fit the loss type: no engine can change that
            raise JDInputError(loss_derivation_message(model, loss_type, error)) from error

    def _model_outputs(self, model: nn.Module, inputs: dict[str, Any]) -> Any:
        """The model outputs of a batch: ``model(**inputs)`` under the stock ``compute_loss``; otherwise the
        outputs of the parent's ``compute_loss`` (``return_outputs=True``, on a shallow copy of ``inputs``,
        which it may pop ``labels`` from), so that what it records (metrics) is kept."""
        parent = self._parent_compute_loss()
        if is_stock_compute_loss(parent):
            return model(**inputs)
        micro_batch = self._jd_micro_batch
        items = micro_batch.num_items_in_batch if micro_batch is not None else None
        _, outputs = parent(self, model, dict(inputs), return_outputs=True, num_items_in_batch=items)
        return outputs

    @classmethod
    def _parent_compute_loss(cls) -> Callable[..., Any]:
        """The ``compute_loss`` of the class the mixin wraps: the first one after ``JDTrainerMixin`` in the MRO
        (overrides on subclasses of the combined class serve evaluation only, as on ``JDTrainer``)."""
        mro = cls.__mro__
        for klass in mro[mro.index(JDTrainerMixin) + 1 :]:
            if "compute_loss" in vars(klass):
                return cast(Callable[..., Any], vars(klass)["compute_loss"])
        raise TypeError(
            f"{cls.__name__} has no compute_loss: JDTrainerMixin must be combined with a Trainer."
        )

    def _loss_type(self, model: nn.Module) -> str:
        if self.args.jd_loss_type != "auto":
            return self.args.jd_loss_type
        loss_type = infer_loss_type(model)
        if loss_type is None:
            raise JDInputError(
                f"hf_jd cannot tell how to compute per-example losses for {type(model).__name__}. Set "
                "--jd_loss_type (e.g. sequence_classification, causal_lm), pass compute_losses_func, or "
                "override JDTrainer.compute_losses to return one loss per example (reduction='none')."
            )
        return loss_type

    def get_train_dataloader(self) -> Any:
        """The stock train dataloader, cut to the same number of batches on every rank (``even_batches=False``)."""
        return equal_length_loader(super().get_train_dataloader(), self.args.device)

    # ------------------------------------------------------------------ the JD step
    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """One micro-batch of Jacobian descent, inside the parent's ``training_step``; writes ``scale * A(J)``
        into ``.grad``.

        ``scale = 1 / current_gradient_accumulation_steps`` whatever the model accepts as loss kwargs
        (per-example objectives are self-normalised, so ``num_items_in_batch`` is not used). Under
        ``jd_engine="auto"`` a failure of the Gramian engine on its first step (or on a verification step)
        re-runs the micro-batch, with the same random state, on the next engine (see ``_engine_choice``).
        Under ``--scalarizer`` the micro-batch is one ordinary backward instead (see ``_scalarized``).
        Returns ``mean(losses) * scale``.
        """
        self._sync_method_state()
        micro_batch = MicroBatch(model, 1.0 / current_gradient_accumulation_steps(self))
        self._jd_micro_batch = micro_batch
        try:
            with (
                patched_attribute(self, "compute_loss", partial(self._jd_forward, micro_batch)),
                intercepted_backward(self.accelerator, partial(self._jd_backward, micro_batch)) as backward,
            ):
                micro_batch.backward = backward
                super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            if micro_batch.engine is not None and micro_batch.forward_done and not micro_batch.update_started:
                micro_batch.engine.release()  # the parent failed between the forward and the backward
            raise
        finally:
            self._jd_micro_batch = None
        if micro_batch.result is None:
            parent = type(self).__mro__[type(self).__mro__.index(JDTrainerMixin) + 1].__name__
            raise RuntimeError(
                f"{type(self).__name__}: the training_step of {parent} returned without computing the loss "
                "and calling accelerator.backward once, so no Jacobian-descent update was made. JDTrainerMixin "
                "needs a parent whose training_step ends in Trainer.training_step."
            )
        return micro_batch.result

    def _jd_forward(
        self,
        micro_batch: MicroBatch,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, None]:
        """``compute_loss`` during a training step: the first forward of the micro-batch, under the engine's
        capture (the parent has entered ``compute_loss_context_manager``). Returns the mean loss, detached:
        the parent hands it to ``accelerator.backward``, where the JD update runs instead."""
        if micro_batch.forward_done:
            raise RuntimeError(
                f"{type(self).__name__}: the parent's training_step called compute_loss twice in one step; "
                "JDTrainerMixin computes one loss vector per micro-batch."
            )
        micro_batch.forward_done = True
        micro_batch.inputs, micro_batch.num_items_in_batch = inputs, num_items_in_batch
        micro_batch.model = model
        if self.scalarizer is not None:  # a scalarizer reads the loss values only (no row map needed)
            losses = self.compute_losses(model, inputs)
            micro_batch.losses = loss_values(check_loss_vector(losses, inputs, self.args.jd_objectives))
        else:
            self._first_jd_forward(micro_batch)
        found = micro_batch.losses
        loss = found.detach().mean() if found is not None else torch.zeros((), device=self.args.device)
        return (loss, None) if return_outputs else loss

    def _jd_backward(self, micro_batch: MicroBatch, loss: Tensor, **kwargs: Any) -> None:
        """``accelerator.backward`` during a training step: the JD update (or the scalarized backward)."""
        del loss  # the parent's scalar: the update comes from the loss vector
        if kwargs and self._backend.name != "deepspeed":  # DeepSpeed's scale_wrt_gas; LOMO is refused
            raise RuntimeError(
                f"{type(self).__name__}: accelerator.backward was called with {sorted(kwargs)}, which "
                "JDTrainerMixin does not serve."
            )
        if not micro_batch.forward_done:
            raise RuntimeError(
                f"{type(self).__name__}: the parent's training_step called accelerator.backward without "
                "computing the loss through self.compute_loss."
            )
        micro_batch.update_started = True
        assert micro_batch.backward is not None  # set by training_step before the parent runs
        # DeepSpeed: its backward writes the update
        self._backend.bind_backward(micro_batch.backward, kwargs, micro_batch.model)
        if self.scalarizer is not None:
            micro_batch.result = scalarized_backward(self, self.scalarizer, micro_batch, micro_batch.backward)
        else:
            micro_batch.result = self._jd_update_with_retries(micro_batch)

    # ------------------------------------------------------------------ backend call sites: the step
    def _first_jd_forward(self, micro_batch: MicroBatch) -> None:
        """The first forward, in ``compute_loss``: engine, verification, snapshot for a re-run, loss vector.

        A failure that ``auto`` may recover from (the Gramian engine's first or verification step) is kept
        and raised again in the update's retry loop; any other is raised now.
        """
        module = micro_batch.module
        if self.args.jd_freeze_batch_norm:
            freeze_batch_norm(module)
        engines = self._require_engines()
        micro_batch.verify = engines.verification_due(self.state.global_step)
        engine = engines.current(module)
        # Only a self-checked engine (the Gramian engine) ever re-runs a micro-batch (fallback, float64
        # Gramian on overflow). The snapshot is taken before the first attempt, so that a rerun starts from
        # the same random state (and, on a trial step, the same gradients).
        micro_batch.on_trial = engine.self_check and micro_batch.verify  # always due before the first success
        micro_batch.snapshot = (
            MicroBatchSnapshot.take(engine.params, grads=micro_batch.on_trial) if engine.self_check else None
        )
        micro_batch.engine = engine
        try:
            vector = self._capture_losses(module, engine, micro_batch.inputs, rerun=False)
            micro_batch.losses, micro_batch.row_objective = loss_values(vector), row_objective_of(vector)
        except (JDInputError, FloatingPointError):
            raise
        except Exception as error:
            if micro_batch.snapshot is None or not micro_batch.on_trial:
                raise
            micro_batch.error = error

    def _jd_update_with_retries(self, micro_batch: MicroBatch) -> Tensor:
        """The JD update of the micro-batch; re-runs the forward for a fallback or a float64 Gramian."""
        module, scale, snapshot = micro_batch.module, micro_batch.scale, micro_batch.snapshot
        engines = self._require_engines()
        losses_finite: bool | None = None
        gramian_dtype: torch.dtype | None = None
        first = True
        while True:
            engine = engines.current(module)
            try:
                if first:
                    first = False
                    losses, row_objective = micro_batch.first_forward(), micro_batch.row_objective
                else:
                    vector = self._capture_losses(module, engine, micro_batch.inputs, rerun=True)
                    losses, row_objective = loss_values(vector), row_objective_of(vector)
                if losses_finite is None:  # one decision for all attempts (same inputs, same random state)
                    losses_finite = not any_across_ranks(
                        not bool(torch.isfinite(losses.detach()).all()), losses.device
                    )
                if not losses_finite:
                    engine.release()
                    message = non_finite_loss_message(losses, self.state.global_step)
                    return self._skip_or_raise(module, losses, scale, message)
                self._jd_update(engine, losses, scale, micro_batch.verify, gramian_dtype, row_objective)
            except GramianOverflow:
                if snapshot is None:  # raised only for engines that cannot recompute, which have a snapshot
                    raise
                snapshot.restore()
                gramian_dtype = torch.float64
                continue
            except NonFiniteUpdate as error:
                message = non_finite_update_message(error.what, self.state.global_step)
                return self._skip_or_raise(module, losses, scale, message)
            except (JDInputError, FloatingPointError):
                raise
            except Exception as error:
                if snapshot is None or not (micro_batch.on_trial and engine.self_check):
                    raise
                if not engines.fall_back(error, rerun=True):
                    raise
                snapshot.restore()
                continue
            engines.confirmed = True
            sync = syncs_gradients(self.accelerator)
            self._backend.after_micro_batch(
                engine, self.args, sync
            )  # DDP: all-reduce on sync; FSDP2: nothing
            if sync:
                self._check_written_gradients(engine)
            return losses.detach().mean() * scale

    def _capture_losses(
        self, module: nn.Module, engine: JDEngine, inputs: dict[str, Any], rerun: bool
    ) -> LossVector:
        """Forward under the engine's capture; returns the checked loss vector (an
        :class:`hf_jd.ObjectiveLosses` keeps its row map for the engine). The first forward runs inside the
        parent's ``compute_loss_context_manager``; a re-run (``rerun``) enters it again."""
        try:
            with engine.capture():
                if rerun:
                    with compute_loss_context(self):
                        losses = self.compute_losses(module, inputs)
                else:
                    losses = self.compute_losses(module, inputs)
            return check_loss_vector(losses, inputs, self.args.jd_objectives)
        except BaseException:
            engine.release()
            raise

    def _jd_update(
        self,
        engine: JDEngine,
        losses: Tensor,
        scale: float,
        verify: bool,
        gramian_dtype: torch.dtype | None,
        row_objective: Tensor | None = None,
    ) -> None:
        """The JD update of ``losses`` into ``.grad`` (see :mod:`._jd_step`), and its metrics. ``row_objective``:
        the losses are objectives over groups of batch rows (:class:`hf_jd.ObjectiveLosses`); the map goes to
        the engine, everything else (weights, metrics, the logged loss) is over the ``K`` losses."""
        loss_scale = grad_scale(self.accelerator)
        logging_step = self._is_logging_step()
        settings = StepSettings(
            per_task=self.args.jd_objectives == "per_task",
            global_scope=world_size() > 1 and self.args.jd_scope == "global",
            verify=verify,
            gramian_dtype=gramian_dtype,
            keep_gramian=logging_step,
            loss_values=losses,
            row_objective=row_objective,
        )
        jd_losses = losses * loss_scale if loss_scale != 1.0 else losses
        result = jd_update(engine, self._jd_aggregator, jd_losses, scale, settings, self._backend)
        if logging_step and result.gramian is not None:
            names = None
            if settings.per_task:
                known = len(self._task_names) == losses.numel()
                names = self._task_names if known else [f"task_{i}" for i in range(losses.numel())]
            self._jd_metrics.add(step_metrics(result.gramian, result.weights, losses, loss_scale, names))

    def _check_written_gradients(self, engine: JDEngine) -> None:
        """Last line of defence, once per optimizer step: no non-finite ``.grad`` reaches the optimizer."""
        if grad_scaler(self.accelerator) is not None:
            return  # the fp16 scaler skips steps with non-finite gradients
        if not self._backend.gradients_are_finite(engine):  # FSDP2: local shards, one decision for all ranks
            raise FloatingPointError(
                f"The JD update of global step {self.state.global_step} overflowed: its gradients hold inf/NaN "
                "although the losses, the Gramian and the weights are finite. The optimizer step was not taken and "
                "the parameters are unchanged. Lower the loss scale (e.g. normalise the losses) or use float64."
            )

    # ------------------------------------------------------------------ non-finite losses
    def _skip_or_raise(self, module: nn.Module, losses: Tensor, scale: float, message: str) -> Tensor:
        """Nothing non-finite may reach the parameters: under an fp16 scaler, NaN in ``.grad`` makes the scaler
        skip the step; otherwise raise ``FloatingPointError(message)`` before anything is written."""
        if grad_scaler(self.accelerator) is None:
            raise FloatingPointError(message)
        self._poison_gradients(module)
        return losses.detach().mean() * scale

    def _poison_gradients(self, module: nn.Module) -> None:
        for param in (p for p in module.parameters() if p.requires_grad):
            param.grad = torch.full_like(param, float("nan"))

    def _is_logging_step(self) -> bool:
        args = self.args
        if args.logging_strategy != "steps":
            return False
        next_step = self.state.global_step + 1
        logging_steps = self.state.logging_steps or args.logging_steps
        return (args.logging_first_step and next_step == 1) or (
            logging_steps > 0 and next_step % int(max(logging_steps, 1)) == 0
        )

    # ------------------------------------------------------------------ engine
    @property
    def jd_engine(self) -> JDEngine | None:
        """The engine in use (``.name`` is ``"gramian"`` or ``"jacobian"``); ``None`` before the first step."""
        return self._engines.engine if self._engines is not None else None

    def _require_engines(self) -> EngineSelector:
        if self._engines is None:
            raise RuntimeError("This trainer scalarizes the losses (--scalarizer): it has no JD engine.")
        return self._engines

    @property
    def _jd_aggregator(self) -> Aggregator:
        if self.aggregator is None:
            raise RuntimeError("This trainer scalarizes the losses (--scalarizer): it has no aggregator.")
        return self.aggregator

    # ------------------------------------------------------------------ logging & checkpoints
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._jd_metrics and "loss" in logs:
            logs = {**logs, **self._jd_metrics.pop()}
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The stock optimizer, plus one group (no weight decay) for a learnable scalarizer's parameters."""
        optimizer = super().create_optimizer(*([] if model is None else [model]))
        params = [p for p in self.scalarizer.parameters() if p.requires_grad] if self.scalarizer else []
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if params and not known.intersection(id(p) for p in params):
            optimizer.add_param_group({"params": params, "weight_decay": 0.0})
        return optimizer

    def _method_state(self) -> tuple[StateFile, nn.Module, str, dict[str, Any]]:
        """The aggregator's or scalarizer's checkpoint file, module, name and kwargs."""
        if self.scalarizer is not None:
            args = self.args
            return SCALARIZER, self.scalarizer, str(args.scalarizer), args.resolved_scalarizer_kwargs
        return AGGREGATOR, self._jd_aggregator, self.args.aggregator_name, self.args.aggregator_kwargs_dict

    # The two stock hooks below are private: see _compat.OVERRIDDEN_HOOKS (checked: transformers 5.24, 5.25).
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_method_state(output_dir, *self._method_state())

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # The method's state first: a checkpoint of another aggregator/scalarizer is named as such before the
        # optimizer complains about its parameter groups.
        if checkpoint is not None and load_method_state(checkpoint, *self._method_state()):
            self._method_state_synced = True
        super()._load_optimizer_and_scheduler(checkpoint)

    def _sync_method_state(self) -> None:
        """Once: every rank takes rank 0's aggregator/scalarizer state (e.g. an unseeded generator)."""
        if not self._method_state_synced:
            self._method_state_synced = True
            broadcast_state_from_rank_zero(self._method_state()[1])
