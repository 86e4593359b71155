"""Static checks: models the Gramian engine cannot handle exactly."""

from __future__ import annotations

import functools

from torch import nn

from ._errors import GramianEngineError
from ._torch_ops import BATCH_NORM

_ADVICE = "Use jd_engine='jacobian' (the explicit-Jacobian engine makes no assumption about the model)"


def check_model(model: nn.Module, per_task: bool) -> None:
    """Raise :class:`GramianEngineError` for models whose structure breaks the engine's assumptions."""
    if hasattr(model, "_orig_mod") or type(model).__name__ == "OptimizedModule":
        raise GramianEngineError(
            "The model is compiled with torch.compile: the Gramian engine needs module hooks and per-module "
            f"recomputation, which compiled graphs do not support. {_ADVICE}, or train without torch_compile."
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise GramianEngineError("The model has no trainable parameter (requires_grad=True).")
    for name, module in model.named_modules():
        if not per_task and isinstance(module, BATCH_NORM):
            uses_batch_stats = (
                module.training or not module.track_running_stats or module.running_mean is None
            )
            if uses_batch_stats:
                raise GramianEngineError(
                    f"{name or 'model'} ({type(module).__name__}) normalises with batch statistics, which mixes the "
                    "examples of a batch: the loss of one example then depends on the others, so per-example "
                    f"gradients are not what the engine computes. {_ADVICE}, or set jd_freeze_batch_norm=True "
                    "(JDTrainer then normalises with the running statistics and keeps them fixed; outside "
                    "JDTrainer, put the batch-norm layers in eval mode after model.train()), or replace them "
                    "by GroupNorm / LayerNorm."
                )
    reentrant = reentrant_checkpointing_module(model)
    if reentrant is not None:
        raise GramianEngineError(REENTRANT_ADVICE.format(name=reentrant))


#: One piece of advice that works for both engines: neither can differentiate a reentrant checkpoint
#: with ``torch.autograd.grad`` (PyTorch refuses it), the non-reentrant implementation can.
REENTRANT_ADVICE = (
    "{name} uses reentrant activation checkpointing (use_reentrant=True). Jacobian descent back-propagates "
    "with torch.autograd.grad, which PyTorch refuses through reentrant checkpoints, whichever the JD engine. "
    "Use the non-reentrant implementation (same memory savings, same values): "
    "gradient_checkpointing_kwargs={{'use_reentrant': False}} in the training arguments (the default of "
    "transformers), or model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{'use_reentrant': "
    "False}})."
)


def reentrant_checkpointing_module(model: nn.Module) -> str | None:
    """Name of the first submodule with reentrant activation checkpointing enabled, else ``None``."""
    for name, module in model.named_modules():
        checkpoint = getattr(module, "_gradient_checkpointing_func", None)
        if getattr(module, "gradient_checkpointing", False) and _is_reentrant(checkpoint):
            return name or "model"
    return None


def _is_reentrant(checkpoint: object) -> bool:
    if isinstance(checkpoint, functools.partial):
        return bool(checkpoint.keywords.get("use_reentrant", False))
    return False
