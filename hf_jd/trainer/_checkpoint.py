"""The aggregator's state in a checkpoint: a tensors-and-plain-values file, loaded without running code.

``jd_aggregator.pt`` holds a dict::

    {"format": "hf_jd.aggregator_state", "format_version": 1, "hf_jd_version": "...",
     "aggregator": "random", "aggregator_kwargs": {"seed": 123}, "state": <aggregator.state_dict()>}

It is read with ``torch.load(..., weights_only=True)``, which unpickles only tensors and plain Python
containers: a crafted file cannot execute code. Resuming checks that the file was written for the
configured aggregator, and reports a truncated or foreign file by name.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch import nn

from .._version import __version__

AGGREGATOR_STATE_NAME = "jd_aggregator.pt"
_FORMAT = "hf_jd.aggregator_state"
_FORMAT_VERSION = 1


class CheckpointStateError(ValueError):
    """A checkpoint's aggregator state cannot be resumed (foreign, corrupt, or for another aggregator)."""


def save_aggregator_state(output_dir: str, aggregator: nn.Module, name: str, kwargs: dict[str, Any]) -> str:
    """Write the aggregator's name, arguments and state to ``output_dir/jd_aggregator.pt``; return the path."""
    path = os.path.join(output_dir, AGGREGATOR_STATE_NAME)
    payload = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "hf_jd_version": __version__,
        "aggregator": name,
        "aggregator_kwargs": dict(kwargs),
        "state": dict(aggregator.state_dict()),
    }
    torch.save(payload, path)
    return path


def load_aggregator_state(checkpoint: str, aggregator: nn.Module, name: str, kwargs: dict[str, Any]) -> bool:
    """Restore the aggregator's state from ``checkpoint``; return whether a state file was found.

    Raises:
        CheckpointStateError: the file is not an hf_jd aggregator state, is truncated or corrupt, was
            written for another aggregator or other arguments, or does not fit the aggregator.
        FileNotFoundError: the aggregator is stateful and the checkpoint has no state file.
    """
    path = os.path.join(checkpoint, AGGREGATOR_STATE_NAME)
    if not os.path.isfile(path):
        if aggregator.state_dict():
            raise FileNotFoundError(
                f"{checkpoint} has no {AGGREGATOR_STATE_NAME}, but aggregator {name!r} is stateful: resuming "
                "would not continue the same trajectory. Resume from a checkpoint written by JDTrainer with "
                "this aggregator, or start a new run."
            )
        return False
    payload = _read(path)
    saved_name, saved_kwargs = payload.get("aggregator"), payload.get("aggregator_kwargs")
    if saved_name != name or saved_kwargs != dict(kwargs):
        raise CheckpointStateError(
            f"{path} holds the state of aggregator {saved_name!r} with aggregator_kwargs={saved_kwargs!r} "
            f"(written by hf_jd {payload.get('hf_jd_version')}), but this run is configured with aggregator "
            f"{name!r} and aggregator_kwargs={dict(kwargs)!r}. Resume with the same aggregator settings, or "
            f"delete {AGGREGATOR_STATE_NAME} from the checkpoint to start the aggregator afresh."
        )
    try:
        aggregator.load_state_dict(payload["state"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointStateError(
            f"{path} could not be loaded into {aggregator!r}: {error}. The file does not match this hf_jd "
            f"version's state of {name!r}; delete it to start the aggregator afresh."
        ) from error
    return True


def _read(path: str) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointStateError(
            f"{path} is not a plain hf_jd aggregator state: it holds objects that loading would have to "
            f"execute code for, and it was not loaded ({str(error).splitlines()[0]}). Only load checkpoints "
            "you trust; delete this file to start the aggregator afresh."
        ) from None
    except (EOFError, RuntimeError, OSError) as error:
        raise CheckpointStateError(
            f"{path} is truncated or corrupt and could not be read ({type(error).__name__}: {error}). Resume "
            "from another checkpoint, or delete the file to start the aggregator afresh."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise CheckpointStateError(
            f"{path} is not an hf_jd aggregator state (expected a dict with format={_FORMAT!r}, got "
            f"{type(payload).__name__}"
            f"{' with format=' + repr(payload.get('format')) if isinstance(payload, dict) else ''}). It may "
            "come from an older hf_jd or another program; delete it to start the aggregator afresh."
        )
    return payload
