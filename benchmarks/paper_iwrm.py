"""Does Jacobian descent help instance-wise risk minimisation? The IWRM protocol of Quinton & Rey, through JDTrainer.

Protocol (Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, arXiv:2406.16232, Section 5):
one objective per training example; a training subset of 1024 examples; batches of 32 (so 32 objectives
per step); plain SGD without momentum, constant rate; 20 epochs; a small CNN. Every method runs through
``hf_jd.JDTrainer``; ``mean`` (the mean of the per-example gradients) is ordinary SGD, the baseline. For
each (experiment, aggregator), one run per rate of a log-spaced grid (seed 0) selects the rate with the
smallest area under the training-loss curve; then every seed is trained at that rate (the grid's seed-0
run is reused). Reported: the final training loss, the area under the curve (AUC) and the test accuracy,
mean ± standard error over seeds; the curves (Figure 2 style); the time per epoch relative to ``mean``
(Table 7 style).

    python benchmarks/paper_iwrm.py --quick                 # smoke run: tiny subset, 3 epochs, 2 rates, 2 seeds
    python benchmarks/paper_iwrm.py --workers 2             # full run (2 cores; see benchmarks/README.md)

Outputs in ``--out-dir`` (default ``benchmarks/results/paper_iwrm``): ``paper_iwrm.json`` (every run),
``paper_iwrm.md`` (the tables) and the figure ``paper_iwrm_curves.png`` (full mode: also copied to
``--figure-dir``, default ``benchmarks/figures``).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _paper._data import IWRM_DATASETS, TRAIN_SUBSET, Split  # noqa: E402
from _paper._models import build_iwrm_model, per_example_cross_entropy  # noqa: E402
from _paper._parallel import run_jobs  # noqa: E402
from _paper._report import add_run_options, markdown_table, plot_curves, provenance, write_outputs  # noqa: E402
from _paper._selection import area_under_curve, log_grid, select_learning_rate  # noqa: E402
from _paper._stats import format_mean_se  # noqa: E402
from _paper._training import Method, Schedule, fit  # noqa: E402

AGGREGATORS = ("mean", "upgrad", "dualproj", "mgda", "pcgrad", "imtl_g", "cagrad", "nash_mtl", "aligned_mtl")
#: experiment name -> (dataset, architecture)
EXPERIMENTS = {
    "digits-cnn": ("digits", "cnn"),
    "mnist1d-cnn": ("mnist1d", "cnn"),
    "breast_cancer-mlp": ("breast_cancer", "mlp"),
    "digits-vit": ("digits", "vit"),
}
FULL: dict[str, Any] = {
    "experiments": ["digits-cnn", "mnist1d-cnn", "breast_cancer-mlp", "digits-vit"],
    "aggregators": list(AGGREGATORS),
    "train_size": TRAIN_SUBSET,
    "epochs": 20,
    "grid": (1e-3, 10.0, 9),  # 1e-3 … 10, two points per decade
    "seeds": 8,
    "seeds_per_experiment": {"digits-vit": 3},  # the ViT costs ~3-4x the CNN per epoch
}
QUICK: dict[str, Any] = {
    "experiments": ["digits-cnn", "mnist1d-cnn"],
    "aggregators": ["mean", "upgrad", "dualproj", "mgda"],
    "train_size": 128,
    "epochs": 3,
    "grid": (0.03, 0.3, 2),
    "seeds": 2,
    "seeds_per_experiment": {},
}


@dataclass(frozen=True)
class Job:
    """One training run: an experiment, an aggregator, a learning rate and a seed."""

    experiment: str
    aggregator: str
    learning_rate: float
    seed: int
    epochs: int
    train_size: int


@functools.cache
def load(dataset: str, train_size: int) -> Split:
    """The data set with a ``train_size`` training subset (built once per process)."""
    return IWRM_DATASETS[dataset](train_size=train_size)


def _mean_train_loss(split: Split, model: torch.nn.Module) -> float:
    """``(1/n) Σ_i CE(f(x_i), y_i)`` over the whole training subset, in eval mode (the ERM objective)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        data = split.train.tensors
        loss = float(F.cross_entropy(model(data["x"])["logits"], data["labels"]).item())
    model.train(was_training)
    return loss


def _accuracy(split: Split, model: torch.nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        data = split.test.tensors
        return float((model(data["x"])["logits"].argmax(-1) == data["labels"]).float().mean().item())


def run(job: Job) -> dict[str, Any]:
    """Train one model; returns the job, its curve, epoch times, test accuracy and AUC."""
    dataset, architecture = EXPERIMENTS[job.experiment]
    started = time.perf_counter()
    split = load(dataset, job.train_size)
    model = build_iwrm_model(architecture, split.input_shape, split.tasks[0].num_outputs, job.seed)
    record = fit(
        model,
        split.train,
        Schedule(job.learning_rate, job.epochs, batch_size=32, optim="sgd", seed=job.seed),
        Method("aggregator", job.aggregator),
        functools.partial(_mean_train_loss, split),
        compute_losses_func=per_example_cross_entropy,
    )
    return {
        **asdict(job),
        **asdict(record),
        "auc": area_under_curve(record.curve),
        "test_accuracy": math.nan if record.diverged else _accuracy(split, model),
        "run_seconds": time.perf_counter() - started,
    }


def summarise(runs: list[dict[str, Any]], chosen: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per (experiment, aggregator): the selected rate and the seeds' final loss, AUC, accuracy, epoch time."""
    summary: dict[str, Any] = {}
    for experiment, per_aggregator in chosen.items():
        summary[experiment] = {}
        for aggregator, choice in per_aggregator.items():
            seeds = [
                r
                for r in runs
                if r["experiment"] == experiment
                and r["aggregator"] == aggregator
                and r["learning_rate"] == choice["learning_rate"]
            ]
            seeds.sort(key=lambda r: r["seed"])
            times = [t for r in seeds for t in r["epoch_seconds"]]
            summary[experiment][aggregator] = {
                **choice,
                "seeds": [r["seed"] for r in seeds],
                "final_loss": [r["curve"][-1] for r in seeds],
                "auc": [r["auc"] for r in seeds],
                "test_accuracy": [r["test_accuracy"] for r in seeds],
                "curves": [r["curve"] for r in seeds],
                "seconds_per_epoch": float(torch.tensor(times).median()) if times else math.nan,
            }
    return summary


def markdown(report: dict[str, Any]) -> str:
    """The results table per experiment and the time-per-epoch table."""
    settings = report["settings"]
    parts = [
        f"Provenance: {report['provenance']}; {report['machine']}.",
        f"Settings: {settings['train_size']} training examples, batch 32, plain SGD, {settings['epochs']} "
        f"epochs, rate grid {settings['grid_rates']}, seeds {settings['seeds']}; wall time "
        f"{report['wall_seconds']:.0f} s with {settings['workers']} worker(s).",
    ]
    for experiment, per_aggregator in report["summary"].items():
        rows = []
        for aggregator, s in per_aggregator.items():
            if not math.isfinite(s["learning_rate"]):
                rows.append([aggregator, "diverged at every rate", "–", "–", "–"])
                continue
            edge = " (grid edge)" if s["on_grid_edge"] else ""
            rows.append(
                [
                    aggregator,
                    f"{s['learning_rate']:.3g}{edge}",
                    format_mean_se(s["final_loss"], 4),
                    format_mean_se(s["auc"], 4),
                    format_mean_se(s["test_accuracy"], 2, scale=100),
                ]
            )
        parts.append(f"\n### {experiment}\n")
        parts.append(
            markdown_table(
                ["aggregator", "rate (by AUC)", "final training loss", "AUC", "test accuracy (%)"], rows
            )
        )
    experiments = list(report["summary"])
    rows = []
    for aggregator in report["settings"]["aggregators"]:
        row = [aggregator]
        for experiment in experiments:
            per = report["summary"][experiment]
            base = per["mean"]["seconds_per_epoch"] if "mean" in per else math.nan
            value = per.get(aggregator, {}).get("seconds_per_epoch", math.nan)
            row.append(
                f"{value / base:.2f} ({value * 1000:.0f} ms)"
                if math.isfinite(base) and math.isfinite(value)
                else "–"
            )
        rows.append(row)
    parts.append("\n### Time per epoch relative to `mean` (median over epochs and seeds)\n")
    parts.append(markdown_table(["aggregator", *experiments], rows))
    return "\n".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiments", nargs="+", choices=sorted(EXPERIMENTS), default=None)
    parser.add_argument(
        "--aggregators", nargs="+", default=None, help=f"default (full): {' '.join(AGGREGATORS)}"
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per aggregator, every experiment (paper: 8)"
    )
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--train-size", type=int, default=None)
    parser.add_argument("--grid", type=float, nargs=3, default=None, metavar=("LOW", "HIGH", "POINTS"))
    add_run_options(parser, "paper_iwrm")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the grid, select the rates, run the seeds, write the JSON, the Markdown tables and the figure."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = QUICK if args.quick else FULL
    experiments = args.experiments or preset["experiments"]
    epochs = args.epochs or preset["epochs"]
    train_size = args.train_size or preset["train_size"]
    aggregators = args.aggregators or preset["aggregators"]
    seeds = {e: args.seeds or preset["seeds_per_experiment"].get(e, preset["seeds"]) for e in experiments}
    low, high, points = args.grid or preset["grid"]
    rates = log_grid(low, high, int(points))
    started = time.perf_counter()

    grid_jobs = [
        Job(experiment, aggregator, rate, 0, epochs, train_size)
        for experiment in experiments
        for aggregator in aggregators
        for rate in rates
    ]
    runs = run_jobs(run, grid_jobs, args.workers, args.threads)
    chosen: dict[str, dict[str, Any]] = {}
    for experiment in experiments:
        chosen[experiment] = {}
        for aggregator in aggregators:
            areas = {
                r["learning_rate"]: r["auc"]
                for r in runs
                if r["experiment"] == experiment and r["aggregator"] == aggregator
            }
            try:
                rate, edge = select_learning_rate(areas)
            except ValueError:  # diverged at every rate of the grid: reported as such, no seed runs
                rate, edge = math.nan, False
            chosen[experiment][aggregator] = {"learning_rate": rate, "on_grid_edge": edge, "grid_auc": areas}
    seed_jobs = [
        Job(experiment, aggregator, choice["learning_rate"], seed, epochs, train_size)
        for experiment, per in chosen.items()
        for aggregator, choice in per.items()
        for seed in range(1, seeds[experiment])
        if math.isfinite(choice["learning_rate"])
    ]
    runs += run_jobs(run, seed_jobs, args.workers, args.threads)

    report = {
        **provenance(args),
        "settings": {
            "quick": args.quick,
            "experiments": experiments,
            "aggregators": list(aggregators),
            "train_size": train_size,
            "epochs": epochs,
            "grid_rates": [float(f"{r:.3g}") for r in rates],
            "seeds": seeds,
            "workers": args.workers,
        },
        "summary": summarise(runs, chosen),
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "paper_iwrm_curves.png"
    plot_curves(
        {e: {a: s["curves"] for a, s in per.items()} for e, per in report["summary"].items()}, str(figure)
    )
    write_outputs(report, "paper_iwrm", markdown(report), figure, args)
    return report


if __name__ == "__main__":
    main()
