"""Every private (or merely undocumented) ``Trainer`` / Accelerate internal that ``hf_jd.trainer`` relies on.

``JDTrainerMixin`` wraps the stock ``Trainer.training_step`` instead of replacing it, so it depends on a
handful of things ``transformers`` and ``accelerate`` do not promise to keep: an attribute set by the
training loop, the name of an overridable hook, the way the step calls ``accelerator.backward``. Each one
is reached through one small function of this module, whose docstring names the versions it was checked
against; nothing else in ``hf_jd/trainer`` touches them.

Checked against transformers 5.24 (the tested minimum, ``constraints/minimum.txt``) and 5.25, and
accelerate 1.6 (minimum) and 1.16: ``Trainer.training_step`` is the same code in 5.24 and 5.25.

:data:`TRAINING_STEP_USES` and :data:`COMPUTE_LOSS_USES` classify every name the stock
``Trainer.training_step`` and ``Trainer.compute_loss`` use (:func:`names_used`, parsed with ``ast``):
*served* (it runs, because the mixin calls ``super().training_step``), *refused* (the setup that would
make it matter is refused at construction, by the named guard), or *irrelevant* (what it decides does not
reach a JD update). ``tests/trainer/test_compat.py`` parses the installed ``Trainer`` and fails, naming
the name, when a new release uses one that is in neither table: new stock behaviour the mixin neither
serves nor refuses.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import enum
import inspect
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor

# ---------------------------------------------------------------------------------------------- the tables


class Handling(enum.Enum):
    """What the mixin does with one piece of stock behaviour."""

    SERVED = "served"  # it runs: the mixin calls super().training_step (or reads it through this module)
    REFUSED = "refused"  # the setup that makes it matter is refused when the trainer is built
    IRRELEVANT = "irrelevant"  # what it decides does not reach the JD update


_SERVED, _REFUSED, _IRRELEVANT = Handling.SERVED, Handling.REFUSED, Handling.IRRELEVANT
_CP = "refuse_unservable_setups (context, sequence or tensor parallelism)"

#: Every name ``Trainer.training_step`` uses (see :func:`names_used`): how the mixin handles it, and why.
TRAINING_STEP_USES: dict[str, tuple[Handling, str]] = {
    "self._prepare_context_parallel_inputs": (
        _SERVED,
        f"runs in super(); it is a no-op context unless context parallelism is on, which {_CP} refuses",
    ),
    "model.train": (_SERVED, "runs in super()"),
    "self.optimizer": (_SERVED, "runs in super() (optimizer.train() of schedule-free optimizers)"),
    "self.optimizer.train": (_SERVED, "runs in super()"),
    "self._prepare_inputs": (_SERVED, "runs in super(); the JD forward receives the prepared inputs"),
    "is_sagemaker_mp_enabled": (_REFUSED, "refuse_unservable_setups (SageMaker model parallelism)"),
    "smp_forward_backward": (_REFUSED, "refuse_unservable_setups (SageMaker model parallelism)"),
    "self.args.gradient_accumulation_steps": (_REFUSED, "read on the SageMaker branch only"),
    "self.args.device": (_REFUSED, "read on the SageMaker branch only"),
    "self.compute_loss_context_manager": (
        _SERVED,
        "the first JD forward runs inside super()'s; a re-run forward re-enters it (compute_loss_context)",
    ),
    "self.compute_loss": (_SERVED, "replaced for the step by the JD forward (patched_attribute)"),
    "self.args.torch_empty_cache_steps": (_SERVED, "runs in super()"),
    "self.state.global_step": (_SERVED, "runs in super()"),
    "clear_device_cache": (_SERVED, "runs in super()"),
    "torch.backends.mps.is_available": (_SERVED, "runs in super()"),
    "torch.mps": (_SERVED, "runs in super()"),
    "torch.mps.clear_graph_cache": (_SERVED, "runs in super()"),
    "self.args.optim": (_REFUSED, "refuse_unservable_setups (LOMO / AdaLomo step inside backward)"),
    "OptimizerNames.LOMO": (_REFUSED, "refuse_unservable_setups"),
    "OptimizerNames.ADALOMO": (_REFUSED, "refuse_unservable_setups"),
    "self._get_learning_rate": (_REFUSED, "LOMO / AdaLomo only (refuse_unservable_setups)"),
    "self.args.n_gpu": (_REFUSED, "JDTrainerMixin.__init__ refuses DataParallel (n_gpu > 1)"),
    "self.loss_is_scaled_for_ga": (
        _IRRELEVANT,
        "decides the scale of the scalar super() back-propagates; the JD update is scaled by "
        "1 / current_gradient_accumulation_steps whatever it says",
    ),
    "self.model_accepts_loss_kwargs": (_IRRELEVANT, "same: the scale of the ignored scalar"),
    "self.compute_loss_func": (
        _IRRELEVANT,
        "same; a compute_loss_func without compute_losses_func is refused by JDTrainerMixin.__init__",
    ),
    "self.current_gradient_accumulation_steps": (_SERVED, "read by current_gradient_accumulation_steps"),
    "self.accelerator.distributed_type": (
        _SERVED,
        "under DeepSpeed the stock step passes scale_wrt_gas=False to accelerator.backward: the DeepSpeed "
        "backend's backward of the JD update passes the same keywords (DeepSpeedBackend.bind_backward)",
    ),
    "DistributedType.DEEPSPEED": (_SERVED, "same"),
    "self.accelerator.backward": (_SERVED, "intercepted for the step: it runs the JD update instead"),
}

#: Every name the stock ``Trainer.compute_loss`` uses. The JD forward of a trainer whose parent keeps the
#: stock ``compute_loss`` calls ``model(**inputs)`` instead (see ``parent_compute_loss``): what it skips.
COMPUTE_LOSS_USES: dict[str, tuple[Handling, str]] = {
    "self.accelerator": (
        _REFUSED,
        f"its parallelism_config: DeepSpeed sequence parallelism ({_CP} sequence parallelism)",
    ),
    "self.model.training": (_IRRELEVANT, "read for DeepSpeed sequence parallelism only"),
    "deepspeed_sp_compute_loss": (_REFUSED, f"DeepSpeed sequence parallelism: {_CP} sequence parallelism"),
    "self.label_smoother": (
        _IRRELEVANT,
        "label_smoothing_factor is applied per example by hf_jd.losses (per_example_losses)",
    ),
    "self.compute_loss_func": (
        _REFUSED,
        "a scalar compute_loss_func cannot drive JD: JDTrainerMixin.__init__ asks for compute_losses_func",
    ),
    "inputs.pop": (_IRRELEVANT, "the labels popped for the two cases above"),
    "self.model_accepts_loss_kwargs": (
        _IRRELEVANT,
        "num_items_in_batch normalises the model's scalar loss; per-example losses are self-normalised",
    ),
    "logger.warning": (_IRRELEVANT, "a warning of the compute_loss_func branch"),
    "self.accelerator.unwrap_model": (_IRRELEVANT, "label smoothing branch (the model's name)"),
    "_is_peft_model": (_IRRELEVANT, "label smoothing branch"),
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values": (_IRRELEVANT, "label smoothing branch"),
    "inputs.keys": (_IRRELEVANT, "same"),
    "self.args.average_tokens_across_devices": (
        _IRRELEVANT,
        "rescales the scalar loss normalised by num_items_in_batch; per-example losses are not",
    ),
    "self.accelerator.num_processes": (_IRRELEVANT, "same"),
    "self.get_tp_size": (_REFUSED, f"{_CP}"),
    "self.args.n_gpu": (_REFUSED, "JDTrainerMixin.__init__ refuses DataParallel (n_gpu > 1)"),
}


def names_used(function: Callable[..., Any]) -> set[str]:
    """The dotted names ``function``'s source uses: attribute chains on ``self`` and on its parameters,
    and the globals it reads (``clear_device_cache``, ``torch.mps.clear_graph_cache``), builtins excepted.

    Each chain is taken whole (``self.accelerator.backward``, not ``self.accelerator``); names bound inside
    the function (``loss``, ``kwargs``) are left out unless they are parameters.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    definition = tree.body[0]
    if not isinstance(definition, ast.FunctionDef | ast.AsyncFunctionDef):
        raise TypeError(f"{function!r} is not a function")
    parameters = {arg.arg for arg in (*definition.args.posonlyargs, *definition.args.args)}
    parameters |= {arg.arg for arg in definition.args.kwonlyargs}
    body = [node for statement in definition.body for node in ast.walk(statement)]  # no annotations
    local = {node.id for node in body if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
    local -= parameters
    inner = {id(node.value) for node in body if isinstance(node, ast.Attribute)}
    names: set[str] = set()
    for node in body:
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            chain = _dotted(node)
            if chain is not None and chain.split(".")[0] not in local:
                names.add(chain)
        elif isinstance(node, ast.Name) and id(node) not in inner and isinstance(node.ctx, ast.Load):
            known = node.id in local or node.id in parameters or hasattr(builtins, node.id)
            if not known:
                names.add(node.id)
    return names


def _dotted(node: ast.expr) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None  # a chain on a call's result or a subscript: its root is listed on its own
    return ".".join([node.id, *reversed(parts)])


# ----------------------------------------------------------------------------------- Trainer internals
#: The ``Trainer`` attributes this module reads or overrides (``tests/trainer/test_compat.py`` checks that a
#: trained ``Trainer`` instance has each of them).
TRAINER_INTERNALS = (
    "current_gradient_accumulation_steps",
    "compute_loss_context_manager",
    "compute_loss",
    "_save_optimizer_and_scheduler",
    "_load_optimizer_and_scheduler",
)
#: The ``Accelerator`` attributes this module reads or intercepts.
ACCELERATOR_INTERNALS = ("backward", "scaler", "sync_gradients", "state")
#: Stock hooks the mixin overrides, and the ``Trainer`` method that must keep calling each of them.
OVERRIDDEN_HOOKS = {
    "_save_optimizer_and_scheduler": "_save_checkpoint",
    "_load_optimizer_and_scheduler": "_prepare_for_training",
}


def current_gradient_accumulation_steps(trainer: Any) -> int:
    """How many micro-batches the current optimizer step accumulates (fewer on an epoch's last window).

    ``Trainer._run_epoch`` sets ``self.current_gradient_accumulation_steps`` before each window
    of micro-batches (checked: transformers 5.24, 5.25); the stock step divides its loss by it.
    """
    return int(trainer.current_gradient_accumulation_steps)


def compute_loss_context(trainer: Any) -> contextlib.AbstractContextManager[Any]:
    """The context the stock step runs ``compute_loss`` in (autocast under mixed precision):
    ``Trainer.compute_loss_context_manager()`` (checked: transformers 5.24, 5.25)."""
    return trainer.compute_loss_context_manager()


def is_stock_compute_loss(function: Callable[..., Any]) -> bool:
    """Whether ``function`` is ``transformers.Trainer.compute_loss`` itself (not an override)."""
    from transformers import Trainer

    return function is Trainer.compute_loss


def fsdp_plugin_version(accelerator: Any) -> int | None:
    """The FSDP version of accelerate's FSDP plugin, ``None`` without FSDP.

    ``AcceleratorState.fsdp_plugin`` is set only when FSDP is configured (checked: accelerate 1.6, 1.16);
    a plugin without ``fsdp_version`` predates FSDP2 and is version 1.
    """
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if plugin is None:
        return None
    return int(getattr(plugin, "fsdp_version", 1) or 1)


def deepspeed_zero_stage(accelerator: Any) -> tuple[bool, int | None]:
    """Whether accelerate runs DeepSpeed, and the ZeRO stage its plugin states (``None`` when it does not).

    ``AcceleratorState.deepspeed_plugin`` is set only when DeepSpeed is configured (what
    ``Trainer.is_deepspeed_enabled`` reads; checked: accelerate 1.6, 1.16, transformers 5.24, 5.25).
    """
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is None:
        return False, None
    stage = getattr(plugin, "zero_stage", None)
    return True, int(stage) if stage is not None else None


# ------------------------------------------------------------------------------- Accelerator internals
def grad_scaler(accelerator: Any) -> Any:
    """The fp16 ``GradScaler``, or ``None``: ``Accelerator.scaler`` (checked: accelerate 1.6, 1.16)."""
    return accelerator.scaler


def grad_scale(accelerator: Any) -> float:
    """The current fp16 loss scale (1 without an enabled scaler)."""
    scaler = grad_scaler(accelerator)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


def syncs_gradients(accelerator: Any) -> bool:
    """Whether this micro-batch ends an optimizer step (the gradients are synchronised and stepped on):
    ``Accelerator.sync_gradients`` (checked: accelerate 1.6, 1.16)."""
    return bool(accelerator.sync_gradients)


@contextlib.contextmanager
def patched_attribute(owner: Any, name: str, value: Any) -> Iterator[Any]:
    """``owner.<name>`` is ``value`` inside the block (an instance attribute shadowing the class's method);
    the previous state is restored on exit, whatever happens. Yields what ``owner.<name>`` was before."""
    before = getattr(owner, name)
    had_own = name in vars(owner)
    own = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield before
    finally:
        if had_own:
            setattr(owner, name, own)
        else:
            delattr(owner, name)


def intercepted_backward(
    accelerator: Any, replacement: Callable[..., None]
) -> contextlib.AbstractContextManager[Callable[..., None]]:
    """Inside the block ``accelerator.backward(loss, **kwargs)`` calls ``replacement(loss, **kwargs)``.

    The stock step calls ``self.accelerator.backward(loss, **kwargs)`` once, after ``compute_loss`` and
    outside ``compute_loss_context_manager`` (checked: transformers 5.24, 5.25; ``Accelerator.backward``:
    accelerate 1.6, 1.16). Yields the real ``backward`` (for the ``--scalarizer`` step's one backward).
    """
    return patched_attribute(accelerator, "backward", replacement)


def real_backward(backward: Callable[..., None], loss: Tensor) -> None:
    """One ordinary ``accelerator.backward(loss)`` (fp16 loss scaling, DDP's reducer)."""
    backward(loss)


# ---------------------------------------------------------------------------------------------- refusals
def refuse_unservable_setups(trainer: Any) -> None:
    """Refuse, when the trainer is built, the stock setups whose step the mixin cannot wrap.

    * SageMaker model parallelism: ``training_step`` runs ``smp_forward_backward`` (its own forward and
      backward) instead of ``compute_loss`` and ``accelerator.backward``;
    * LOMO / AdaLomo (``optim="lomo"`` / ``"adalomo"``): the optimizer updates the parameters inside
      ``accelerator.backward``, from the gradient of the scalar loss;
    * layer-wise optimizers (``optim="*_layerwise"``, GaLore / APOLLO): they step in hooks that fire when
      autograd accumulates ``.grad``, which the JD update writes directly;
    * accelerate's context, sequence or tensor parallelism (``ParallelismConfig``; accelerate >= 1.10):
      each rank would hold a shard of every example's sequence or of the layers' weights, so the
      per-example losses and the Gramian would be partial.
    """
    from transformers.training_args import OptimizerNames
    from transformers.utils import is_sagemaker_mp_enabled

    if is_sagemaker_mp_enabled():
        raise ValueError(
            "hf_jd does not support SageMaker model parallelism: its training step runs its own forward and "
            "backward, so there is no loss vector to aggregate. Use DDP or FSDP2."
        )
    optim = str(getattr(trainer.args.optim, "value", trainer.args.optim))
    if optim in (OptimizerNames.LOMO.value, OptimizerNames.ADALOMO.value) or optim.endswith("layerwise"):
        raise ValueError(
            f"optim={optim!r} updates the parameters during the backward pass of a scalar loss, but Jacobian "
            "descent writes its aggregated update into .grad: the optimizer would never see it. Use an "
            "optimizer that steps on .grad (e.g. adamw_torch, sgd, or the non-layerwise variant)."
        )
    config = getattr(trainer.accelerator, "parallelism_config", None)
    for kind in ("cp", "sp", "tp"):
        if config is not None and getattr(config, f"{kind}_enabled", False):
            name = {"cp": "context", "sp": "sequence", "tp": "tensor"}[kind]
            raise ValueError(
                f"hf_jd does not support {name} parallelism ({kind}_size > 1 in accelerate's parallelism_config): "
                "every rank would hold part of each example's computation, so the per-example losses and their "
                "Gramian would be partial. Use data parallelism (DDP) or FSDP2 sharding (dp_shard_size)."
            )
