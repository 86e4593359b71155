"""Worker of ``test_launch_mistakes.py``: ``JDTrainer`` built on 2 launched CPU processes without ``use_cpu``.

Accelerate 1.13 and later then run each process alone (no GPU); ``JDTrainer`` must refuse instead of letting
both train on the same batches into the same ``output_dir``. Writes the error (or ``None``) and Accelerate's
process count to ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from accelerate import PartialState

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed._fixtures import jd_args, regression_dataset, tiny_bert  # noqa: E402

from hf_jd import JDTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    options = parser.parse_args()
    torch.set_num_threads(1)
    error = None
    try:
        JDTrainer(
            model=tiny_bert(),
            args=jd_args(options.out, use_cpu=False),
            train_dataset=regression_dataset(False),
        )
    except ValueError as caught:
        error = str(caught)
    processes = PartialState().num_processes  # accelerate <= 1.12 forms a gloo group itself: no mistake then
    path = os.path.join(options.out, f"rank{os.environ['RANK']}.pt")
    torch.save({"error": error, "accelerate_processes": processes}, path)
    os._exit(0)


if __name__ == "__main__":
    main()
