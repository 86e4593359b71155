"""Snapshots of the RNG and autocast state of a module call, to replay it exactly when recomputing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from .._tensors import cuda_devices


@dataclass
class RngState:
    """The CPU generator state and that of every initialised CUDA device."""

    cpu: torch.Tensor
    cuda: dict[int, torch.Tensor]


#: ``(device type, autocast enabled, autocast dtype)`` for ``"cpu"`` (and ``"cuda"`` when available).
AutocastState = tuple[tuple[str, bool, torch.dtype], ...]


def rng_snapshot() -> RngState:
    return RngState(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in cuda_devices()})


def rng_changed(before: RngState) -> bool:
    if not torch.equal(before.cpu, torch.get_rng_state()):
        return True
    return any(not torch.equal(state, torch.cuda.get_rng_state(d)) for d, state in before.cuda.items())


@contextmanager
def replay_rng(state: RngState | None) -> Iterator[None]:
    """Run the body from ``state`` (so that dropout draws the same masks), then restore the RNG."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=list(state.cuda)):
        torch.set_rng_state(state.cpu)
        for device, cuda_state in state.cuda.items():
            torch.cuda.set_rng_state(cuda_state, device)
        yield


def autocast_snapshot() -> AutocastState:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in devices)


@contextmanager
def replay_autocast(snapshot: AutocastState | None) -> Iterator[None]:
    with ExitStack() as stack:
        for device, enabled, dtype in snapshot or ():
            stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield
