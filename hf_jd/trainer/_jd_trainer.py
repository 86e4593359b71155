"""``JDTrainer``: the Hugging Face ``Trainer`` with a Jacobian-descent ``training_step``.

Only ``training_step`` changes: the loss vector (one loss per example or per task) goes through a JD
backend (explicit Jacobian or Gramian engine), the aggregator turns it into the update written to
``.grad``, and the stock optimizer step, scheduler, clipping, logging and checkpointing follow.
"""

from __future__ import annotations

import logging
import os
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
    global_gramian,
    local_slice,
    world_size,
)
from ..losses import infer_loss_type, per_example_losses, task_losses
from ..training_args import JDTrainingArguments
from ._jacobian_backend import JacobianBackend
from ._metrics import MetricsAccumulator, step_metrics

logger = logging.getLogger(__name__)

AGGREGATOR_STATE_NAME = "jd_aggregator.pt"
LossesFunc = Callable[[Any, dict[str, Any]], Tensor]


class JDTrainer(Trainer):
    """Trainer that minimises a *vector* of losses by Jacobian descent.

    Args:
        compute_losses_func: Optional ``(outputs, inputs) -> Tensor[m]`` returning the loss vector
            from the model outputs (one loss per example, or per task). Without it, per-example losses
            are derived from the outputs (see ``JDTrainingArguments.jd_loss_type``) and per-task losses
            are read from ``outputs.losses`` / ``outputs.loss`` (a dict, tuple or 1-D tensor).
        All other arguments are those of :class:`transformers.Trainer`; ``args`` must be a
        :class:`hf_jd.JDTrainingArguments`.

    Override :meth:`compute_losses` for full control. ``compute_loss`` stays scalar (it is used by
    evaluation and ``prediction_step``).
    """

    def __init__(self, *args: Any, compute_losses_func: LossesFunc | None = None, **kwargs: Any) -> None:
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
        self.aggregator: Aggregator = self.args.build_aggregator()
        self._jd_backend: Any = None
        self._jd_metrics = MetricsAccumulator()
        self._aggregator_state_synced = False
        if self.args.torch_compile:
            # Compiled graphs donate their saved buffers to the first backward; the JD pass back-propagates
            # several rows through one graph (rows are then computed one by one, see _make_backend).
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
        if self.args.jd_objectives == "per_task":
            return task_losses(outputs)[0]
        return per_example_losses(
            outputs, inputs, self._loss_type(model), label_smoothing=self.args.label_smoothing_factor
        )

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
        (per-example objectives are self-normalised, so ``num_items_in_batch`` is not used).
        """
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        module = _unwrap_ddp(model)
        self._sync_aggregator_state()
        backend = self._backend(module)
        try:
            with backend.capture(), self.compute_loss_context_manager():
                losses = self.compute_losses(module, inputs)
            losses = self._check_loss_vector(losses)
        except BaseException:
            backend.release()
            raise
        del inputs
        scale = 1.0 / self.current_gradient_accumulation_steps
        grad_scale = self._grad_scale()
        if any_across_ranks(not bool(torch.isfinite(losses.detach()).all()), losses.device):
            backend.release()
            return self._non_finite_step(module, losses, scale)
        jd_losses = losses * grad_scale if grad_scale != 1.0 else losses
        gramian, weights = self._jd_update(backend, jd_losses, scale)
        if self._is_logging_step() and gramian is not None:
            self._jd_metrics.add(step_metrics(gramian, weights, losses, grad_scale))
        if self.accelerator.sync_gradients:
            self._synchronise_gradients(backend)
        return losses.detach().mean() * scale

    def _jd_update(self, backend: Any, losses: Tensor, scale: float) -> tuple[Tensor | None, Tensor | None]:
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
                backend.release()
                raise ValueError(
                    f"aggregator={self.args.aggregator!r} needs the explicit global Jacobian, which "
                    "jd_scope='global' never gathers for per-example objectives. Use jd_scope='local' or a "
                    "Gramian-weighted aggregator (e.g. 'upgrad')."
                )
            matrix = backend.aggregate(self.aggregator, scale)
            return (matrix @ matrix.T if self._is_logging_step() else None), None
        if distributed_global and not per_task:
            gramian, sizes = global_gramian(backend.shared_rows(), backend.gramian_dtype)
            weights = self.aggregator.gramian_weighting(gramian)
            backend.accumulate_grad(weights[local_slice(sizes)], scale)
            return gramian, weights
        gramian = backend.gramian(losses)
        weights = self.aggregator.gramian_weighting(gramian)
        backend.accumulate_grad(weights, scale)
        return gramian, weights

    def _synchronise_gradients(self, backend: Any) -> None:
        """Once per optimizer step: the all-reduce that DDP would have done, matching the JD scope."""
        if world_size() == 1:
            return
        if self.args.jd_scope == "local":
            all_reduce_grads_(backend.params, op="mean")
        elif self.args.jd_objectives == "per_example":
            all_reduce_grads_(backend.params, op="sum")  # Σ_r J_rᵀ w_r = Jᵀ w
        # per-task global: J was already averaged over ranks, every rank holds the same .grad.

    def _non_finite_step(self, module: nn.Module, losses: Tensor, scale: float) -> Tensor:
        """NaN/inf losses: with an fp16 scaler, poison ``.grad`` so the scaler skips the step; else raise."""
        if self.accelerator.scaler is not None:
            for param in (p for p in module.parameters() if p.requires_grad):
                param.grad = torch.full_like(param, float("nan"))
            return losses.detach().mean() * scale
        bad = torch.nonzero(~torch.isfinite(losses.detach())).flatten().tolist()
        where = f"indices {bad} of this rank's loss vector" if bad else "another rank's loss vector"
        raise FloatingPointError(
            f"Non-finite loss at global step {self.state.global_step} ({where}; values "
            f"{losses.detach()[bad].tolist() if bad else 'n/a'}). No update was written, parameters are "
            "unchanged. Check the inputs of these examples, lower the learning rate, or resume from the last "
            "checkpoint."
        )

    def _check_loss_vector(self, losses: Any) -> Tensor:
        if not isinstance(losses, Tensor):
            raise TypeError(
                f"compute_losses must return a torch.Tensor of shape [m], got {type(losses).__name__}."
            )
        if losses.dim() == 0:
            raise ValueError(
                "compute_losses returned a scalar loss, but Jacobian descent needs a loss vector: one loss per "
                "example (compute it with reduction='none', e.g. F.cross_entropy(logits, labels, "
                "reduction='none')) or one per task (return a dict/tuple of task losses with "
                "jd_objectives='per_task')."
            )
        if losses.dim() != 1:
            raise ValueError(
                f"compute_losses must return a 1-D loss vector of shape [m], got shape {tuple(losses.shape)}. "
                "Reduce the other dimensions per example (e.g. .mean(dim=1))."
            )
        if losses.numel() == 0:
            raise ValueError(
                "The batch is empty: compute_losses returned no loss. Check the dataset and collator."
            )
        if not losses.requires_grad:
            raise ValueError(
                "The loss vector does not require grad: it is not connected to any trainable parameter."
            )
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
        if self._jd_backend is None:
            self._jd_backend = self._make_backend(module)
            logger.info("JDTrainer uses the %s engine with %r.", self._jd_backend.name, self.aggregator)
        return self._jd_backend

    def _make_backend(self, module: nn.Module) -> Any:
        args = self.args
        per_task = args.jd_objectives == "per_task"
        chunk = 1 if args.torch_compile else args.jd_parallel_chunk_size
        wants_gramian = args.jd_engine in ("auto", "gramian")
        gramian_ok = isinstance(self.aggregator, GramianWeightedAggregator)
        if wants_gramian and gramian_ok and world_size() > 1 and args.jd_scope == "global":
            if args.jd_engine == "gramian":
                raise ValueError(
                    "jd_engine='gramian' computes each process's Gramian locally; with several processes and "
                    "jd_scope='global' use jd_engine='auto' or 'jacobian', or set jd_scope='local'."
                )
            wants_gramian = False
        if wants_gramian and gramian_ok:
            from ..gramian import GramianEngine, GramianEngineError

            engine = GramianEngine(module, objectives=args.jd_objectives)
            try:
                engine.check_supported()
                return engine
            except GramianEngineError as error:
                if args.jd_engine == "gramian":
                    raise
                logger.warning("Gramian engine unavailable (%s); using the explicit Jacobian engine.", error)
        return JacobianBackend(module, per_task=per_task, parallel_chunk_size=chunk)

    # ------------------------------------------------------------------ logging & checkpoints
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._jd_metrics and "loss" in logs:
            logs = {**logs, **self._jd_metrics.pop()}
        super().log(logs, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        state = self.aggregator.state_dict()
        if state and self.args.should_save:
            torch.save(state, os.path.join(output_dir, AGGREGATOR_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, AGGREGATOR_STATE_NAME)
        if os.path.isfile(path):
            self.aggregator.load_state_dict(torch.load(path, weights_only=False))
            self._aggregator_state_synced = True
        elif self.aggregator.state_dict():
            raise FileNotFoundError(
                f"{checkpoint} has no {AGGREGATOR_STATE_NAME}, but aggregator {self.args.aggregator!r} is "
                "stateful: resuming would not continue the same trajectory."
            )

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
