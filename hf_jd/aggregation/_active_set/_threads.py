"""Where and how the batched LAPACK calls run: in place or not, split across a shared CPU thread pool."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from threading import Lock

import torch

ROWS_PER_THREAD = 16  # smallest share of a batched LAPACK call given to a worker thread (CPU)

_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
_POOL_LOCK = Lock()


def factorize_in_place(device: torch.device) -> bool:
    """Whether to factorise the gathered systems in their own buffer (CPU: saves a copy and fresh
    pages) rather than with the plain out-of-place call (other devices)."""
    return device.type == "cpu"


def in_blocks(device: torch.device, count: int, work: Callable[[int, int], None]) -> None:
    """Run ``work(lo, hi)`` over ``range(count)``, split across threads on CPU.

    Batched LAPACK calls run one matrix after the other in torch on CPU; splitting the batch lets
    ``torch.get_num_threads()`` threads factorise at once (torch releases the GIL in its kernels).
    """
    threads = min(torch.get_num_threads(), count // ROWS_PER_THREAD) if device.type == "cpu" else 1
    if threads <= 1:
        work(0, count)
        return
    pool = _pool_of(threads)
    bounds = [count * t // threads for t in range(threads + 1)]
    futures = [pool.submit(work, bounds[t], bounds[t + 1]) for t in range(threads)]
    for future in futures:
        future.result()


def _pool_of(threads: int) -> ThreadPoolExecutor:
    """The shared thread pool, grown to at least ``threads`` workers."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or threads > _POOL_SIZE:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hf_jd_dual_cone")
            _POOL_SIZE = threads
        return _POOL
