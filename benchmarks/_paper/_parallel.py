"""Independent runs on a few worker processes (one torch thread each), or inline for one worker."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

Job = TypeVar("Job")


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(
    function: Callable[[Job], Any], jobs: Iterable[Job], workers: int, threads: int = 1
) -> list[Any]:
    """``[function(job) for job in jobs]``, in order, on ``workers`` forked processes (inline when 1).

    Each process runs ``torch.set_num_threads(threads)`` first, so ``workers × threads`` should not exceed
    the cores (2 on the reference machine: ``--workers 2`` with one thread each).
    """
    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        torch.set_num_threads(threads)
        return [function(job) for job in jobs]
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, initializer=_init_worker, initargs=(threads,)) as pool:
        return pool.map(function, jobs, chunksize=1)
