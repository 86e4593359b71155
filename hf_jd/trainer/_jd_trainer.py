"""``JDTrainer``: the Hugging Face ``Trainer`` with a Jacobian-descent ``training_step``.

Only ``training_step`` changes: the loss vector (one loss per example or per task) goes through a JD
engine (:mod:`._engines`: the Gramian engine or the explicit Jacobian), :mod:`._jd_step` turns it into
the aggregated update written to ``.grad``, and the stock optimizer step, scheduler, clipping, logging
and checkpointing follow. What stays here is Trainer glue: the engine fallback of ``auto``, retries,
non-finite handling, logging and checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers import Trainer

from ..aggregation import Aggregator
from ..distributed import any_across_ranks, world_size
from ..losses import infer_loss_type, per_example_losses, task_losses
from ..scalarization import Scalarizer
from ..training_args import JDTrainingArguments
from ._checkpoint import AGGREGATOR, SCALARIZER, StateFile, load_method_state, save_method_state
from ._engine_choice import EngineSelector, engine_choices
from ._engines import JDEngine
from ._fsdp import accelerate_fsdp_version, check_fsdp, fsdp_engine_choices, uses_fsdp2
from ._guards import (
    check_fixed_rows,
    check_per_task_model,
    check_process_count,
    check_reentrant_checkpointing,
    check_sharding,
    launched_processes,
)
from ._jd_step import (
    GramianOverflow,
    NonFiniteUpdate,
    StepSettings,
    jd_update,
    synchronise_gradients,
    written_gradients_are_finite,
)
from ._loss_vector import (
    JDInputError,
    check_loss_vector,
    loss_derivation_message,
    non_finite_loss_message,
    non_finite_update_message,
)
from ._metrics import MetricsAccumulator, step_metrics
from ._model_card import JDModelCardMixin
from ._model_utils import (
    RankConsistencyCallback,
    broadcast_state_from_rank_zero,
    freeze_batch_norm,
    unwrap_ddp,
)
from ._peft import apply_peft_config
from ._retry import MicroBatchSnapshot
from ._scalarized import ScalarizerHooksCallback, scalarized_training_step
from ._uneven_batches import equal_length_loader

logger = logging.getLogger(__name__)

LossesFunc = Callable[[Any, dict[str, Any]], Tensor]


class JDTrainer(JDModelCardMixin, Trainer):
    """Trainer that minimises a *vector* of losses by Jacobian descent.

    Args:
        compute_losses_func: Optional ``(outputs, inputs) -> Tensor[m]`` returning the loss vector
            from the model outputs (one loss per example, or per task). Without it, per-example losses
            are derived from the outputs (see ``JDTrainingArguments.jd_loss_type``) and per-task losses
            are read from ``outputs.losses`` / ``outputs.loss`` (a dict, tuple or 1-D tensor).
        peft_config: Optional ``peft.PeftConfig`` (e.g. ``LoraConfig``): the model is wrapped in adapters
            and JD trains the adapter parameters only, as with TRL's trainers (needs ``pip install peft``).
        All other arguments are those of :class:`transformers.Trainer`; ``args`` must be a
        :class:`hf_jd.JDTrainingArguments`.

    Override :meth:`compute_losses` for full control. ``compute_loss`` stays scalar (it is used by
    evaluation and ``prediction_step``).
    """

    args: JDTrainingArguments

    def __init__(
        self,
        *args: Any,
        compute_losses_func: LossesFunc | None = None,
        peft_config: Any = None,
        **kwargs: Any,
    ) -> None:
        args, kwargs = apply_peft_config(args, kwargs, peft_config)
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, JDTrainingArguments):
            raise TypeError(
                "JDTrainer needs hf_jd.JDTrainingArguments (it holds the aggregator and the JD settings); "
                f"got {type(self.args).__name__}. Replace TrainingArguments(...) by JDTrainingArguments(...)."
            )
        if self.args.n_gpu > 1:
            raise ValueError(
                "JDTrainer does not support torch.nn.DataParallel (several GPUs in one process). Launch one "
                "process per GPU with `accelerate launch` or `torchrun` instead (DDP)."
            )
        if self.compute_loss_func is not None and compute_losses_func is None:
            raise ValueError(
                "JDTrainer trains on a loss vector, so a scalar `compute_loss_func` cannot drive training. Pass "
                "`compute_losses_func=(outputs, inputs) -> Tensor[m]` (it may coexist with compute_loss_func, "
                "which then only serves evaluation)."
            )
        self.compute_losses_func = compute_losses_func
        check_process_count(self.accelerator.num_processes, launched_processes(world_size()))
        if self.args.jd_check_rank_consistency:
            self.add_callback(RankConsistencyCallback())
        fsdp_version = accelerate_fsdp_version(self.accelerator)
        check_sharding(fsdp_version not in (None, 2), bool(getattr(self, "is_deepspeed_enabled", False)))
        model = cast(nn.Module, self.model)  # Trainer.__init__ has built it (from model_init if needed)
        sharded = uses_fsdp2(model, self.accelerator)  # FSDP2: routed to the sharded engine (_fsdp.py)
        if sharded:
            check_fsdp(self.args, None)
        check_per_task_model(
            model,
            self.args,
            custom_losses=compute_losses_func is not None
            or type(self).compute_losses is not JDTrainer.compute_losses,
        )
        self._method_state_synced = False
        self._engines: EngineSelector | None = None  # Jacobian-descent runs: the engine and its fallbacks
        self._jd_metrics = MetricsAccumulator()
        self._task_names: list[str] = []  # per task: the names of the last loss vector's tasks
        #: ``--scalarizer`` runs: the scalarizer, and the last micro-batch of a step (for FAMO's update).
        self.scalarizer: Scalarizer | None = None
        self._scalarizer_last_step: tuple[dict[str, Any], Tensor] | None = None
        if self.args.scalarizer is not None:
            self.scalarizer = self.args.build_scalarizer().to(self.args.device)
            self.aggregator: Aggregator | None = None
            self.add_callback(ScalarizerHooksCallback(self, self.scalarizer))
            return
        self.aggregator = self.args.build_aggregator()
        check_fixed_rows(self.aggregator, self.args, self.train_dataset, world_size())
        check_reentrant_checkpointing(model)
        if sharded:
            check_fsdp(self.args, self.aggregator)
        choices = (
            fsdp_engine_choices(self.args)
            if sharded
            else engine_choices(self.args, self.aggregator, world_size())
        )
        self._engines = EngineSelector(choices, self.args)
        if self.args.torch_compile:
            # Compiled graphs donate their saved buffers to the first backward; the JD pass back-propagates
            # several rows through one graph (rows are then computed one by one, see _engine_choice.build_engine).
            import torch._functorch.config as functorch_config

            functorch_config.donated_buffer = False

    # ------------------------------------------------------------------ loss vector
    def compute_losses(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """Return the loss vector ``[m]`` of a batch: one loss per example, or one per task."""
        outputs = model(**inputs)
        if self.compute_losses_func is not None:
            return self.compute_losses_func(outputs, inputs)
        if self.args.jd_objectives == "per_task":
            try:
                losses, self._task_names = task_losses(outputs)
            except ValueError as error:  # the outputs do not fit the settings: no engine can change that
                raise JDInputError(str(error)) from None
            return losses
        loss_type = self._loss_type(unwrap_ddp(model))
        try:
            return per_example_losses(
                outputs, inputs, loss_type, label_smoothing=self.args.label_smoothing_factor
            )
        except Exception as error:  # the outputs do not fit the loss type: no engine can change that
            raise JDInputError(loss_derivation_message(model, loss_type, error)) from error

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
        """One micro-batch of Jacobian descent; writes ``scale * A(J)`` into ``.grad``.

        ``scale = 1 / current_gradient_accumulation_steps`` whatever the model accepts as loss kwargs
        (per-example objectives are self-normalised, so ``num_items_in_batch`` is not used). Under
        ``jd_engine="auto"`` a failure of the Gramian engine on its first step (or on a verification step)
        re-runs the micro-batch, with the same random state, on the next engine (see ``_engine_choice``).
        Under ``--scalarizer`` the micro-batch is one ordinary backward instead (see ``_scalarized``).
        """
        self._sync_method_state()
        if self.scalarizer is not None:
            return scalarized_training_step(self, self.scalarizer, model, inputs)
        model.train()
        optimizer_train = getattr(self.optimizer, "train", None)
        if callable(optimizer_train):
            optimizer_train()
        module = unwrap_ddp(model)
        if self.args.jd_freeze_batch_norm:
            freeze_batch_norm(module)
        inputs = self._prepare_inputs(inputs)
        scale = 1.0 / self.current_gradient_accumulation_steps
        engines = self._require_engines()
        verify = engines.verification_due(self.state.global_step)
        losses_finite: bool | None = None
        gramian_dtype: torch.dtype | None = None
        engine = engines.current(module)
        # Only a self-checked engine (the Gramian engine) ever re-runs a micro-batch (fallback, float64
        # Gramian on overflow). The snapshot is taken before the first attempt, so that a rerun starts from
        # the same random state (and, on a trial step, the same gradients).
        on_trial = engine.self_check and verify  # verify is always due before the first success
        snapshot = MicroBatchSnapshot.take(engine.params, grads=on_trial) if engine.self_check else None
        while True:
            engine = engines.current(module)
            try:
                losses = self._capture_losses(module, engine, inputs)
                if losses_finite is None:  # one decision for all attempts (same inputs, same random state)
                    losses_finite = not any_across_ranks(
                        not bool(torch.isfinite(losses.detach()).all()), losses.device
                    )
                if not losses_finite:
                    engine.release()
                    message = non_finite_loss_message(losses, self.state.global_step)
                    return self._skip_or_raise(module, losses, scale, message)
                self._jd_update(engine, losses, scale, verify, gramian_dtype)
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
                if snapshot is None or not (on_trial and engine.self_check):
                    raise
                if not engines.fall_back(error, rerun=True):
                    raise
                snapshot.restore()
                continue
            engines.confirmed = True
            if self.accelerator.sync_gradients:
                if not getattr(
                    engine, "synchronises_gradients", False
                ):  # FSDP2 reduce-scatters every micro-batch
                    synchronise_gradients(engine.params, self.args.jd_scope, self.args.jd_objectives)
                self._check_written_gradients(engine)
            return losses.detach().mean() * scale

    def _capture_losses(self, module: nn.Module, engine: JDEngine, inputs: dict[str, Any]) -> Tensor:
        """Forward under the engine's capture; returns the checked loss vector."""
        try:
            with engine.capture(), self.compute_loss_context_manager():
                losses = self.compute_losses(module, inputs)
            return check_loss_vector(losses, inputs, self.args.jd_objectives)
        except BaseException:
            engine.release()
            raise

    def _jd_update(
        self, engine: JDEngine, losses: Tensor, scale: float, verify: bool, gramian_dtype: torch.dtype | None
    ) -> None:
        """The JD update of ``losses`` into ``.grad`` (see :mod:`._jd_step`), and its metrics."""
        grad_scale = self._grad_scale()
        logging_step = self._is_logging_step()
        settings = StepSettings(
            per_task=self.args.jd_objectives == "per_task",
            global_scope=world_size() > 1 and self.args.jd_scope == "global",
            verify=verify,
            gramian_dtype=gramian_dtype,
            keep_gramian=logging_step,
            loss_values=losses,
        )
        jd_losses = losses * grad_scale if grad_scale != 1.0 else losses
        result = jd_update(engine, self._jd_aggregator, jd_losses, scale, settings)
        if logging_step and result.gramian is not None:
            names = None
            if settings.per_task:
                known = len(self._task_names) == losses.numel()
                names = self._task_names if known else [f"task_{i}" for i in range(losses.numel())]
            self._jd_metrics.add(step_metrics(result.gramian, result.weights, losses, grad_scale, names))

    def _check_written_gradients(self, engine: JDEngine) -> None:
        """Last line of defence, once per optimizer step: no non-finite ``.grad`` reaches the optimizer."""
        if self.accelerator.scaler is not None:
            return  # the fp16 scaler skips steps with non-finite gradients
        finite = getattr(
            engine, "gradients_are_finite", None
        )  # FSDP2: local shards, one decision for all ranks
        if not (finite() if callable(finite) else written_gradients_are_finite(engine.params)):
            raise FloatingPointError(
                f"The JD update of global step {self.state.global_step} overflowed: its gradients hold inf/NaN "
                "although the losses, the Gramian and the weights are finite. The optimizer step was not taken and "
                "the parameters are unchanged. Lower the loss scale (e.g. normalise the losses) or use float64."
            )

    def _skip_or_raise(self, module: nn.Module, losses: Tensor, scale: float, message: str) -> Tensor:
        """Nothing non-finite may reach the parameters: under an fp16 scaler, NaN in ``.grad`` makes the scaler
        skip the step; otherwise raise ``FloatingPointError(message)`` before anything is written."""
        if self.accelerator.scaler is None:
            raise FloatingPointError(message)
        self._poison_gradients(module)
        return losses.detach().mean() * scale

    def _poison_gradients(self, module: nn.Module) -> None:
        for param in (p for p in module.parameters() if p.requires_grad):
            param.grad = torch.full_like(param, float("nan"))

    def _grad_scale(self) -> float:
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

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

    def _require_engines(self) -> EngineSelector:
        if self._engines is None:
            raise RuntimeError("This trainer scalarizes the losses (--scalarizer): it has no JD engine.")
        return self._engines

    @property
    def _jd_aggregator(self) -> Aggregator:
        if self.aggregator is None:
            raise RuntimeError("This trainer scalarizes the losses (--scalarizer): it has no aggregator.")
        return self.aggregator
