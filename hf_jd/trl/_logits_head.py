r"""TRL's fused LM head, stood in for by the model's ordinary logits during a Jacobian-descent step.

TRL (1.16) patches the causal LM's ``forward`` (``trl.trainer.utils.add_fused_lm_head``): called with
``fused_lm_head=True`` it runs the backbone and scores the labels through a custom autograd function in
tiles, returning per-token fields (:class:`~trl.trainer.utils.FusedCausalLMOutput`) without the
``[rows, tokens, vocabulary]`` logits. Inside a JD step that kernel is opaque: the Gramian engine's rules
serve the LM head only as a module call (so the head's weight would go to the engine's exact but slow
per-objective fallback, one backward per objective), and a batched (``vmap``) backward fails on it.

:class:`LogitsHead` replaces that forward for the span of a training step. A fused call runs the model's
own forward (the LM head as a module: its logits, with the model's soft-capping and logit scale), divides
by TRL's temperature :math:`\tau` and builds the same fields from :math:`z = \text{logits} / \tau` at the
positions whose next-token label :math:`y_t` is not ``-100`` (zero elsewhere, as TRL):

* ``log_probs`` :math:`\log \operatorname{softmax}(z_t)_{y_t}` (with gradient);
* without gradient, the fields TRL asked for: ``entropy`` :math:`-\sum_v p_v \log p_v`,
  ``log_sum_sq_probs`` :math:`\log \sum_v p_v^2`, ``mean_logits`` :math:`\frac1V \sum_v z_v`, ``is_top1``
  :math:`[\arg\max_v z_v = y_t]`, and ``label_mask``.

The price is the full logits, as with :class:`hf_jd.JDTrainer` on a causal LM. Calls with gradient are
recorded (their token losses, supervised mask and model outputs) for the trainers that build their loss
vector from them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn
from trl.trainer.utils import FusedCausalLMOutput

from ..losses import causal_token_losses
from ._config import instance_attribute

#: The per-token fields TRL's fused head computes besides ``log_probs`` (TRL 1.16).
OPTIONAL_FIELDS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


class HeadCall(NamedTuple):
    """One fused call with gradient: token losses ``[R, T']`` (``−log_probs``), supervised mask, model outputs."""

    token_losses: Tensor
    supervised: Tensor
    outputs: Any


def fused_head_owner(model: nn.Module) -> nn.Module:
    """The module whose ``forward`` TRL replaced by its fused LM head: the model, or the base model under PEFT."""
    for module in model.modules():
        if _fused_function(vars(module).get("forward")) is not None:
            return module
    raise RuntimeError(
        f"hf_jd.trl found no TRL fused LM head on {type(model).__name__} (TRL's trainers add one to the model they "
        "train): hf_jd.trl is tested with TRL 1.16."
    )


def _fused_function(forward: Any) -> Any:
    function = getattr(forward, "__func__", None)
    code = getattr(function, "__code__", None)
    return function if code is not None and code.co_name == "_fused_forward" else None


def _closure(function: Any) -> dict[str, Any]:
    cells = function.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(function.__code__.co_freevars, cells)}


class LogitsHead:
    """The stand-in for TRL's fused LM head on ``model`` (module docstring); install it with :meth:`serving`."""

    def __init__(self, model: nn.Module) -> None:
        self.owner = fused_head_owner(model)
        self.fused_forward = vars(self.owner)["forward"]
        settings = _closure(_fused_function(self.fused_forward))
        missing = {"temperature", "outputs"} - settings.keys()
        if missing:
            raise RuntimeError(
                f"TRL's fused LM head no longer has {sorted(missing)}: hf_jd.trl is tested with TRL 1.16."
            )
        self.temperature = float(settings["temperature"])
        #: TRL's ``cast_lm_head_to_fp32`` (GRPO): the head in float32 outside autocast, which the model's own
        #: forward does not do; the stand-in then stays out (the fused head, served by the engines' exact fallback).
        self.float32_head = bool(settings.get("cast_lm_head_to_fp32", False))
        self.fields = frozenset(settings["outputs"])
        self.calls: list[HeadCall] = []

    @contextmanager
    def serving(self) -> Iterator[LogitsHead]:
        """Inside the block, the model's fused calls go through this stand-in (their records are kept)."""
        self.forget()
        with instance_attribute(self.owner, "forward", self):
            yield self

    def only_call(self, trainer: str) -> HeadCall:
        """The one fused call with gradient since :meth:`serving` began (or the last :meth:`forget`)."""
        if len(self.calls) != 1:
            raise RuntimeError(
                f"{trainer} expected TRL's loss to call the fused LM head once with gradient, got "
                f"{len(self.calls)} such calls: this TRL version computes its loss differently (hf_jd.trl is "
                "tested with TRL 1.16)."
            )
        return self.calls[0]

    def forget(self) -> None:
        """Drop the recorded calls (before a forward that is run again)."""
        self.calls.clear()

    def __call__(
        self,
        *args: Any,
        fused_lm_head: bool = False,
        labels: Tensor | None = None,
        shift_labels: Tensor | None = None,
        num_items_in_batch: Tensor | int | None = None,
        **kwargs: Any,
    ) -> Any:
        if not fused_lm_head:
            return self.fused_forward(
                *args,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        kwargs["use_cache"] = False
        kwargs.pop("logits_to_keep", None)  # TRL's fused head scores every position
        outputs = self.fused_forward(*args, **kwargs)  # the model's own forward: logits, no loss
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        if self.temperature != 1.0:
            logits = logits / self.temperature
        token_losses, supervised = causal_token_losses(logits, labels, shift_labels)
        fields = self._fields(logits, labels, shift_labels, supervised)
        if token_losses.requires_grad:
            self.calls.append(HeadCall(token_losses, supervised, outputs))
        count = supervised.sum() if num_items_in_batch is None else num_items_in_batch
        loss = token_losses.sum() / torch.as_tensor(count, device=token_losses.device).clamp(min=1)
        return FusedCausalLMOutput(loss=loss, log_probs=-token_losses, label_mask=supervised, **fields)

    def _fields(
        self, logits: Tensor, labels: Tensor | None, shift_labels: Tensor | None, supervised: Tensor
    ) -> dict[str, Tensor]:
        """The optional fields TRL asked for, without gradient, zero where the label is ``-100``."""
        wanted = self.fields.intersection(OPTIONAL_FIELDS)
        if not wanted:
            return {}
        targets = shift_labels if shift_labels is not None else cast(Tensor, labels)[:, 1:]
        fields: dict[str, Tensor] = {}
        with torch.no_grad():
            scored = (logits if shift_labels is not None else logits[:, :-1]).float()
            mask = supervised.to(scored.device)
            if wanted & {"entropy", "log_sum_sq_probs"}:
                log_probs = scored.log_softmax(dim=-1)
                if "entropy" in wanted:
                    fields["entropy"] = -(log_probs.exp() * log_probs).sum(dim=-1) * mask
                if "log_sum_sq_probs" in wanted:
                    fields["log_sum_sq_probs"] = torch.logsumexp(2 * log_probs, dim=-1) * mask
            if "mean_logits" in wanted:
                fields["mean_logits"] = scored.mean(dim=-1) * mask
            if "is_top1" in wanted:
                fields["is_top1"] = (scored.argmax(dim=-1) == targets.to(scored.device)) & mask
        return fields


class LogitsHeadSteps:
    """Trainer mixin (before :class:`hf_jd.JDTrainerMixin`): each training step runs with TRL's fused LM head
    stood in for by :class:`LogitsHead`: the JD forward, the Gramian engine's calibration forward and any re-run
    of the micro-batch see the LM head as a module call. Evaluation keeps TRL's fused head, and so does a step
    under ``cast_lm_head_to_fp32`` (the model's own forward has no float32 head; the engines' exact
    per-objective fallback then serves the head's weight)."""

    _logits_head: LogitsHead | None = None

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Tensor:
        head = LogitsHead(model)
        if head.float32_head:
            return cast(Tensor, super().training_step(model, inputs, num_items_in_batch))  # type: ignore[misc]
        with head.serving(), instance_attribute(self, "_logits_head", head):
            return cast(Tensor, super().training_step(model, inputs, num_items_in_batch))  # type: ignore[misc]

    @contextmanager
    def logits_head(self, model: nn.Module) -> Iterator[LogitsHead]:
        """The stand-in of this training step with no call recorded yet (outside a step: a fresh one)."""
        if self._logits_head is not None:
            self._logits_head.forget()
            yield self._logits_head
            return
        with LogitsHead(model).serving() as head:
            yield head
