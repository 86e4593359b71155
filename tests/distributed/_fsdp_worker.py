"""Worker of the FSDP2 tests: ``python -m torch.distributed.run --nproc_per_node 2 _fsdp_worker.py --out DIR``.

For each model and mode it runs one JD step (``jd_update``, as ``JDTrainer`` does) on a ``fully_shard``
copy of the model with :class:`FSDPGramianEngine`, each rank on its own examples, and the same step
unsharded in this process with :class:`GramianEngine` (the reference: one process on the concatenated
batch for the global scope; the mean of every rank's own step for the local scope). It writes, per
case, the largest difference between this rank's gradient shard and the matching rows of the
reference, and what the rank holds after the step, to ``<out>/rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed._fixtures import VOCAB, TwoHeadModel, finish_worker, jd_args, regression_dataset, tiny_bert  # noqa: E402

from hf_jd import JDTrainer  # noqa: E402
from hf_jd.aggregation import UPGrad  # noqa: E402
from hf_jd.distributed import FSDPGramianEngine, sharded_parameters  # noqa: E402
from hf_jd.gramian import GramianEngine  # noqa: E402
from hf_jd.trainer._jd_step import StepSettings, jd_update  # noqa: E402

BATCH, SEQ = 3, 6


class OwnForwardNorm(nn.LayerNorm):
    """A stock layer with its own forward: recorded at its ``F.layer_norm`` call, where FSDP2 passes the
    unsharded weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.unsqueeze(1)).squeeze(1)


class MLP(nn.Module):
    """Two affine layers (7 and 3 output rows: uneven shards on 2 ranks) and two task heads."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), OwnForwardNorm(7), nn.Linear(7, 3))
        self.head_a = nn.Linear(3, 1)
        self.head_b = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"a": self.head_a(h).squeeze(-1), "b": self.head_b(h).squeeze(-1)}


def batch(model_name: str, source: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + source)
    if model_name == "mlp":
        return {"x": torch.randn(BATCH, 5, generator=generator), "y": torch.randn(BATCH, generator=generator)}
    return {
        "input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator),
        "labels": torch.randint(0, 3, (BATCH,), generator=generator),
        "targets": torch.randn(BATCH, generator=generator),
    }


def concatenated(model_name: str, world: int) -> dict[str, torch.Tensor]:
    parts = [batch(model_name, r) for r in range(world)]
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def build(model_name: str, per_task: bool) -> nn.Module:
    if model_name == "mlp":
        return MLP()
    return TwoHeadModel() if per_task else tiny_bert()


def losses_of(
    model: nn.Module, model_name: str, per_task: bool, data: dict[str, torch.Tensor]
) -> torch.Tensor:
    if model_name == "mlp":
        out = model(data["x"])
        if per_task:
            return torch.stack([(out["a"] - data["y"]).pow(2).mean(), (out["b"] + data["y"]).pow(2).mean()])
        return (out["a"] - data["y"]).pow(2) + out["b"].pow(2)
    if per_task:
        task = model(input_ids=data["input_ids"], labels=data["labels"], targets=data["targets"])["loss"]
        return torch.stack(list(task.values()))
    logits = model(input_ids=data["input_ids"]).logits
    return nn.functional.cross_entropy(logits, data["labels"], reduction="none")


def shard(model: nn.Module, model_name: str) -> None:
    if model_name == "mlp":
        for module in (model.body[0], model.body[3], model.head_a):
            fully_shard(module)
    else:
        encoder = model.bert if hasattr(model, "bert") else model.encoder
        fully_shard(encoder.embeddings)
        for layer in encoder.encoder.layer:
            fully_shard(layer)
    fully_shard(model)


def step(engine, model, model_name, per_task, data, global_scope, scale: float = 0.5) -> None:
    with engine.capture():
        losses = losses_of(model, model_name, per_task, data)
    settings = StepSettings(per_task=per_task, global_scope=global_scope)
    jd_update(engine, UPGrad(), losses, scale, settings)


def reference(
    model_name: str, per_task: bool, scope: str, world: int, scale: float = 0.5
) -> dict[str, torch.Tensor]:
    """The unsharded step's gradient, in this process."""
    objectives = "per_task" if per_task else "per_example"
    model = build(model_name, per_task)
    engine = GramianEngine(model, objectives=objectives)
    sources = (
        [concatenated(model_name, world)]
        if scope == "global"
        else [batch(model_name, r) for r in range(world)]
    )
    for data in sources:
        step(engine, model, model_name, per_task, data, global_scope=False, scale=scale)
    count = 1 if scope == "global" else world
    return {name: p.grad / count for name, p in model.named_parameters()}


def run_case(model_name: str, per_task: bool, scope: str) -> dict[str, object]:
    rank, world = dist.get_rank(), dist.get_world_size()
    expected = reference(model_name, per_task, scope, world)
    model = build(model_name, per_task)
    shard(model, model_name)
    engine = FSDPGramianEngine(model, objectives="per_task" if per_task else "per_example", scope=scope)
    engine.check_supported()
    start = time.perf_counter()
    step(engine, model, model_name, per_task, batch(model_name, rank), global_scope=scope == "global")
    seconds = time.perf_counter() - start
    return compare(model, expected, seconds)


def coverage_case() -> dict[str, str]:
    """Which rule served each parameter of the sharded MLP (per example, local scope)."""
    model = build("mlp", False)
    shard(model, "mlp")
    engine = FSDPGramianEngine(model, objectives="per_example", scope="local")
    with engine.capture():
        losses = losses_of(model, "mlp", False, batch("mlp", dist.get_rank()))
    engine.gramian(losses)
    served = engine.coverage()
    engine.release()
    return served


def trainer_case(scope: str, out: str) -> dict[str, object]:
    """``JDTrainer.training_step`` on a ``fully_shard`` BERT routes to the FSDP2 engine (per example)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    expected = reference("bert", False, scope, world, scale=1.0)
    model = build("bert", False)
    shard(model, "bert")
    args = jd_args(out, per_device_train_batch_size=BATCH, jd_scope=scope, max_steps=1)
    trainer = JDTrainer(model=model, args=args, train_dataset=regression_dataset(False))
    trainer.current_gradient_accumulation_steps = 1
    data = batch("bert", rank)
    start = time.perf_counter()
    trainer.training_step(model, {"input_ids": data["input_ids"], "labels": data["labels"]})
    result = compare(model, expected, time.perf_counter() - start)
    result["engine"] = type(trainer.jd_engine).__name__
    result["choices"] = [str(choice) for choice in trainer._engines.choices]
    return result


def compare(model: nn.Module, expected: dict[str, torch.Tensor], seconds: float) -> dict[str, object]:
    rank, world = dist.get_rank(), dist.get_world_size()
    error = 0.0
    full_size, shard_shapes = [], {}
    for name, param in model.named_parameters():
        grad = param.grad
        assert isinstance(param, DTensor) and isinstance(grad, DTensor), name
        local = grad.to_local()
        chunk = -(-param.shape[0] // world)
        rows = expected[name][rank * chunk : (rank + 1) * chunk]
        assert local.shape == rows.shape == param.to_local().shape, (name, local.shape, rows.shape)
        error = max(error, float((local - rows).abs().max()) if local.numel() else 0.0)
        shard_shapes[name] = (tuple(param.to_local().shape), tuple(param.shape))
        if param.shape[0] >= world and param.to_local().shape[0] == param.shape[0]:
            full_size.append(name)
    unsharded_bytes = sum(
        info.unsharded.untyped_storage().nbytes() for info in sharded_parameters(model).values()
    )
    return {
        "error": error,
        "scale": max(float(g.abs().max()) for g in expected.values()),
        "full_size_local": full_size,
        "unsharded_bytes": unsharded_bytes,
        "shards": shard_shapes,
        "seconds": seconds,
    }


class Scaled(nn.Module):
    """A module with no specialised rule (the generic rule would re-run it with full parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class RootOwned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.bias


def refusals() -> dict[str, str]:
    """The messages of the setups the FSDP2 engine refuses."""
    messages = {}
    for key, model in (("generic", nn.Sequential(nn.Linear(4, 4), Scaled())), ("root", RootOwned())):
        fully_shard(model)
        try:
            FSDPGramianEngine(model).check_supported()
            messages[key] = ""
        except Exception as error:  # noqa: BLE001 - the test reads the message
            messages[key] = f"{type(error).__name__}: {error}"
    try:
        FSDPGramianEngine(MLP()).check_supported()
        messages["unsharded"] = ""
    except Exception as error:  # noqa: BLE001
        messages["unsharded"] = f"{type(error).__name__}: {error}"
    return messages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default="mlp,bert")
    options = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for model_name in options.models.split(","):
        for objectives in ("per_example", "per_task"):
            for scope in ("local", "global"):
                key = f"{model_name}-{objectives}-{scope}"
                results[key] = run_case(model_name, objectives == "per_task", scope)
    for scope in ("local", "global"):
        results[f"trainer-{scope}"] = trainer_case(scope, options.out)
    results["refusals"] = refusals()
    results["coverage"] = coverage_case()
    torch.save(results, os.path.join(options.out, f"rank{dist.get_rank()}.pt"))
    finish_worker()


if __name__ == "__main__":
    main()
