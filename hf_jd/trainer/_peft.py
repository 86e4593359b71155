"""``JDTrainer(peft_config=...)``: wrap the model in PEFT adapters before the Trainer sees it (as TRL does).

With adapters, only the adapter parameters (and any ``modules_to_save``) require gradients, so the
Jacobian has one column per *adapter* parameter: JD aggregates the per-example (or per-task) gradients of
the adapters, and the frozen base model gets no update. PEFT is an optional dependency
(``pip install peft`` or ``pip install 'hf-jd[peft]'``).
"""

from __future__ import annotations

from typing import Any

PEFT_MISSING = (
    "JDTrainer(peft_config=...) needs the PEFT library, which is not installed. Install it with "
    "`pip install peft` (or `pip install 'hf-jd[peft]'`), or train without peft_config."
)


def import_peft() -> Any:
    """The ``peft`` module, or an ``ImportError`` saying how to install it."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(PEFT_MISSING) from error
    return peft


def wrap_with_peft(model: Any, peft_config: Any, gradient_checkpointing: bool = False) -> Any:
    """``get_peft_model(model, peft_config)``; the frozen base then needs inputs that require grad for
    gradient checkpointing (``enable_input_require_grads``), as in TRL's trainers."""
    peft = import_peft()
    if model is None:
        raise ValueError("peft_config needs a model: pass model=... to JDTrainer.")
    if isinstance(model, peft.PeftModel):
        raise ValueError(
            "The model is already a PeftModel; pass it without peft_config (or pass the base model with peft_config)."
        )
    if not isinstance(peft_config, peft.PeftConfig):
        raise TypeError(
            f"peft_config must be a peft.PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}."
        )
    if gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return peft.get_peft_model(model, peft_config)


def apply_peft_config(
    args: tuple[Any, ...], kwargs: dict[str, Any], peft_config: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The Trainer's ``(args, kwargs)`` with the model (``model=`` or first positional) wrapped by PEFT."""
    if peft_config is None:
        return args, kwargs
    training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
    checkpointing = bool(getattr(training_args, "gradient_checkpointing", False))
    if "model" in kwargs or not args:
        kwargs = {**kwargs, "model": wrap_with_peft(kwargs.get("model"), peft_config, checkpointing)}
        return args, kwargs
    return (wrap_with_peft(args[0], peft_config, checkpointing), *args[1:]), kwargs
