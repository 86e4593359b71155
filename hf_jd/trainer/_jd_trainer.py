"""``JDTrainer``: the Hugging Face ``Trainer`` with a Jacobian-descent ``training_step``.

Only ``training_step`` changes: the loss vector (one loss per example or per task) goes through a JD
backend (explicit Jacobian or Gramian engine), the aggregator turns it into the update written to
``.grad``, and the stock optimizer step, scheduler, clipping, logging and checkpointing follow.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from ..aggregation import Aggregator, GramianWeightedAggregator
from ..distributed import (
    all_reduce_grads_,
    all_reduce_tensors_,
    any_across_ranks,
    check_rank_consistency,
    local_slice,
    world_size,
)
from ..gramian import GramianMismatchError, default_rows, infer_batch_size, loss_count_mismatch
from ..losses import infer_loss_type, per_example_losses, task_losses
from ..training_args import JDTrainingArguments
from ._checkpoint import load_aggregator_state, save_aggregator_state
from ._engine_choice import EngineChoice, build_engine, engine_choices
from ._guards import check_fixed_rows, check_per_task_model, check_reentrant_checkpointing, check_sharding
from ._metrics import MetricsAccumulator, step_metrics
from ._model_card import JDModelCardMixin
from ._peft import apply_peft_config
from ._retry import MicroBatchSnapshot

logger = logging.getLogger(__name__)

LossesFunc = Callable[[Any, dict[str, Any]], Tensor]


class JDInputError(ValueError):
    """The loss vector or the batch is not what Jacobian descent needs (never retried with another engine)."""


class _NonFiniteUpdate(Exception):
    """Finite losses but a non-finite Jacobian, Gramian or weights: nothing may reach the parameters."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class _GramianOverflow(Exception):
    """The float32 Gramian overflowed on a finite loss vector: rerun the micro-batch in float64."""


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
        check_per_task_model(
            self.model,
            self.args,
            custom_losses=compute_losses_func is not None
            or type(self).compute_losses is not JDTrainer.compute_losses,
        )
        check_reentrant_checkpointing(self.model)
        self._engine_choices: list[EngineChoice] = engine_choices(self.args, self.aggregator, world_size())
        self._engine_index = 0
        self._jd_backend: Any = None
        self._engine_confirmed = False
        self._last_verified_step = -1
        self._jd_metrics = MetricsAccumulator()
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
                return task_losses(outputs)[0]
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
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        module = _unwrap_ddp(model)
        if self.args.jd_freeze_batch_norm:
            freeze_batch_norm(module)
        inputs = self._prepare_inputs(inputs)
        self._sync_aggregator_state()
        scale = 1.0 / self.current_gradient_accumulation_steps
        verify = self._verification_due()
        losses_finite: bool | None = None
        gramian_dtype: torch.dtype | None = None
        backend = self._backend(module)
        # Taken before the first attempt: a rerun starts from the same random state (and, when the attempt
        # may fail after writing, the same gradients).
        on_trial = backend.name == "gramian" and verify  # verify is always due before the first success
        # Only the Gramian engine ever re-runs a micro-batch (fallback, float64 Gramian on overflow).
        snapshot = (
            MicroBatchSnapshot.take(backend.params, grads=on_trial) if backend.name == "gramian" else None
        )
        while True:
            backend = self._backend(module)
            try:
                losses = self._capture_losses(module, backend, inputs)
                if losses_finite is None:  # one decision for all attempts (same inputs, same random state)
                    losses_finite = not any_across_ranks(
                        not bool(torch.isfinite(losses.detach()).all()), losses.device
                    )
                if not losses_finite:
                    backend.release()
                    return self._skip_or_raise(module, losses, scale, self._non_finite_loss_message(losses))
                self._jd_step(backend, losses, scale, verify and backend.name == "gramian", gramian_dtype)
            except _GramianOverflow:
                if snapshot is None:  # raised for the Gramian engine only, which always has a snapshot
                    raise
                snapshot.restore()
                gramian_dtype = torch.float64
                continue
            except _NonFiniteUpdate as error:
                return self._skip_or_raise(
                    module,
                    losses,
                    scale,
                    f"Non-finite values in {error.what} at global step {self.state.global_step} although the "
                    "losses are finite (a gradient overflowed, or the model produced inf/NaN in its backward). "
                    "No update was written, parameters are unchanged. Lower the learning rate, check the model "
                    "for numerically unstable operations, or resume from the last checkpoint.",
                )
            except (JDInputError, FloatingPointError):
                raise
            except Exception as error:
                if snapshot is None or not (on_trial and backend.name == "gramian"):
                    raise
                if not self._fall_back(error, rerun=True):
                    raise
                snapshot.restore()
                continue
            self._engine_confirmed = True
            if self.accelerator.sync_gradients:
                self._synchronise_gradients(backend)
                self._check_written_gradients(backend)
            return losses.detach().mean() * scale

    def _capture_losses(self, module: nn.Module, backend: Any, inputs: dict[str, Any]) -> Tensor:
        """Forward under the engine's capture; returns the checked loss vector."""
        try:
            with backend.capture(), self.compute_loss_context_manager():
                losses = self.compute_losses(module, inputs)
            return self._check_loss_vector(losses, inputs)
        except BaseException:
            backend.release()
            raise

    def _jd_step(
        self, backend: Any, losses: Tensor, scale: float, verify: bool, gramian_dtype: torch.dtype | None
    ) -> None:
        """Gramian (or Jacobian) → weights → ``scale · Jᵀw`` into ``.grad``, each checked for finiteness."""
        grad_scale = self._grad_scale()
        jd_losses = losses * grad_scale if grad_scale != 1.0 else losses
        try:
            gramian, weights = self._jd_update(backend, jd_losses, scale, verify, gramian_dtype)
        except BaseException:
            backend.release()
            raise
        if self._is_logging_step() and gramian is not None:
            self._jd_metrics.add(step_metrics(gramian, weights, losses, grad_scale))

    def _jd_update(
        self, backend: Any, losses: Tensor, scale: float, verify: bool, gramian_dtype: torch.dtype | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Compute the JD update of ``losses`` into ``.grad``; return ``(G, w)`` for the metrics."""
        distributed_global = world_size() > 1 and self.args.jd_scope == "global"
        per_task = self.args.jd_objectives == "per_task"
        if backend.name == "jacobian":
            backend.compute(losses)
            if distributed_global and per_task:
                # Global task losses are the mean over ranks: J = mean_r J_r, identical on all ranks.
                all_reduce_tensors_(backend.jacobians, op="mean")
        if not isinstance(self.aggregator, GramianWeightedAggregator):
            if distributed_global and not per_task:
                raise ValueError(
                    f"aggregator={self.args.aggregator!r} needs the explicit global Jacobian, which "
                    "jd_scope='global' never gathers for per-example objectives. Use jd_scope='local' or a "
                    "Gramian-weighted aggregator (e.g. 'upgrad')."
                )
            if not backend.is_finite():
                raise _NonFiniteUpdate("the Jacobian")
            matrix = backend.aggregate(self.aggregator, scale)
            return (matrix @ matrix.T if self._is_logging_step() else None), None
        if distributed_global and not per_task:
            gramian, sizes = backend.global_gramian()
            weights = self._weights(gramian)
            backend.accumulate_grad(weights[local_slice(sizes)], scale)
            return gramian, weights
        if backend.name == "gramian":
            rows = default_rows(losses.numel()) if verify else ()
            gramian = backend.gramian(losses, verify_rows=rows, dtype=gramian_dtype)
        else:
            gramian = backend.gramian()
        weights = self._weights(gramian, can_rerun=backend.name == "gramian" and gramian_dtype is None)
        backend.accumulate_grad(weights, scale)
        return gramian, weights

    def _weights(self, gramian: Tensor, can_rerun: bool = False) -> Tensor:
        """The aggregator's weights for ``gramian``, after checking that the Gramian and the weights are finite.

        ``diag(G)_i = ‖∇L_i‖²`` is finite exactly when row ``i`` of ``J`` is (and its square did not
        overflow), so a finite Gramian certifies the Jacobian without reading it.
        """
        if not bool(torch.isfinite(gramian).all()):
            if can_rerun:
                raise _GramianOverflow()
            bad = torch.nonzero(~torch.isfinite(gramian.diagonal())).flatten().tolist()
            raise _NonFiniteUpdate(f"the gradients of rows {bad}" if bad else "the Gramian")
        weights = self.aggregator.gramian_weighting(gramian)
        if not bool(torch.isfinite(weights).all()):
            raise _NonFiniteUpdate(f"the weights of {self.aggregator!r}")
        return weights

    def _check_written_gradients(self, backend: Any) -> None:
        """Last line of defence, once per optimizer step: no non-finite ``.grad`` reaches the optimizer."""
        if self.accelerator.scaler is not None:
            return  # the fp16 scaler skips steps with non-finite gradients
        grads = [p.grad for p in backend.params if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
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
        self._jd_backend = None
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

    def _synchronise_gradients(self, backend: Any) -> None:
        """Once per optimizer step: the all-reduce that DDP would have done, matching the JD scope."""
        if world_size() == 1:
            return
        if self.args.jd_scope == "local":
            all_reduce_grads_(backend.params, op="mean")
        elif self.args.jd_objectives == "per_example":
            all_reduce_grads_(backend.params, op="sum")  # Σ_r J_rᵀ w_r = Jᵀ w
        # per-task global: J was already averaged over ranks, every rank holds the same .grad.

    def _non_finite_loss_message(self, losses: Tensor) -> str:
        bad = torch.nonzero(~torch.isfinite(losses.detach())).flatten().tolist()
        where = f"indices {bad} of this rank's loss vector" if bad else "another rank's loss vector"
        return (
            f"Non-finite loss at global step {self.state.global_step} ({where}; values "
            f"{losses.detach()[bad].tolist() if bad else 'n/a'}). No update was written, parameters are "
            "unchanged. Check the inputs of these examples, lower the learning rate, or resume from the last "
            "checkpoint."
        )

    def _check_loss_vector(self, losses: Any, inputs: dict[str, Any]) -> Tensor:
        if not isinstance(losses, Tensor):
            raise TypeError(
                f"compute_losses must return a torch.Tensor of shape [m], got {type(losses).__name__}."
            )
        if losses.dim() == 0:
            raise JDInputError(
                "compute_losses returned a scalar loss, but Jacobian descent needs a loss vector: one loss per "
                "example (compute it with reduction='none', e.g. F.cross_entropy(logits, labels, "
                "reduction='none')) or one per task (return a dict/tuple of task losses with "
                "jd_objectives='per_task')."
            )
        if losses.dim() != 1:
            raise JDInputError(
                f"compute_losses must return a 1-D loss vector of shape [m], got shape {tuple(losses.shape)}. "
                "Reduce the other dimensions per example (e.g. .mean(dim=1))."
            )
        if losses.numel() == 0:
            raise JDInputError(
                "The batch is empty: compute_losses returned no loss. Check the dataset and collator."
            )
        if not losses.requires_grad:
            raise JDInputError(
                "The loss vector does not require grad: it is not connected to any trainable parameter."
            )
        if self.args.jd_objectives == "per_example":
            batch = infer_batch_size((), inputs)
            if batch is not None and batch != losses.numel():
                raise JDInputError(loss_count_mismatch(batch, losses.numel()))
        return losses

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

    # ------------------------------------------------------------------ backend
    def _backend(self, module: nn.Module) -> Any:
        """The current engine, built on first use; a candidate that cannot serve the model is skipped."""
        while self._jd_backend is None:
            choice = self._engine_choices[self._engine_index]
            try:
                self._jd_backend = build_engine(choice, module, self.args)
            except Exception as error:
                if not self._fall_back(error, rerun=False):
                    raise
            else:
                logger.info("JDTrainer uses %s with %r.", choice, self.aggregator)
        return self._jd_backend

    # ------------------------------------------------------------------ logging & checkpoints
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._jd_metrics and "loss" in logs:
            logs = {**logs, **self._jd_metrics.pop()}
        super().log(logs, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_aggregator_state(
                output_dir, self.aggregator, self.args.aggregator, self.args.aggregator_kwargs or {}
            )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if load_aggregator_state(
            checkpoint, self.aggregator, self.args.aggregator, self.args.aggregator_kwargs or {}
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
