"""How far the representation Gramian's step is from the exact per-task JD step, along training.

``jd_gramian="representation"`` weighs the tasks by ``G^z = C Cᵀ``, the Gramian of the task gradients at the
shared representation ``z`` (Sener & Koltun 2018's MGDA-UB), instead of the exact ``G = J Jᵀ`` of the task
gradients with respect to the shared parameters; the update is then ``Jᵀ w^z`` on the exact ``J``. On the
multi-task benchmark's task sets and models (``benchmarks/multitask.py``: MultiDigits with a CNN encoder,
cancer_mtl with an MLP encoder; Adam 1e-3, batch 32), a model is trained with the representation Gramian,
and at every ``--every``-th step the exact ``J`` of the batch is formed (row by row with autograd) and the
two updates compared on the shared parameters:

* ``cosine``: ``cos(Jᵀw^z, Jᵀw)``, with ``w = A(G)`` the exact JD step's weights;
* ``norm ratio``: ``‖Jᵀw^z‖ / ‖Jᵀw‖``;
* ``non-conflicting``: the fraction of measured steps on which ``J Jᵀ w^z ≥ 0`` — every task's loss decreases
  to first order, the property that defines a non-conflicting JD step (Quinton & Rey, arXiv:2406.16232) —
  checked on the exact ``J`` with a relative tolerance of 1e-6; the exact step ``J A(J)`` has it by
  construction for UPGrad and MGDA (its fraction is reported too, as a control).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_representation.py          # UPGrad and MGDA, 3 seeds
    .venv/bin/python benchmarks/bench_representation.py --quick                    # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _paper._data import MTL_DATASETS, Split  # noqa: E402
from _paper._models import MultiTaskModel  # noqa: E402
from torch import Tensor  # noqa: E402

from hf_jd.aggregation import get_aggregator  # noqa: E402
from hf_jd.gramian import RepresentationEngine  # noqa: E402

TOLERANCE = 1e-6


def task_jacobian(losses: Tensor, shared: list[torch.nn.Parameter]) -> Tensor:
    """``J`` of the task losses with respect to the shared parameters, one autograd call per task."""
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
        for loss in losses
    ]
    return torch.stack(rows)


def non_conflicting(J: Tensor, update: Tensor) -> bool:
    """``J update ≥ 0`` up to a relative tolerance (every task's first-order change is a decrease)."""
    products = J @ update
    scale = J.norm(dim=1) * update.norm()
    return bool((products >= -TOLERANCE * scale).all())


def measure(split: Split, aggregator_name: str, seed: int, epochs: int, every: int) -> list[dict[str, float]]:
    """Train with the representation Gramian; compare its update with the exact JD step every ``every`` steps."""
    model = MultiTaskModel(split.input_shape, split.tasks, seed)
    shared = [p for p in model.encoder.parameters() if p.requires_grad]
    engine = RepresentationEngine(model, "encoder")
    aggregator, exact_aggregator = get_aggregator(aggregator_name), get_aggregator(aggregator_name)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = split.train.tensors
    n = len(next(iter(data.values())))
    generator = torch.Generator().manual_seed(seed)
    records, step = [], 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - 31, 32):
            batch = {name: value[order[start : start + 32]] for name, value in data.items()}
            optimizer.zero_grad(set_to_none=True)
            with engine.capture():
                losses = torch.stack(list(model(**batch)["loss"].values()))
            representation_weights = aggregator.gramian_weighting(engine.gramian(losses))
            if step % every == 0:
                J = task_jacobian(losses, shared)
                exact = J.T @ exact_aggregator.gramian_weighting(J @ J.T)
                approximate = J.T @ representation_weights.to(J.dtype)
                records.append(
                    {
                        "cosine": float(torch.nn.functional.cosine_similarity(approximate, exact, dim=0)),
                        "norm_ratio": float(approximate.norm() / exact.norm()),
                        "non_conflicting": float(non_conflicting(J, approximate)),
                        "exact_non_conflicting": float(non_conflicting(J, exact)),
                    }
                )
            engine.accumulate_grad(representation_weights, 1.0)
            optimizer.step()
            step += 1
    return records


def _quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    low, high = ordered[int(0.1 * (len(ordered) - 1))], ordered[int(0.9 * (len(ordered) - 1))]
    return f"{statistics.median(ordered):.3f} [{low:.3f}, {high:.3f}]"


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--datasets", nargs="+", default=["multidigits", "cancer_mtl"], choices=sorted(MTL_DATASETS)
    )
    parser.add_argument("--aggregators", nargs="+", default=["upgrad", "mgda"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: 15 (multidigits), 30 (cancer_mtl)")
    parser.add_argument("--every", type=int, default=10, help="measure every N-th step")
    parser.add_argument("--quick", action="store_true", help="one seed, one epoch, every 4th step")
    options = parser.parse_args(argv)
    if options.quick:
        options.seeds, options.epochs, options.every = 1, 1, 4
    torch.set_num_threads(1)
    rows = [
        "| task set | aggregator | steps measured | cosine, median [10 %, 90 %] | norm ratio, median [10 %, 90 %] "
        "| non-conflicting (representation) | non-conflicting (exact) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for dataset in options.datasets:
        split = MTL_DATASETS[dataset]()
        epochs = options.epochs or {"multidigits": 15, "cancer_mtl": 30}[dataset]
        for name in options.aggregators:
            records = [
                record
                for seed in range(options.seeds)
                for record in measure(split, name, seed, epochs, options.every)
            ]
            share = sum(r["non_conflicting"] for r in records) / len(records)
            control = sum(r["exact_non_conflicting"] for r in records) / len(records)
            rows.append(
                f"| {dataset} | {name} | {len(records)} | {_quantiles([r['cosine'] for r in records])} | "
                f"{_quantiles([r['norm_ratio'] for r in records])} | {100 * share:.1f} % | {100 * control:.1f} % |"
            )
    print(f"{options.seeds} seed(s); Adam 1e-3, batch 32; measured every {options.every} steps\n")
    print("\n".join(rows))
    return rows


if __name__ == "__main__":
    main()
