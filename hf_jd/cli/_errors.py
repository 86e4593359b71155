"""Errors the command line reports as one line, not a traceback: a missing extra, an unreachable Hub, a bad recipe.

``hf-jd`` (:func:`hf_jd.cli.main`) and the examples run directly (``python examples/x.py``, through
:func:`run_example`) print ``error: <message>`` on stderr and exit with status 1 for

* :class:`OneLineError` and its subclasses (:class:`MissingExtraError`, :class:`HubUnreachableError`,
  :class:`RecipeError`);
* an ``ImportError`` of an optional package (:data:`EXTRAS`): the message names the extra to install.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

# Optional packages the examples use: import name -> (distribution, extra of hf-jd that installs it).
EXTRAS: dict[str, tuple[str, str]] = {
    "sklearn": ("scikit-learn", "examples"),
    "matplotlib": ("matplotlib", "examples"),
    "peft": ("peft", "peft"),
    "trl": ("trl", "trl"),
}


class OneLineError(Exception):
    """An error whose message says everything: reported as one line, without a traceback."""


class MissingExtraError(OneLineError, ImportError):
    """An optional package is not installed; the message names the ``hf-jd[extra]`` that installs it."""


class HubUnreachableError(OneLineError, ConnectionError):
    """A model or data set could not be loaded: the Hugging Face Hub is unreachable and it is not cached."""


class RecipeError(OneLineError, ValueError):
    """A recipe (or ``--config`` / ``--accelerate_config`` value) that cannot be used."""


def missing_extra(error: BaseException, needed_by: str | None = None) -> MissingExtraError | None:
    """The :class:`MissingExtraError` for an ``ImportError`` of an optional package of :data:`EXTRAS`, else ``None``.

    >>> print(missing_extra(ModuleNotFoundError("No module named 'sklearn'", name="sklearn.datasets"), "hf-jd demo"))
    hf-jd demo needs scikit-learn, which is not installed: pip install "hf-jd[examples]"
    """
    if isinstance(error, MissingExtraError):
        return error
    if not isinstance(error, ImportError):
        return None
    module = (error.name or "").split(".")[0]
    if module not in EXTRAS:
        return None
    distribution, extra = EXTRAS[module]
    return MissingExtraError(
        f"{needed_by or 'this command'} needs {distribution}, which is not installed: "
        f'pip install "hf-jd[{extra}]"'
    )


def one_line(error: BaseException, needed_by: str | None = None) -> str | None:
    """The one-line message of ``error`` if the command line reports it as one line, else ``None``."""
    if isinstance(error, OneLineError):
        return str(error)
    extra = missing_extra(error, needed_by)
    return None if extra is None else str(extra)


def run_example(main: Callable[[], Any], needed_by: str | None = None) -> int:
    """Run an example's ``main()``; return its exit status (``error: <one line>`` on stderr and 1 for the
    errors of :func:`one_line`). Examples end with ``raise SystemExit(run_example(main))``."""
    try:
        main()
    except Exception as error:
        message = one_line(error, needed_by or sys.argv[0])
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0
