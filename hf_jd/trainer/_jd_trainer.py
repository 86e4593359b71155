"""``JDTrainer``: the Hugging Face ``Trainer`` with a Jacobian-descent ``training_step``.

Only ``training_step`` changes: the loss vector (one loss per example or per task) goes through a JD
engine (:mod:`._engines`: the Gramian engine or the explicit Jacobian), :mod:`._jd_step` turns it into
the aggregated update written to ``.grad``, and the stock optimizer step, scheduler, clipping, logging
and checkpointing follow. What stays here is Trainer glue: the engine fallback of ``auto``, retries,
non-finite handling, logging and checkpoints.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from ..aggregation import Aggregator
from ..distributed import any_across_ranks, check_rank_consistency, world_size
from ..gramian import GramianMismatchError
from ..losses import infer_loss_type, per_example_losses, task_losses
from ..training_args import JDTrainingArguments
from ._checkpoint import load_aggregator_state, save_aggregator_state
from ._engine_choice import EngineChoice, build_engine, engine_choices
from ._engines import JDEngine
from ._guards import check_fixed_rows, check_per_task_model, check_reentrant_checkpointing, check_sharding
from ._jd_step import (
    GramianOverflow,
    NonFiniteUpdate,
    StepSettings,
    jd_update,
    synchronise_gradients,
    written_gradients_are_finite,
)
from ._loss_vector import JDInputError, check_loss_vector, non_finite_loss_message, non_finite_update_message
from ._metrics import MetricsAccumulator, step_metrics
from ._model_card import JDModelCardMixin
from ._peft import apply_peft_config
from ._retry import MicroBatchSnapshot

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
        check_sharding(
            bool(getattr(self, "is_fsdp_enabled", False)), bool(getattr(self, "is_deepspeed_enabled", False))
        )
        self.aggregator: Aggregator = self.args.build_aggregator()
        check_fixed_rows(self.aggregator, self.args, self.train_dataset, world_size())
        model = cast(nn.Module, self.model)  # Trainer.__init__ has built it (from model_init if needed)
        check_per_task_model(
            model,
            self.args,
            custom_losses=compute_losses_func is not None
            or type(self).compute_losses is not JDTrainer.compute_losses,
        )
        check_reentrant_checkpointing(model)
        self._engine_choices: list[EngineChoice] = engine_choices(self.args, self.aggregator, world_size())
        self._engine_index = 0
        self._jd_engine: JDEngine | None = None
        self._engine_confirmed = False
        self._last_verified_step = -1
        self._jd_metrics = MetricsAccumulator()
        self._task_names: list[str] = []  # per task: the names of the last loss vector's tasks
        self._aggregator_state_synced = False
        if self.args.torch_compile:
            # Compiled graphs donate their saved buffers to the first backward; the JD pass back-propagates
            # several rows through one graph (rows are then computed one by one, see _engine_choice.build_engine).
            import torch._functorch.config as functorch_config

            functorch_config.donated_buffer = False
        if self.args.jd_check_rank_consistency:
            self.add_callback(_RankConsistencyCallback())

    # ------------------------------------------------------------------ loss vector
    def compute_losses(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """Return the loss vector ``[m]`` of a batch: one loss per example, or one per task."""
        outputs = model(**inputs)
        if self.compute_losses_func is not None:
            return self.compute_losses_func(outputs, inputs)
        try:
            if self.args.jd_objectives == "per_task":
                losses, self._task_names = task_losses(outputs)
                return losses
            return per_example_losses(
                outputs, inputs, self._loss_type(model), label_smoothing=self.args.label_smoothing_factor
            )
        except ValueError as error:  # the outputs do not fit the settings: no engine can change that
            raise JDInputError(str(error)) from None

    def _loss_type(self, model: nn.Module) -> str:
        if self.args.jd_loss_type != "auto":
            return self.args.jd_loss_type
        loss_type = infer_loss_type(model)
        if loss_type is None:
            raise ValueError(
                f"hf_jd cannot tell how to compute per-example losses for {type(model).__name__}. Set "
                "--jd_loss_type (e.g. sequence_classification, causal_lm), pass compute_losses_func, or "
                "override JDTrainer.compute_losses to return one loss per example (reduction='none')."
            )
        return loss_type

    # ------------------------------------------------------------------ the JD step
    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """One micro-batch of Jacobian descent; writes ``scale * A(J)`` into ``.grad``.

        ``scale = 1 / current_gradient_accumulation_steps`` whatever the model accepts as loss kwargs
        (per-example objectives are self-normalised, so ``num_items_in_batch`` is not used). Under
        ``jd_engine="auto"`` a failure of the Gramian engine on its first step (or on a verification step)
        re-runs the micro-batch, with the same random state, on the next engine (see ``_engine_choice``).
        """
        model.train()
        optimizer_train = getattr(self.optimizer, "train", None)
        if callable(optimizer_train):
            optimizer_train()
        module = _unwrap_ddp(model)
        if self.args.jd_freeze_batch_norm:
            freeze_batch_norm(module)
        inputs = self._prepare_inputs(inputs)
        self._sync_aggregator_state()
        scale = 1.0 / self.current_gradient_accumulation_steps
        verify = self._verification_due()
        losses_finite: bool | None = None
        gramian_dtype: torch.dtype | None = None
        engine = self._engine(module)
        # Only a self-checked engine (the Gramian engine) ever re-runs a micro-batch (fallback, float64
        # Gramian on overflow). The snapshot is taken before the first attempt, so that a rerun starts from
        # the same random state (and, on a trial step, the same gradients).
        on_trial = engine.self_check and verify  # verify is always due before the first success
        snapshot = MicroBatchSnapshot.take(engine.params, grads=on_trial) if engine.self_check else None
        while True:
            engine = self._engine(module)
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
                if not self._fall_back(error, rerun=True):
                    raise
                snapshot.restore()
                continue
            self._engine_confirmed = True
            if self.accelerator.sync_gradients:
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
        )
        jd_losses = losses * grad_scale if grad_scale != 1.0 else losses
        result = jd_update(engine, self.aggregator, jd_losses, scale, settings)
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
        if not written_gradients_are_finite(engine.params):
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

    def _verification_due(self) -> bool:
        """The exactness self-check runs on the engine's first step and every ``jd_verify_every`` steps
        (on the first micro-batch of those steps)."""
        if not self._engine_confirmed:
            return True
        every, step = self.args.jd_verify_every, self.state.global_step
        if not every or step % every or self._last_verified_step == step:
            return False
        self._last_verified_step = step
        return True

    def _fall_back(self, error: Exception, rerun: bool) -> bool:
        """Move ``auto`` to the next engine after ``error``; ``False`` when there is none left.

        A static refusal (``rerun=False``: the engine could not be built for this model) or a failed
        exactness self-check skips every candidate of the same kind: their settings cannot help.
        """
        failed = self._engine_choices[self._engine_index]
        index = self._engine_index + 1
        if not rerun or isinstance(error, GramianMismatchError):  # the settings of the kind cannot help
            while index < len(self._engine_choices) and self._engine_choices[index].kind == failed.kind:
                index += 1
        if index >= len(self._engine_choices):
            return False
        self._engine_index = index
        self._jd_engine = None
        chosen = self._engine_choices[index]
        cause = f"{type(error).__name__}: {error}"
        if rerun:
            message = (
                f"hf_jd: {failed} failed on the first step ({cause}). The micro-batch is run again, with the same "
                f"random state, with {chosen}, which is used from now on."
            )
        else:
            message = f"hf_jd: {failed} cannot serve this model ({cause}); using {chosen}."
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        return True

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
        return self._jd_engine

    def _engine(self, module: nn.Module) -> JDEngine:
        """The current engine, built on first use; a candidate that cannot serve the model is skipped."""
        while self._jd_engine is None:
            choice = self._engine_choices[self._engine_index]
            try:
                self._jd_engine = build_engine(choice, module, self.args, world_size())
            except Exception as error:
                if not self._fall_back(error, rerun=False):
                    raise
            else:
                logger.info("JDTrainer uses %s with %r.", choice, self.aggregator)
        return self._jd_engine

    # ------------------------------------------------------------------ logging & checkpoints
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._jd_metrics and "loss" in logs:
            logs = {**logs, **self._jd_metrics.pop()}
        super().log(logs, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_aggregator_state(
                output_dir, self.aggregator, self.args.aggregator, self.args.aggregator_kwargs_dict
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if load_aggregator_state(
            checkpoint, self.aggregator, self.args.aggregator, self.args.aggregator_kwargs_dict
        ):
            self._aggregator_state_synced = True

    def _sync_aggregator_state(self) -> None:
        """Give every rank rank 0's aggregator state (e.g. the generator of an unseeded ``random``)."""
        if self._aggregator_state_synced:
            return
        self._aggregator_state_synced = True
        state = self.aggregator.state_dict()
        if world_size() > 1 and state:
            holder = [state]
            dist.broadcast_object_list(holder, src=0)
            self.aggregator.load_state_dict(holder[0])


class _RankConsistencyCallback(TrainerCallback):
    """Compares parameter checksums across ranks after every optimizer step."""

    def on_step_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if model is not None:
            check_rank_consistency(_unwrap_ddp(model).parameters(), step=state.global_step)


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper: the JD pass must not go through DDP's reducer."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def freeze_batch_norm(module: nn.Module) -> None:
    """Put every batch-norm layer in eval mode: it normalises with (and no longer updates) its running statistics."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()
