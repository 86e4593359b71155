"""Worker of ``test_trl_sft.py``: ``JDSFTTrainer`` on a tiny Llama, launched with ``torch.distributed.run``.

``--runs '[{"name": ..., "batch": 2, ...}, ...]'`` trains each configuration in one launch (a launch costs
~10 s). Each run's keys: ``name``, ``batch`` (per device, 2), ``steps`` (2), ``engine`` (``auto``),
``scope`` (``global``), ``aggregator`` (``upgrad``). Data: the texts of :data:`TEXTS` in order
(``train_sampling_strategy="sequential"``: the ``k``-th global batch is the same on one process with
``batch · world_size`` examples per device as on ``world_size`` processes), padded batches (the texts
have different lengths). Writes ``<out>/rank<r>.pt``: name -> {params, identical, engine, global_step}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets import Dataset  # noqa: E402
from distributed._fixtures import finish_worker  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402
from trl_trainers._tiny_llama import tiny_llama as llama_of  # noqa: E402

from hf_jd.cli import word_tokenizer  # noqa: E402
from hf_jd.distributed import rank, world_size  # noqa: E402

#: Different lengths (1 to 9 words), so that every batch is padded, on one process and on each rank.
TEXTS = [
    "a b c d e f",
    "g h",
    "i j k l m n o p q",
    "b d f h j",
    "q p o",
    "c e g i k m",
    "n",
    "r s t u v w",
]


def tokenizer():
    return word_tokenizer(TEXTS + ["r s t u v w x y z"])


def tiny_llama() -> LlamaForCausalLM:
    return llama_of(LlamaForCausalLM, 0, tokenizer=tokenizer())


def common_settings(output_dir: str, run: dict) -> dict:
    """The arguments that the SFT and the DPO workers share (no clipping: the raw update is compared)."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=run.get("batch", 2),
        max_steps=run.get("steps", 2),
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        bf16=False,
        activation_checkpointing=False,
        report_to=[],
        logging_strategy="no",
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        train_sampling_strategy="sequential",
        aggregator=run.get("aggregator", "upgrad"),
        jd_engine=run.get("engine", "auto"),
        jd_scope=run.get("scope", "global"),
        jd_check_rank_consistency=True,
    )


def results_of(trainer, model: torch.nn.Module) -> dict:
    """The trained parameters, whether every rank holds the same ones bit for bit, the engine that served."""
    params = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
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
    }


def train(out: str, run: dict) -> dict:
    from hf_jd.trl import JDSFTConfig, JDSFTTrainer

    model = tiny_llama()
    args = JDSFTConfig(**common_settings(os.path.join(out, run["name"]), run), max_length=64)
    trainer = JDSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=tokenizer(),
    )
    trainer.train()
    return results_of(trainer, model)


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
