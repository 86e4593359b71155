"""Per-task JD step time for k = 2, 4, 8 tasks over a shared encoder, against the summed-loss step and TorchJD.

For a BERT-like encoder (built from a config, random weights) whose CLS features feed ``k`` linear
regression heads, one step of each variant is timed (forward + backward + writing ``.grad``; no optimizer):

* ``sum_loss``: ``(Σ_k L_k).backward()``, the stock multi-task baseline;
* ``hf_jd_gramian``: hf_jd's Gramian engine in per-task mode (the ``k × k`` Gramian from one batched
  backward, UPGrad weights, ``Jᵀw`` written from the captured activations: what ``JDTrainer`` runs);
* ``hf_jd_gramian_looped``: the same engine with its ``k`` task backward passes run one after the other
  instead of as one batched (``vmap``) backward — the crossover between the two;
* ``hf_jd_representation``: the representation Gramian (``jd_gramian="representation"``): UPGrad weights from
  the Gramian of the task gradients at the encoder's output (one batched backward through the heads), then
  one backward — an approximation of the JD step, not the same update;
* ``hf_jd_autojac``: ``hf_jd.autojac.mtl_backward`` + ``jac_to_grad(UPGrad())`` (explicit Jacobian);
* ``torchjd_autojac``: TorchJD's ``mtl_backward`` + ``jac_to_grad`` with its UPGrad (when torchjd is
  installed; its default projector needs qpsolvers, so a plain-quadprog projector is used).

Reported: the median step time over the timed steps (variants interleaved, one thread) and its ratio to
``sum_loss`` in the same run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_per_task.py            # k = 2, 4, 8
    .venv/bin/python benchmarks/bench_per_task.py --quick                      # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import BertConfig, BertModel

from hf_jd import autojac
from hf_jd.aggregation import UPGrad
from hf_jd.gramian import GramianEngine, RepresentationEngine


class MultiHead(nn.Module):
    """A shared BERT encoder and ``k`` linear regression heads on the CLS features."""

    def __init__(self, config: BertConfig, tasks: int) -> None:
        super().__init__()
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.heads = nn.ModuleList(nn.Linear(config.hidden_size, 1) for _ in range(tasks))

    def forward(self, input_ids: Tensor, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
        features = self.encoder(input_ids=input_ids).last_hidden_state[:, 0]
        losses = [
            ((head(features).squeeze(-1) - targets[:, k]) ** 2).mean() for k, head in enumerate(self.heads)
        ]
        return features, losses


def _torchjd_upgrad() -> object | None:
    try:
        import numpy as np
        import quadprog
        from torchjd import aggregation
        from torchjd.linalg import DualConeProjector
    except ImportError:
        return None

    class QuadprogProjector(DualConeProjector):
        def __call__(self, U: Tensor, G: Tensor) -> Tensor:
            trace = float(G.diagonal().sum())
            g = (G / trace if trace >= 1e-4 else torch.zeros_like(G)).double().numpy() + 1e-4 * np.eye(len(G))
            rows = [quadprog.solve_qp(g, np.zeros(len(g)), np.eye(len(g)), u)[0] for u in U.double().numpy()]
            return torch.as_tensor(np.stack(rows), dtype=G.dtype)

    return aggregation.UPGrad(projector=QuadprogProjector())


def variants(model: MultiHead, batch: dict[str, Tensor]) -> dict[str, Callable[[], None]]:
    """One step of each variant (it writes ``.grad``; the caller zeroes it)."""
    shared = list(model.encoder.parameters())
    upgrad = UPGrad()
    engine = GramianEngine(model, objectives="per_task")
    looped = GramianEngine(model, objectives="per_task")
    looped._batched.vmap_ok = False  # every task's backward on its own
    representation = RepresentationEngine(model, "encoder")

    def sum_loss() -> None:
        _, losses = model(**batch)
        torch.stack(losses).sum().backward()

    def jd_step(jd_engine: GramianEngine | RepresentationEngine) -> Callable[[], None]:
        def step() -> None:
            with jd_engine.capture():
                _, losses = model(**batch)
            stacked = torch.stack(losses)
            gramian = jd_engine.gramian(stacked)
            jd_engine.accumulate_grad(upgrad.gramian_weighting(gramian), 1.0)

        return step

    def hf_jd_autojac() -> None:
        features, losses = model(**batch)
        autojac.mtl_backward(losses, features=features)
        autojac.jac_to_grad(shared, upgrad)

    steps = {
        "sum_loss": sum_loss,
        "hf_jd_gramian": jd_step(engine),
        "hf_jd_gramian_looped": jd_step(looped),
        "hf_jd_representation": jd_step(representation),
        "hf_jd_autojac": hf_jd_autojac,
    }
    theirs = _torchjd_upgrad()
    if theirs is not None:
        from torchjd import autojac as tj_autojac

        def torchjd_autojac() -> None:
            features, losses = model(**batch)
            tj_autojac.mtl_backward(losses, features=features)
            tj_autojac.jac_to_grad(shared, theirs)

        steps["torchjd_autojac"] = torchjd_autojac
    return steps


def measure(tasks: int, options: argparse.Namespace) -> dict[str, float]:
    """Median step time (s) of every variant for ``tasks`` heads, variants interleaved step by step."""
    config = BertConfig(
        vocab_size=options.vocab,
        hidden_size=options.hidden,
        num_hidden_layers=options.layers,
        num_attention_heads=options.heads,
        intermediate_size=4 * options.hidden,
        max_position_embeddings=max(512, options.seq),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    device = torch.device(options.device)
    torch.manual_seed(0)
    model = MultiHead(config, tasks).to(device)
    generator = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(0, options.vocab, (options.batch, options.seq), generator=generator),
        "targets": torch.randn(options.batch, tasks, generator=generator),
    }
    batch = {name: value.to(device) for name, value in batch.items()}
    steps = variants(model, batch)
    if device.type != "cpu":
        steps.pop("torchjd_autojac", None)  # its quadprog projector runs on the CPU
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(options.warmup + options.steps):
        for name, step in steps.items():
            model.zero_grad(set_to_none=True)
            _synchronise(device)
            start = time.perf_counter()
            step()
            _synchronise(device)
            elapsed = time.perf_counter() - start
            if round_index >= options.warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="e.g. cuda (the GPU check)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 warm-up and 2 timed steps")
    options = parser.parse_args(argv)
    if options.quick:
        options.batch, options.seq, options.hidden, options.layers, options.heads = 4, 16, 32, 1, 2
        options.vocab, options.steps, options.warmup, options.tasks = 100, 2, 1, [2, 4]
    torch.set_num_threads(1)
    print(
        f"batch {options.batch}, seq {options.seq}, hidden {options.hidden}, layers {options.layers}; "
        f"median of {options.steps} steps after {options.warmup} warm-up; one thread; {options.device}\n"
    )
    print("| k | variant | step (s) | × sum_loss |\n|---:|---|---:|---:|")
    for tasks in options.tasks:
        medians = measure(tasks, options)
        for name, value in medians.items():
            print(f"| {tasks} | {name} | {value:.4f} | {value / medians['sum_loss']:.2f} |")


if __name__ == "__main__":
    main()
