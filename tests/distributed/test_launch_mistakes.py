"""A multi-process launch that Accelerate would run as independent single processes is refused."""

from __future__ import annotations

import os

import pytest
from _launch import launch_workers

from hf_jd.trainer._guards import check_process_count

WORKER = os.path.join(os.path.dirname(__file__), "_launch_mistake_worker.py")


def test_two_cpu_processes_without_use_cpu_are_refused_on_every_rank(tmp_path):
    results = launch_workers(WORKER, tmp_path, 2, ["--out", str(tmp_path)], retry_on_signal=True)
    for result in results:
        if result["accelerate_processes"] == 2:  # accelerate <= 1.12 forms the gloo group itself: a real run
            assert result["error"] is None
            continue
        assert result["error"] is not None, (
            "JDTrainer accepted a launch whose ranks would train independently"
        )
        assert "WORLD_SIZE=2" in result["error"]
        assert "--num_processes 2" in result["error"] and "--use_cpu True" in result["error"]


@pytest.mark.parametrize(("accelerate", "launched"), [(1, 1), (2, 2), (4, 4)])
def test_consistent_process_counts_are_accepted(accelerate, launched):
    check_process_count(accelerate, launched)
