r"""Subclasses of stock layers with their own ``forward``: served at the functional op they call.

Many models subclass ``nn.LayerNorm``, ``nn.Embedding`` or ``nn.Linear`` and override ``forward``
around the parent's computation: ConvNeXt's ``ConvNextLayerNorm`` permutes channels-first inputs
before and after ``super().forward``; OPT's and BART's learned positional embeddings compute position
ids and offsets before ``super().forward``; Falcon's linear layers compute ``x @ self.weight.T`` and add
the bias. The module-level rules cannot assume what such a ``forward`` computes, so these modules take
the generic rule (a ``torch.func`` VJP of the whole module per example).

What they compute with their parameters is usually still one stock op — ``F.layer_norm(x, shape,
weight, bias, eps)``, ``F.embedding(ids, weight, ...)``, ``F.linear(x, weight, bias)`` or ``x @
weight.T`` — and the per-row gradients of that op's parameters are exactly what the stock rule computes
from the op's own input :math:`a` and gradient-output :math:`b` (for ``x @ weight.T``, the linear rule
on the weight alone: the bias, added outside the product, is a broadcast point). While the engine
records a forward, a :class:`~torch.overrides.TorchFunctionMode`, active only inside the calls of such
modules, records one call (a :class:`~hf_jd.gramian._use.Call`) each time one of these ops receives the
weight of the innermost such module running (tied weights, as BART's shared embeddings, belong to the
module that runs). The module keeps its own module-level record (generic rule) too; at the end of the
capture that record is dropped for every module whose op was recorded. If the module also uses its
parameters outside the op, the coverage check (:mod:`hf_jd.gramian._graph`) finds that use outside any
recorded call, and the broadcast planner, a batch-free region or the exact fallback serves it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ._embedding import EmbeddingRule
from ._linear import LinearRule
from ._norm import NormRule
from ._rule import Rule
from ._torch_ops import TENSOR_BASE_MATMUL, own_parameter, view_base

logger = logging.getLogger(__name__)

#: Base class → (the functional op its ``forward`` calls, position of the weight among its positional
#: arguments — else the ``weight`` keyword —, the rule of that op).
_OPS: tuple[tuple[type[nn.Module], Callable[..., Any], int, type[Rule[Any]]], ...] = (
    (nn.LayerNorm, F.layer_norm, 2, NormRule),
    (nn.Embedding, F.embedding, 1, EmbeddingRule),
    (nn.Linear, F.linear, 1, LinearRule),
)


def functional_rule(module: nn.Module, params: dict[str, nn.Parameter]) -> Rule[Any] | None:
    """The stock rule of the op that ``module`` (a stock layer with its own ``forward``) calls, if any."""
    for base, _, _, rule in _OPS:
        if isinstance(module, base) and type(module).forward is not base.forward and "weight" in params:
            return rule(module, params)
    return None


def op_weight_position(rule: Rule[Any]) -> tuple[Callable[..., Any], int]:
    """The op and the position of its weight argument, for a rule made by :func:`functional_rule`."""
    for base, op, position, _ in _OPS:
        if isinstance(rule.module, base):
            return op, position
    raise TypeError(f"{type(rule.module).__name__} has no functional op rule.")


#: Called with (owner index, the op's output, its first argument, whether the op is a matmul with the
#: transposed weight — no bias inside) right after the op ran.
OpCallback = Callable[[int, object, object, bool], None]
#: ``x @ W.T``: how some ``nn.Linear`` subclasses compute (Falcon's), with the bias added afterwards.
_MATMULS = frozenset({torch.matmul, torch.Tensor.__matmul__, torch.Tensor.matmul, TENSOR_BASE_MATMUL})


def is_transpose_of(tensor: object, weight: object) -> bool:
    """Whether ``tensor`` is ``weight.T`` (a transposed view of the 2-D ``weight``)."""
    if not isinstance(tensor, torch.Tensor) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return False
    return (
        view_base(tensor) is weight
        and tuple(tensor.shape) == (weight.shape[1], weight.shape[0])
        and tuple(tensor.stride()) == (weight.stride(1), weight.stride(0))
        and tensor.storage_offset() == weight.storage_offset()
    )


class FunctionalCalls(TorchFunctionMode):
    """Records the calls of ``F.layer_norm`` / ``F.embedding`` / ``F.linear`` that receive the weight of
    the innermost watched module running (``running``, maintained by the recorder's hooks). The weight
    is compared with the module's *current* ``weight`` parameter (FSDP2 swaps in an unsharded one for
    the forward); tied weights (BART's shared embeddings) are attributed to the module that runs."""

    def __init__(
        self,
        modules: dict[int, tuple[nn.Module, Callable[..., Any], int]],
        on_call: OpCallback,
        running: list[int],
    ) -> None:
        super().__init__()
        #: Owner index → (module, op, position of the weight argument).
        self.modules = modules
        self.on_call = on_call
        self.running = running
        self.ops = {op: position for _, op, position in modules.values()}

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        position = self.ops.get(func)
        owner, matmul = None, False
        if position is not None and args:
            weight = args[position] if len(args) > position else kwargs.get("weight")
            owner = (
                self._innermost(func, lambda current: current is weight)
                if isinstance(weight, nn.Parameter)
                else None
            )
        elif func in _MATMULS and len(args) == 2:
            owner, matmul = self._innermost(F.linear, lambda current: is_transpose_of(args[1], current)), True
        if owner is not None:
            try:
                self.on_call(owner, output, args[0], matmul)
            except Exception as error:  # noqa: BLE001 - never break the model's forward
                # Unrecorded, the call keeps its module-level record (the generic rule).
                logger.warning("Gramian engine: a call of %s was not recorded (%s).", func.__name__, error)
        return output

    def _innermost(self, op: Callable[..., Any], holds: Callable[[object], bool]) -> int | None:
        """The innermost running module whose op is ``op`` and whose current weight ``holds``."""
        for index in reversed(self.running):
            module, module_op, _ = self.modules[index]
            if module_op is op and holds(own_parameter(module, "weight")):
                return index
        return None


__all__ = ["FunctionalCalls", "functional_rule", "is_transpose_of", "op_weight_position"]
