"""The error raised when the Gramian engine cannot be exact for a model or a call."""

from __future__ import annotations


class GramianEngineError(RuntimeError):
    """The Gramian engine cannot compute an exact Gramian for this model or this step.

    The message says why and what to do instead (typically ``jd_engine="jacobian"``, which builds the
    Jacobian explicitly and makes no assumption about the model).
    """
