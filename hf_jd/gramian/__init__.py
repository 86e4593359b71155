r"""The Gramian engine: per-example / per-task Gramians without materialising the Jacobian.

``GramianEngine`` captures, during one forward pass, the inputs and gradient edges of every module
that owns trainable parameters, runs one backward pass to the module outputs, and assembles
:math:`G = J J^\top` layer by layer from per-module rules (Linear / Conv1D / Conv2d, Embedding,
LayerNorm / RMSNorm, MultiheadAttention, and an exact ``torch.func`` rule for any other module); it
then writes the weighted gradient :math:`\text{scale} \cdot J^\top w` into ``.grad`` from the same
captured tensors. With several processes, :meth:`GramianEngine.global_gramian` forms the Gramian of
every rank's examples (``_global.py``). See :class:`GramianEngine` for the API and the exactness
guarantees.

Rules are registered with :func:`register_rule` on subclasses of :class:`Rule` / :class:`PerRowRule`,
and checked with :func:`hf_jd.gramian.testing.assert_rule_exact` (``docs/gramian_rules.md``).
"""

# The built-in rule modules, imported first and in this order: their registration order is the
# lookup order of the built-in rules (hf_jd.gramian._registry).
# isort: off
from . import _linear, _conv, _embedding, _norm, _mha  # noqa: F401
# isort: on

from ._capture import infer_batch_size, loss_count_mismatch
from ._engine import GramianEngine
from ._errors import GramianEngineError
from ._global import Collectives, assign_owners
from ._registry import register_rule, registered_rules, unregister_rule
from ._representation import RepresentationEngine, representation_module
from ._rule import PerRowCache, PerRowRule, Rule
from ._support import REENTRANT_ADVICE, reentrant_checkpointing_module
from ._use import Use
from ._utils import Context
from ._verify import GramianMismatchError, default_rows

__all__ = [
    "Collectives",
    "Context",
    "REENTRANT_ADVICE",
    "GramianEngine",
    "GramianEngineError",
    "GramianMismatchError",
    "PerRowCache",
    "PerRowRule",
    "RepresentationEngine",
    "Rule",
    "Use",
    "assign_owners",
    "default_rows",
    "infer_batch_size",
    "loss_count_mismatch",
    "reentrant_checkpointing_module",
    "representation_module",
    "register_rule",
    "registered_rules",
    "unregister_rule",
]
