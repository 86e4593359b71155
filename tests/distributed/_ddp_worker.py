"""Worker launched by the distributed tests: ``python -m torch.distributed.run --nproc_per_node N``.

Trains a tiny model with JDTrainer in the mode given on the command line, then writes its
parameters (and any error) to ``<out>/rank<r>.pt``. Run with ``--nproc_per_node 1`` for references.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed._fixtures import TwoHeadModel, finish_worker, jd_args, regression_dataset, tiny_bert  # noqa: E402

from hf_jd import JDTrainer  # noqa: E402
from hf_jd.distributed import rank, world_size  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--objectives", default="per_example")
    parser.add_argument("--scope", default="global")
    parser.add_argument("--engine", default=os.environ.get("HF_JD_TEST_ENGINE", "auto"))
    parser.add_argument("--aggregator", default="upgrad")
    parser.add_argument("--gramian", default="exact", help="jd_gramian: 'exact' or 'representation'")
    parser.add_argument(
        "--scalarizer", default=None, help="train with this scalarizer instead of an aggregator"
    )
    parser.add_argument("--scalarizer_kwargs", default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nan_rank", type=int, default=-1, help="this rank's losses become NaN at step 1")
    parser.add_argument("--static_graph", action="store_true")
    options = parser.parse_args()

    torch.set_num_threads(1)
    per_task = options.objectives == "per_task"
    model = TwoHeadModel() if per_task else tiny_bert()
    args = jd_args(
        options.out,
        per_device_train_batch_size=options.batch,
        gradient_accumulation_steps=options.accumulation,
        max_steps=options.steps,
        jd_objectives=options.objectives,
        jd_scope=options.scope,
        jd_engine=options.engine,
        jd_gramian=options.gramian,
        aggregator=None if options.scalarizer else options.aggregator,
        scalarizer=options.scalarizer,
        scalarizer_kwargs=options.scalarizer_kwargs,
        jd_check_rank_consistency=True,
        ddp_static_graph=options.static_graph,
    )
    trainer = JDTrainer(model=model, args=args, train_dataset=regression_dataset(per_task))
    if options.nan_rank >= 0:
        original = trainer.compute_losses

        def poisoned(module, inputs):
            losses = original(module, inputs)
            if rank() == options.nan_rank and trainer.state.global_step == 1:
                losses = losses * torch.tensor(float("nan"))
            return losses

        trainer.compute_losses = poisoned
    error = None
    try:
        trainer.train()
    except FloatingPointError as caught:
        error = str(caught)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    scalarizer_state = trainer.scalarizer.state_dict() if trainer.scalarizer is not None else {}
    identical = True
    if world_size() > 1:
        state_tensors = [
            t.reshape(-1).float() for t in scalarizer_state.values() if isinstance(t, torch.Tensor)
        ]
        flat = torch.cat([p.reshape(-1) for p in params.values()] + state_tensors)
        gathered = [torch.empty_like(flat) for _ in range(world_size())]
        dist.all_gather(gathered, flat)
        identical = all(torch.equal(other, gathered[0]) for other in gathered)
    torch.save(
        {
            "params": params,
            "error": error,
            "global_step": trainer.state.global_step,
            "identical": identical,
            "scalarizer_state": scalarizer_state,
            "engine": trainer.jd_engine.name if trainer.jd_engine is not None else None,
        },
        os.path.join(options.out, f"rank{rank()}.pt"),
    )
    finish_worker()


if __name__ == "__main__":
    main()
