"""What ``jd_engine="auto"`` falls back to: the engine of a run and its fallback state.

The candidates come from the run's backend (:mod:`hf_jd.trainer._backends`: for one process or DDP,
the Gramian engine with and without broadcast expansion, then the explicit Jacobian; under FSDP2 the
sharded Gramian engine). They are tried in order; ``auto`` moves to the next one, with one warning
naming the cause, when a candidate cannot serve the model (static check), crashes on the first step,
or fails the exactness self-check.
"""

from __future__ import annotations

import logging
import warnings

from torch import nn

from ..distributed import world_size
from ..gramian import GramianMismatchError
from ..training_args import JDTrainingArguments
from ._backends import Backend, EngineChoice, backend_for_module
from ._engines import JDEngine

__all__ = ["EngineChoice", "EngineSelector"]

logger = logging.getLogger(__name__)


class EngineSelector:
    """The engine of a run and the fallback state of ``auto``: which candidate is in use, whether it has
    completed a step, and when its exactness self-check is due."""

    def __init__(
        self, choices: list[EngineChoice], args: JDTrainingArguments, backend: Backend | None = None
    ) -> None:
        self.choices = choices
        self.args = args
        #: builds the engines; ``None``: the backend the module itself needs (``backend_for_module``)
        self.backend = backend
        self.index = 0
        self.engine: JDEngine | None = None
        #: the current engine completed a step (its first self-check passed)
        self.confirmed = False
        self._last_verified_step = -1

    @property
    def choice(self) -> EngineChoice:
        return self.choices[self.index]

    def current(self, module: nn.Module) -> JDEngine:
        """The current engine, built on first use; a candidate that cannot serve the model is skipped."""
        while self.engine is None:
            choice = self.choice
            try:
                backend = self.backend or backend_for_module(module)
                self.engine = backend.build_engine(choice, module, self.args, world_size())
            except Exception as error:
                if not self.fall_back(error, rerun=False):
                    raise
            else:
                logger.info("JDTrainer uses %s.", choice)
        return self.engine

    def verification_due(self, global_step: int) -> bool:
        """The exactness self-check runs on the engine's first step and every ``jd_verify_every`` steps
        (on the first micro-batch of those steps)."""
        if not self.confirmed:
            return True
        every = self.args.jd_verify_every
        if not every or global_step % every or self._last_verified_step == global_step:
            return False
        self._last_verified_step = global_step
        return True

    def fall_back(self, error: Exception, rerun: bool) -> bool:
        """Move ``auto`` to the next engine after ``error``; ``False`` when there is none left.

        A static refusal (``rerun=False``: the engine could not be built for this model) or a failed
        exactness self-check skips every candidate of the same kind: their settings cannot help.
        """
        failed = self.choice
        index = self.index + 1
        if not rerun or isinstance(error, GramianMismatchError):  # the settings of the kind cannot help
            while index < len(self.choices) and self.choices[index].kind == failed.kind:
                index += 1
        if index >= len(self.choices):
            return False
        self.index, self.engine, self.confirmed = index, None, False
        chosen = self.choice
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
