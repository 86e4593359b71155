"""Worker that trains several configurations one after the other in ONE launch (each launch of
``torch.distributed.run`` costs ~10 s): ``--runs '[{"name": ..., "batch": 4, ...}, ...]'``.

Each run's keys: ``name``, ``objectives`` (``per_example``), ``engine`` (``auto``), ``batch`` (4),
``accumulation`` (1), ``steps`` (3), ``dataset_size`` (48), ``even_batches`` (true), ``bf16`` (false),
``epochs`` (use ``num_train_epochs`` instead of ``max_steps``). Writes ``<out>/rank<r>.pt``: a dict
name -> {params, identical, engine, global_step, gramian_dtypes}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed._fixtures import TwoHeadModel, finish_worker, jd_args, regression_dataset, tiny_bert  # noqa: E402

from hf_jd import JDTrainer  # noqa: E402
from hf_jd.distributed import rank, world_size  # noqa: E402


def train(out: str, run: dict) -> dict:
    per_task = run.get("objectives", "per_example") == "per_task"
    model = TwoHeadModel() if per_task else tiny_bert()
    length = {"num_train_epochs": run["epochs"]} if "epochs" in run else {"max_steps": run.get("steps", 3)}
    args = jd_args(
        os.path.join(out, run["name"]),
        per_device_train_batch_size=run.get("batch", 4),
        gradient_accumulation_steps=run.get("accumulation", 1),
        jd_objectives=run.get("objectives", "per_example"),
        jd_scope="global",
        jd_engine=run.get("engine", "auto"),
        jd_check_rank_consistency=True,
        bf16=run.get("bf16", False),
        accelerator_config={"even_batches": run.get("even_batches", True)},
        **length,
    )
    dataset = regression_dataset(per_task, n=run.get("dataset_size", 48))
    trainer = JDTrainer(model=model, args=args, train_dataset=dataset)
    gramian_dtypes: list[str] = []
    if trainer.aggregator is not None:
        weighting = trainer.aggregator.gramian_weighting
        original = weighting.forward

        def recording(gramian: torch.Tensor) -> torch.Tensor:
            gramian_dtypes.append(str(gramian.dtype))
            return original(gramian)

        weighting.forward = recording  # type: ignore[method-assign]
    trainer.train()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    identical = True
    if world_size() > 1:
        gathered = [torch.empty_like(flat) for _ in range(world_size())]
        dist.all_gather(gathered, flat)
        identical = all(torch.equal(other, gathered[0]) for other in gathered)
    engine = trainer.jd_engine
    return {
        "params": params,
        "identical": identical,
        "engine": engine.name if engine is not None else None,
        "global_step": trainer.state.global_step,
        "gramian_dtypes": sorted(set(gramian_dtypes)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True)
    options = parser.parse_args()
    torch.set_num_threads(1)
    results = {run["name"]: train(options.out, run) for run in json.loads(options.runs)}
    torch.save(results, os.path.join(options.out, f"rank{rank()}.pt"))
    finish_worker()


if __name__ == "__main__":
    main()
