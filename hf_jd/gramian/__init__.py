r"""The Gramian engine: per-example / per-task Gramians without materialising the Jacobian.

``GramianEngine`` captures, during one forward pass, the inputs and gradient edges of every module
that owns trainable parameters, runs one backward pass to the module outputs, and assembles
:math:`G = J J^\top` layer by layer from per-module rules (Linear / Conv1D / Conv2d, Embedding,
LayerNorm / RMSNorm, and an exact ``torch.func`` rule for any other module); it then writes the
weighted gradient :math:`\text{scale} \cdot J^\top w` into ``.grad`` from the same captured tensors.
With several processes, :meth:`GramianEngine.global_gramian` forms the Gramian of every rank's
examples (``_global.py``). See :class:`GramianEngine` for the API and the exactness guarantees.
"""

from ._capture import infer_batch_size, loss_count_mismatch
from ._engine import GramianEngine
from ._errors import GramianEngineError
from ._global import Collectives, assign_owners
from ._support import REENTRANT_ADVICE, reentrant_checkpointing_module
from ._verify import GramianMismatchError, default_rows

__all__ = [
    "Collectives",
    "REENTRANT_ADVICE",
    "GramianEngine",
    "GramianEngineError",
    "GramianMismatchError",
    "assign_owners",
    "default_rows",
    "infer_batch_size",
    "loss_count_mismatch",
    "reentrant_checkpointing_module",
]
