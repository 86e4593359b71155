"""``hf-jd train ... --num_processes 2`` re-launches itself through ``accelerate launch``: two CPU ranks (gloo)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_hf_jd_train_on_two_processes(tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    environment.pop("HF_JD_LAUNCHED", None)
    command = [sys.executable, "-m", "hf_jd", "train", "--config", "text_classification"]
    command += ["--offline_smoke", "--output_dir", str(tmp_path / "out"), "--num_processes", "2"]
    command += ["--jd_check_rank_consistency", "True"]  # raises if the ranks' parameters differ
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=240, cwd=ROOT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "accelerate.commands.launch --multi_gpu" in output
    # 3 steps of 4 examples on each of 2 ranks = 24 of the 48 smoke examples: half an epoch (0.25 on one rank).
    epochs = [float(value) for value in re.findall(r"'epoch': '([0-9.]+)'", output)]
    assert epochs and max(epochs) == 0.5, output[-3000:]
    assert (tmp_path / "out-smoke" / "README.md").is_file()  # a smoke run writes to <output_dir>-smoke
