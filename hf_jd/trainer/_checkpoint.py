"""The aggregator's (or scalarizer's) state in a checkpoint: tensors and plain values, loaded without running code.

``jd_aggregator.pt`` holds a dict::

    {"format": "hf_jd.aggregator_state", "format_version": 1, "hf_jd_version": "...",
     "aggregator": "random", "aggregator_kwargs": {"seed": 123}, "state": <aggregator.state_dict()>}

and ``jd_scalarizer.pt`` the same with ``scalarizer`` in place of ``aggregator`` (:data:`AGGREGATOR`,
:data:`SCALARIZER`). It is read with ``torch.load(..., weights_only=True)``, which unpickles only
tensors and plain Python containers: a crafted file cannot execute code. Resuming checks that the file
was written for the configured method, and reports a truncated or foreign file by name.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._version import __version__

_FORMAT_VERSION = 1


@dataclass(frozen=True)
class StateFile:
    """Where and under which names a checkpoint keeps one kind of method state."""

    kind: str  # "aggregator" or "scalarizer": the payload's keys and the messages' wording
    filename: str

    @property
    def format(self) -> str:
        return f"hf_jd.{self.kind}_state"


AGGREGATOR = StateFile("aggregator", "jd_aggregator.pt")
SCALARIZER = StateFile("scalarizer", "jd_scalarizer.pt")
AGGREGATOR_STATE_NAME = AGGREGATOR.filename
SCALARIZER_STATE_NAME = SCALARIZER.filename


class CheckpointStateError(ValueError):
    """A checkpoint's aggregator/scalarizer state cannot be resumed (foreign, corrupt, or for another method)."""


def save_method_state(
    output_dir: str, file: StateFile, method: nn.Module, name: str, kwargs: dict[str, Any]
) -> str:
    """Write the method's name, arguments and state to ``output_dir/<file.filename>``; return the path."""
    path = os.path.join(output_dir, file.filename)
    payload = {
        "format": file.format,
        "format_version": _FORMAT_VERSION,
        "hf_jd_version": __version__,
        file.kind: name,
        f"{file.kind}_kwargs": dict(kwargs),
        "state": dict(method.state_dict()),
    }
    torch.save(payload, path)
    return path


def load_method_state(
    checkpoint: str, file: StateFile, method: nn.Module, name: str, kwargs: dict[str, Any]
) -> bool:
    """Restore the method's state from ``checkpoint``; return whether a state file was found.

    Raises:
        CheckpointStateError: the file is not an hf_jd state of this kind, is truncated or corrupt, was
            written for another method or other arguments, or does not fit the method.
        FileNotFoundError: the method is stateful and the checkpoint has no state file.
    """
    kind, filename = file.kind, file.filename
    path = os.path.join(checkpoint, filename)
    if not os.path.isfile(path):
        if method.state_dict():
            raise FileNotFoundError(
                f"{checkpoint} has no {filename}, but {kind} {name!r} is stateful: resuming would not continue "
                f"the same trajectory. Resume from a checkpoint written by JDTrainer with this {kind}, or start "
                "a new run."
            )
        return False
    payload = _read(path, file)
    saved_name, saved_kwargs = payload.get(kind), payload.get(f"{kind}_kwargs")
    if saved_name != name or saved_kwargs != dict(kwargs):
        raise CheckpointStateError(
            f"{path} holds the state of {kind} {saved_name!r} with {kind}_kwargs={saved_kwargs!r} (written by "
            f"hf_jd {payload.get('hf_jd_version')}), but this run is configured with {kind} {name!r} and "
            f"{kind}_kwargs={dict(kwargs)!r}. Resume with the same {kind} settings, or delete {filename} from "
            f"the checkpoint to start the {kind} afresh."
        )
    try:
        method.load_state_dict(payload["state"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointStateError(
            f"{path} could not be loaded into {method!r}: {error}. The file does not match this hf_jd "
            f"version's state of {name!r}; delete it to start the {kind} afresh."
        ) from error
    return True


def _read(path: str, file: StateFile) -> dict[str, Any]:
    kind = file.kind
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointStateError(
            f"{path} is not a plain hf_jd {kind} state: it holds objects that loading would have to "
            f"execute code for, and it was not loaded ({str(error).splitlines()[0]}). Only load checkpoints "
            f"you trust; delete this file to start the {kind} afresh."
        ) from None
    except (EOFError, RuntimeError, OSError) as error:
        raise CheckpointStateError(
            f"{path} is truncated or corrupt and could not be read ({type(error).__name__}: {error}). Resume "
            f"from another checkpoint, or delete the file to start the {kind} afresh."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != file.format:
        raise CheckpointStateError(
            f"{path} is not an hf_jd {kind} state (expected a dict with format={file.format!r}, got "
            f"{type(payload).__name__}"
            f"{' with format=' + repr(payload.get('format')) if isinstance(payload, dict) else ''}). It may "
            f"come from an older hf_jd or another program; delete it to start the {kind} afresh."
        )
    return payload
