"""The shipped multitask recipe (``recipes/multitask.yaml``) as a comparison of aggregators, over seeds.

Runs the recipe's example (three heads over one ViT encoder on scikit-learn's digits, per-task Jacobian
descent) once per aggregator and seed, everything else as the recipe sets it, and prints the held-out
metrics of each run and their means: the figures ``recipes/multitask.yaml`` and the README state.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_multitask_recipe.py                 # mean, upgrad; seeds 0-2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_multitask_recipe.py --aggregators mean upgrad nash_mtl
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_multitask_recipe.py --extra --max_grad_norm 1.0

About 35 s a run on one core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import multitask  # noqa: E402  (examples/multitask.py, the recipe's example)

METRICS = ("eval_digit_accuracy", "eval_parity_accuracy", "eval_ink_mse")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--aggregators", nargs="+", default=["mean", "upgrad"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--extra", nargs=argparse.REMAINDER, default=[], help="flags passed on to the example"
    )
    options = parser.parse_args()
    recipe = str(ROOT / "recipes" / "multitask.yaml")
    results: dict[str, list[dict[str, float]]] = {}
    for aggregator in options.aggregators:
        for seed in options.seeds:
            with tempfile.TemporaryDirectory() as output_dir:
                argv = ["--config", recipe, "--aggregator", aggregator, "--seed", str(seed)]
                argv += ["--output_dir", output_dir, "--logging_steps", "1000", "--disable_tqdm", "True"]
                metrics = multitask.main([*argv, *options.extra])
            results.setdefault(aggregator, []).append(metrics)
            print(aggregator, seed, " ".join(f"{name}={metrics[name]:.4f}" for name in METRICS), flush=True)
    print(f"\n| aggregator | {' | '.join(METRICS)} |\n|---|{'---:|' * len(METRICS)}")
    for aggregator, runs in results.items():
        means = [statistics.mean(run[name] for run in runs) for name in METRICS]
        print(f"| {aggregator} | " + " | ".join(f"{value:.4f}" for value in means) + " |")


if __name__ == "__main__":
    main()
