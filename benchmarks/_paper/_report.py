"""Markdown tables and loss-curve figures of the paper benchmarks (Figure 2 and Table 7 style of Quinton & Rey,
arXiv:2406.16232)."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _provenance import source_fingerprint

from ._stats import mean_and_standard_error


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align_right_from: int = 1) -> str:
    """A GitHub Markdown table; columns from ``align_right_from`` on are right-aligned."""
    rule = ["---" if i < align_right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(
    panels: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    path: str,
    ylabel: str = "training loss (mean over the training subset)",
    log_y: bool = True,
) -> None:
    """One panel per experiment, one curve per method: the mean over seeds, shaded ± one standard error.

    ``panels[experiment][method]`` is a list of per-seed curves (index = epoch, 0 = initialisation);
    non-finite curves (diverged seeds) are left out of the mean.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for axis, (experiment, methods) in zip(axes[0], panels.items()):
        for method, curves in methods.items():
            finite = [curve for curve in curves if all(math.isfinite(v) for v in curve)]
            if not finite:
                continue
            values = np.asarray(finite, dtype=float)
            stats = [mean_and_standard_error(values[:, e]) for e in range(values.shape[1])]
            mean = np.array([s[0] for s in stats])
            error = np.nan_to_num(np.array([s[1] for s in stats]))
            epochs = np.arange(len(mean))
            (line,) = axis.plot(epochs, mean, label=method, linewidth=1.4)
            axis.fill_between(epochs, mean - error, mean + error, color=line.get_color(), alpha=0.2)
        if log_y:
            axis.set_yscale("log")
        axis.set_title(experiment)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def add_run_options(parser: argparse.ArgumentParser, name: str) -> None:
    """The options every paper benchmark shares: the quick mode (read by :func:`write_outputs`), workers,
    threads and where the outputs go."""
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (the test suite runs it)")
    parser.add_argument("--workers", type=int, default=1, help="processes (one torch thread each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out-dir", default=f"benchmarks/results/{name}")
    parser.add_argument(
        "--figure-dir", default="benchmarks/figures", help="full mode: where the PNG is copied"
    )


def write_outputs(
    report: dict[str, Any], name: str, table: str, figure: Path, args: argparse.Namespace
) -> None:
    """``<name>.json`` and ``<name>.md`` in ``--out-dir``; the figure copied to ``--figure-dir`` in full mode."""
    out = Path(args.out_dir)
    if not args.quick:  # quick runs never overwrite the committed figures
        Path(args.figure_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(figure, Path(args.figure_dir) / figure.name)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=float))
    (out / f"{name}.md").write_text(table + "\n")
    print(table)


def provenance(args: argparse.Namespace) -> dict[str, str]:
    """The ``provenance`` (code) and ``machine`` fields every paper-benchmark report starts with."""
    return {
        "provenance": source_fingerprint(),
        "machine": f"{os.cpu_count()} CPU cores, {args.workers} worker(s) × {args.threads} torch thread(s), "
        f"torch {torch.__version__}",
    }
