"""A real multi-task benchmark: per-task Jacobian descent through JDTrainer against scalarizers and single-task models.

Task sets (offline, see ``benchmarks/_paper/_data.py``):

* ``multidigits`` — MultiDigits, built from scikit-learn's digits the way MultiMNIST is built from MNIST
  (Sabour et al., NeurIPS 2017; Sener & Koltun, NeurIPS 2018): two digits overlaid with offsets on a
  12×12 canvas; tasks: the left digit and the right digit (accuracy);
* ``cancer_mtl`` — the breast-cancer data as three tasks (Caruana, 1997, "related tasks from held-out
  features"): the diagnosis (accuracy) and two standardised "worst" features (test MSE).

Model: a shared encoder (a small CNN, or an MLP for tabular data) and one linear head per task; the model
returns ``{"loss": {task: L_task}}``. Methods:

* aggregators, through ``JDTrainer`` with ``jd_objectives="per_task"`` (per-task JD: the encoder gets the
  aggregated update of the task gradients, each head its own task's gradient; Quinton & Rey,
  arXiv:2406.16232): mean, UPGrad, DualProj, MGDA, PCGrad, IMTL-G, CAGrad, Nash-MTL, Aligned-MTL;
* the same aggregators weighted by the representation Gramian (``jd_gramian="representation"``, the
  Gramian of the task gradients at the encoder's output; Sener & Koltun 2018's MGDA-UB): UPGrad, MGDA;
* scalarizers (one backward of ``s(L)``): mean, uncertainty weighting (Kendall et al., CVPR 2018), DWA
  (Liu et al., CVPR 2019), FAMO (Liu et al., NeurIPS 2023), RLW (Lin et al., TMLR 2022), geometric mean
  (Chennupati et al., CVPR-W 2019) — through ``JDTrainer`` with ``--scalarizer``;
* single-task baselines: the same model with one head, one per task.

Every method uses the same optimizer (Adam, i.e. ``adamw_torch`` without weight decay, a constant rate of
1e-3, batch 32) and the same epochs, as the MTL benchmarks of LibMTL (Lin & Zhang, JMLR 2023) share one
optimizer configuration across methods. Reported per method: each task's test metric and Δm% (the mean
relative drop against the single-task models, lower is better; Maninis et al. 2019, LibMTL), mean ±
standard error over seeds.

    python benchmarks/multitask.py --quick            # smoke run
    python benchmarks/multitask.py --workers 2        # full run (2 cores; see benchmarks/README.md)
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
from _paper._data import MTL_DATASETS, Split  # noqa: E402
from _paper._models import MultiTaskModel  # noqa: E402
from _paper._parallel import run_jobs  # noqa: E402
from _paper._report import add_run_options, markdown_table, plot_curves, provenance, write_outputs  # noqa: E402
from _paper._stats import delta_m, format_mean_se  # noqa: E402
from _paper._training import Method, Schedule, fit  # noqa: E402

AGGREGATORS = ("mean", "upgrad", "dualproj", "mgda", "pcgrad", "imtl_g", "cagrad", "nash_mtl", "aligned_mtl")
#: aggregators also run with ``jd_gramian="representation"``
REPRESENTATION = ("upgrad", "mgda")
SCALARIZERS = ("mean", "uncertainty_weighting", "dwa", "famo", "random", "geometric_mean")
SINGLE_TASK = "single-task"
FULL: dict[str, Any] = {
    "datasets": ["multidigits", "cancer_mtl"],
    "aggregators": list(AGGREGATORS),
    "representation": list(REPRESENTATION),
    "scalarizers": list(SCALARIZERS),
    "epochs": {"multidigits": 15, "cancer_mtl": 30},
    "seeds": 8,
    "learning_rate": 1e-3,
}
QUICK: dict[str, Any] = {
    "datasets": ["multidigits", "cancer_mtl"],
    "aggregators": ["mean", "upgrad", "mgda"],
    "representation": ["upgrad"],
    "scalarizers": ["mean", "famo", "dwa"],
    "epochs": {"multidigits": 2, "cancer_mtl": 3},
    "seeds": 2,
    "learning_rate": 3e-3,
    "train_pairs": 256,
}


@dataclass(frozen=True)
class Job:
    """One run: a data set, a method (``kind`` aggregator / representation (an aggregator weighted by the
    representation Gramian) / scalarizer / single-task), the task(s), a seed."""

    dataset: str
    kind: str
    name: str
    seed: int
    epochs: int
    learning_rate: float
    train_pairs: int | None = None  # MultiDigits only: training pairs (None: the default 2048)

    @property
    def label(self) -> str:
        if self.kind == "single_task":
            return f"{SINGLE_TASK} ({self.name})"
        if self.kind == "representation":
            return f"{self.name} (representation Gramian)"
        return self.name if self.kind == "aggregator" else f"{self.name} (scalarizer)"


@functools.cache
def load(dataset: str, train_pairs: int | None) -> Split:
    """The task set (built once per process)."""
    if dataset == "multidigits" and train_pairs is not None:
        return MTL_DATASETS[dataset](train_pairs=train_pairs)
    return MTL_DATASETS[dataset]()


def _mean_task_loss(split: Split, model: MultiTaskModel) -> float:
    """``(1/K) Σ_k L_k`` on the whole training set (eval mode): the curve of the figure."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        losses = model(**split.train.tensors)["loss"]
        value = float(torch.stack(list(losses.values())).mean().item())
    model.train(was_training)
    return value


def evaluate_tasks(split: Split, model: MultiTaskModel) -> dict[str, float]:
    """Per task of the model: test accuracy (classification) or test MSE (regression)."""
    model.eval()
    data = split.test.tensors
    with torch.no_grad():
        outputs = model(data["x"])["outputs"]
    metrics = {}
    for task in model.tasks:
        out, target = outputs[task.name], data[task.name]
        if task.is_classification:
            metrics[task.name] = float((out.argmax(-1) == target).float().mean().item())
        else:
            metrics[task.name] = float(((out.squeeze(-1) - target) ** 2).mean().item())
    return metrics


def method_of(job: Job, num_tasks: int) -> Method:
    """The aggregator or scalarizer of a job, with the constructor arguments that depend on the task count."""
    if job.kind == "scalarizer":
        kwargs: dict[str, Any] = {}
        if job.name in ("uncertainty_weighting", "imtl_l", "famo"):
            kwargs["shape"] = num_tasks
        if job.name == "random":
            kwargs["seed"] = job.seed
        return Method("scalarizer", job.name, kwargs)
    if job.kind == "representation":
        return Method("aggregator", job.name, arguments={"jd_gramian": "representation"})
    # aggregators; a single-task model is trained by the mean "aggregator" of its one task loss (= SGD/Adam)
    return Method("aggregator", job.name if job.kind == "aggregator" else "mean")


def run(job: Job) -> dict[str, Any]:
    """Train one model; returns the job, its per-epoch training curve, epoch times and test metrics."""
    started = time.perf_counter()
    split = load(job.dataset, job.train_pairs)
    tasks = [t for t in split.tasks if t.name == job.name] if job.kind == "single_task" else split.tasks
    model = MultiTaskModel(split.input_shape, tasks, job.seed)
    record = fit(
        model,
        split.train,
        Schedule(job.learning_rate, job.epochs, batch_size=32, optim="adamw_torch", seed=job.seed),
        method_of(job, len(tasks)),
        functools.partial(_mean_task_loss, split),
        objectives="per_task",
    )
    metrics = {t.name: math.nan for t in tasks} if record.diverged else evaluate_tasks(split, model)
    seconds = time.perf_counter() - started
    return {**asdict(job), "label": job.label, **asdict(record), "metrics": metrics, "run_seconds": seconds}


def summarise(runs: list[dict[str, Any]], datasets: list[str], train_pairs: int | None) -> dict[str, Any]:
    """Per data set and method: per-seed task metrics and per-seed Δm% against the single-task models' mean."""
    summary: dict[str, Any] = {}
    for dataset in datasets:
        tasks = load(dataset, train_pairs).tasks
        higher = {t.name: t.metric == "accuracy" for t in tasks}
        mine = [r for r in runs if r["dataset"] == dataset]
        single = {  # per seed: task -> metric of that task's single-task model
            seed: {
                r["name"]: r["metrics"][r["name"]]
                for r in mine
                if r["kind"] == "single_task" and r["seed"] == seed
            }
            for seed in sorted({r["seed"] for r in mine})
        }
        reference = {t.name: float(sum(single[s][t.name] for s in single) / len(single)) for t in tasks}
        methods: dict[str, dict[str, list[float]]] = {}
        per_seed_metrics: dict[str, list[dict[str, float]]] = {SINGLE_TASK: list(single.values())}
        curves: dict[str, list[list[float]]] = {}
        for r in mine:
            if r["kind"] == "single_task":
                continue
            per_seed_metrics.setdefault(r["label"], []).append(r["metrics"])
            curves.setdefault(r["label"], []).append(r["curve"])
        for label, seeds in per_seed_metrics.items():
            methods[label] = {t.name: [m[t.name] for m in seeds] for t in tasks}
            methods[label]["delta_m"] = [
                delta_m(m, reference, higher) if all(math.isfinite(m[t.name]) for t in tasks) else math.inf
                for m in seeds
            ]
        summary[dataset] = {
            "tasks": [{"name": t.name, "metric": t.metric} for t in tasks],
            "single_task_reference": reference,
            "methods": methods,
            "curves": curves,
        }
    return summary


def markdown(report: dict[str, Any]) -> str:
    """One table per data set: each task's test metric and Δm%, mean ± standard error over seeds."""
    s = report["settings"]
    parts = [
        f"Provenance: {report['provenance']}; {report['machine']}.",
        f"Settings: Adam (adamw_torch, no weight decay), rate {s['learning_rate']}, batch 32, epochs "
        f"{s['epochs']}, {s['seeds']} seeds; wall time {report['wall_seconds']:.0f} s with {s['workers']} worker(s).",
    ]
    for dataset, d in report["summary"].items():
        header = ["method"]
        for task in d["tasks"]:
            unit = "accuracy (%) ↑" if task["metric"] == "accuracy" else "MSE ↓"
            header.append(f"{task['name']} {unit}")
        header.append("Δm% ↓")
        rows = []
        for label, values in d["methods"].items():
            row = [label]
            for task in d["tasks"]:
                scale, digits = (100.0, 2) if task["metric"] == "accuracy" else (1.0, 4)
                row.append(format_mean_se(values[task["name"]], digits, scale))
            row.append(format_mean_se(values["delta_m"], 2))
            rows.append(row)
        parts.append(f"\n### {dataset}\n")
        parts.append(markdown_table(header, rows))
    return "\n".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", choices=sorted(MTL_DATASETS), default=None)
    parser.add_argument(
        "--aggregators", nargs="+", default=None, help=f"default (full): {' '.join(AGGREGATORS)}"
    )
    parser.add_argument(
        "--representation",
        nargs="*",
        default=None,
        help="aggregators also run with jd_gramian='representation' (none: pass the flag alone); default "
        f"(full): {' '.join(REPRESENTATION)}",
    )
    parser.add_argument(
        "--scalarizers", nargs="*", default=None, help=f"default (full): {' '.join(SCALARIZERS)}"
    )
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="every data set (default: per data set)")
    parser.add_argument("--learning-rate", type=float, default=None)
    add_run_options(parser, "multitask")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every method and seed, write the JSON, the Markdown tables and the training-curve figure."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = QUICK if args.quick else FULL
    datasets = args.datasets or preset["datasets"]
    aggregators = args.aggregators or preset["aggregators"]
    scalarizers = preset["scalarizers"] if args.scalarizers is None else args.scalarizers
    representation = preset["representation"] if args.representation is None else args.representation
    seeds = args.seeds or preset["seeds"]
    rate = args.learning_rate or preset["learning_rate"]
    epochs = {d: args.epochs or preset["epochs"][d] for d in datasets}
    train_pairs = preset.get("train_pairs")
    started = time.perf_counter()

    jobs = []
    for dataset in datasets:
        task_names = [t.name for t in load(dataset, train_pairs).tasks]
        methods = (
            [("single_task", name) for name in task_names]
            + [("aggregator", name) for name in aggregators]
            + [("representation", name) for name in representation]
            + [("scalarizer", name) for name in scalarizers]
        )
        for kind, name in methods:
            for seed in range(seeds):
                jobs.append(Job(dataset, kind, name, seed, epochs[dataset], rate, train_pairs))
    runs = run_jobs(run, jobs, args.workers, args.threads)

    report = {
        **provenance(args),
        "settings": {
            "quick": args.quick,
            "datasets": datasets,
            "aggregators": list(aggregators),
            "representation": list(representation),
            "scalarizers": list(scalarizers),
            "epochs": epochs,
            "seeds": seeds,
            "learning_rate": rate,
            "workers": args.workers,
        },
        "summary": summarise(runs, datasets, train_pairs),
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "multitask_curves.png"
    plot_curves(
        {dataset: d["curves"] for dataset, d in report["summary"].items()},
        str(figure),
        ylabel="mean task loss on the training set",
    )
    write_outputs(report, "multitask", markdown(report), figure, args)
    return report


if __name__ == "__main__":
    main()
