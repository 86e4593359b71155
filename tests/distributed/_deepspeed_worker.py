"""Worker launched by the DeepSpeed tests: ``python -m torch.distributed.run --nproc_per_node N``.

Trains the tiny BERT of ``_fixtures`` under DeepSpeed ZeRO (``--stage``) with the stock ``Trainer`` or with
``JDTrainer``, from ``TrainingArguments(use_cpu=True, deepspeed=<dict>)`` (DeepSpeed's CPU accelerator over
gloo), then writes the full parameters (gathered under ZeRO-3) to ``<out>/rank<r>.pt``. ``--stage none``
trains without DeepSpeed (the references: one process on the global batch, or DDP).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed._fixtures import (  # noqa: E402
    TwoHeadModel,
    finish_worker,
    jd_args,
    regression_dataset,
    tiny_bert,
)
from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_jd import JDTrainer  # noqa: E402
from hf_jd.distributed import rank, world_size  # noqa: E402


def deepspeed_config(stage: int, bf16: bool = False) -> dict:
    """ZeRO ``stage`` with the optimizer the Trainer builds (SGD); batch sizes, accumulation and clipping
    from the arguments (``"auto"``); no ``train_batch_size`` (DeepSpeed derives it)."""
    zero = {"stage": stage}
    return {
        **({"bf16": {"enabled": "auto"}} if bf16 else {}),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }


def full_parameters(model: torch.nn.Module, stage: int | None) -> dict[str, torch.Tensor]:
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {name: p.detach().clone() for name, p in model.named_parameters()}
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def aggregator_state(trainer: Trainer) -> dict:
    aggregator = getattr(trainer, "_jd_aggregator", None)
    state = aggregator.state_dict() if aggregator is not None and hasattr(aggregator, "state_dict") else {}
    return {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in state.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", default="2", help="ZeRO stage 0-3, or 'none' (no DeepSpeed)")
    parser.add_argument("--trainer", choices=["stock", "jd"], default="jd")
    parser.add_argument("--aggregator", default="upgrad")
    parser.add_argument("--gramian", default="exact", help="jd_gramian: 'exact' or 'representation'")
    parser.add_argument("--scope", default="global")
    parser.add_argument("--objectives", default="per_example", help="'per_task': the two-head model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max_grad_norm", type=float, default=0.0)
    parser.add_argument(
        "--use_cpu", default="true", help="'false': the launch mistake (DeepSpeed without a GPU)"
    )
    parser.add_argument(
        "--save_steps", type=int, default=0, help="save a checkpoint every N steps (0: never)"
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (DeepSpeed's bf16: auto)")
    parser.add_argument("--resume", default=None, help="resume from this checkpoint directory")
    options = parser.parse_args()

    torch.set_num_threads(1)
    stage = None if options.stage == "none" else int(options.stage)
    settings = dict(
        use_cpu=options.use_cpu == "true",
        per_device_train_batch_size=options.batch,
        gradient_accumulation_steps=options.accumulation,
        max_steps=options.steps,
        max_grad_norm=options.max_grad_norm,
        save_strategy="steps" if options.save_steps else "no",
        save_steps=options.save_steps or 500,
        # The stock Trainer multiplies the loss of a model that accepts loss kwargs by the number of processes
        # (it assumes a token sum over num_items_in_batch); BERT's classification loss is already a mean, so
        # that would double the stock 2-process step. Off, the stock step is the mean over the global batch.
        average_tokens_across_devices=False,
        bf16=options.bf16,
        deepspeed=deepspeed_config(stage, options.bf16) if stage is not None else None,
    )
    per_task = options.objectives == "per_task"
    model = TwoHeadModel() if per_task else tiny_bert()
    data = regression_dataset(per_task)
    if options.trainer == "stock":
        reference = jd_args(options.out, **settings)
        stock_args = TrainingArguments(
            **{key: getattr(reference, key) for key in ("output_dir", "report_to")},
            logging_strategy="no",
            disable_tqdm=True,
            seed=0,
            learning_rate=reference.learning_rate,
            optim="sgd",
            lr_scheduler_type="constant",
            train_sampling_strategy="sequential",
            dataloader_num_workers=0,
            **settings,
        )
        trainer: Trainer = Trainer(model=model, args=stock_args, train_dataset=data)
        # BERT's forward takes **kwargs, so the stock Trainer expects its loss to be a token sum over
        # num_items_in_batch and skips the division by the accumulation steps; its loss is a mean, so say so.
        trainer.model_accepts_loss_kwargs = False
    else:
        args = jd_args(
            options.out,
            aggregator=options.aggregator,
            jd_scope=options.scope,
            jd_objectives=options.objectives,
            jd_gramian=options.gramian,
            **settings,
        )
        try:
            trainer = JDTrainer(model=model, args=args, train_dataset=data)
        except ValueError as refusal:  # what the tests expect to be refused, on every rank
            torch.save({"refusal": str(refusal)}, os.path.join(options.out, f"rank{rank()}.pt"))
            finish_worker()
            return
    trainer.train(resume_from_checkpoint=options.resume)
    params = full_parameters(trainer.model, stage)
    identical = True
    if world_size() > 1:
        flat = torch.cat([p.reshape(-1) for p in params.values()])
        gathered = [torch.empty_like(flat) for _ in range(world_size())]
        dist.all_gather(gathered, flat)
        identical = all(torch.equal(other, gathered[0]) for other in gathered)
    engine = getattr(trainer, "jd_engine", None)
    torch.save(
        {
            "params": params,
            "global_step": trainer.state.global_step,
            "identical": identical,
            "engine": engine.name if engine is not None else None,
            "backend": getattr(getattr(trainer, "_backend", None), "name", None),
            "aggregator_state": aggregator_state(trainer),
        },
        os.path.join(options.out, f"rank{rank()}.pt"),
    )
    finish_worker()


if __name__ == "__main__":
    main()
