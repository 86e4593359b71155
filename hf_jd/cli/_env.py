"""``hf-jd env``: the versions and the device, to paste into a bug report."""

from __future__ import annotations

import importlib.metadata
import platform
import sys


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe_device() -> str:
    """``cuda (N x name)``, ``mps`` or ``cpu (N cores)``."""
    import os

    import torch

    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())})
        return f"cuda ({torch.cuda.device_count()} x {', '.join(names)}, CUDA {torch.version.cuda})"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return f"cpu ({os.cpu_count()} cores)"


def environment() -> dict[str, str]:
    """What ``hf-jd env`` prints, as a dict."""
    from .._version import __version__

    return {
        "hf_jd": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "datasets": _version("datasets"),
        "peft": _version("peft"),
        "device": describe_device(),
    }


def command() -> int:
    """Print one ``- name: value`` line per entry (the format of ``transformers env``)."""
    for name, value in environment().items():
        print(f"- {name}: {value}")
    return 0
