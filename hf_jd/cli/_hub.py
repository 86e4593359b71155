"""One line instead of a traceback when a model or data set cannot come from the Hugging Face Hub.

The examples load through ``with hub_access("the model NAME"): ...from_pretrained(...)`` and
``with hub_access("the data set NAME"): load_dataset(...)``. When the Hub cannot be reached (offline mode,
``HF_HUB_OFFLINE=1``, or no network) and the files are not in the local cache, the block raises
:class:`HubUnreachableError`, which ``hf-jd`` and :func:`run_example` print as one line suggesting
``--offline_smoke``. Any other error (a misspelt name on a reachable Hub, a bad argument) passes unchanged.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from ._errors import HubUnreachableError


def _unreachable_types() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    # datasets raises the built-in ConnectionError; transformers an OSError caused by LocalEntryNotFoundError.
    return (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, socket.gaierror, TimeoutError)


def is_unreachable(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, says that the Hub could not be reached."""
    kinds = _unreachable_types()
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def offline_mode() -> bool:
    """Whether the Hub is switched off by the environment (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(
        os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )


@contextmanager
def hub_access(what: str) -> Iterator[None]:
    """Turn "the Hub cannot be reached" inside the block into :class:`HubUnreachableError` naming ``what``."""
    try:
        yield
    except HubUnreachableError:
        raise
    except Exception as error:
        if not is_unreachable(error):
            raise
        reason = "offline mode: HF_HUB_OFFLINE=1" if offline_mode() else "no network"
        raise HubUnreachableError(
            f"could not load {what}: the Hugging Face Hub cannot be reached ({reason}) and it is not in the "
            "local cache. Add --offline_smoke to run this command without the Hub (a tiny model of the same "
            "family, in-memory data)."
        ) from error
