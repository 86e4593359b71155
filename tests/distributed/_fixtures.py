"""Models, data and arguments shared by the distributed worker and the tests."""

from __future__ import annotations

import torch
from datasets import Dataset
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel

from hf_jd import JDTrainingArguments

VOCAB, SEQ = 64, 8


def _config(**overrides) -> BertConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    values.update(overrides)
    return BertConfig(**values)


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(_config())


class TwoHeadModel(nn.Module):
    """Shared encoder, a classification head and a regression head: two task losses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = BertModel(_config(), add_pooling_layer=False)
        self.head_a = nn.Linear(16, 3)
        self.head_b = nn.Linear(16, 1)

    def forward(self, input_ids, labels=None, targets=None):
        features = self.encoder(input_ids=input_ids).last_hidden_state[:, 0]
        losses = {
            "classification": nn.functional.cross_entropy(self.head_a(features), labels),
            "regression": nn.functional.mse_loss(self.head_b(features).squeeze(-1), targets),
        }
        return {"loss": losses}


def regression_dataset(per_task: bool, n: int = 48) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    columns = {
        "input_ids": torch.randint(0, VOCAB, (n, SEQ), generator=generator).tolist(),
        "labels": torch.randint(0, 3, (n,), generator=generator).tolist(),
    }
    if per_task:
        columns["targets"] = torch.randn(n, generator=generator).tolist()
    return Dataset.from_dict(columns)


def jd_args(output_dir: str, **overrides) -> JDTrainingArguments:
    values = dict(
        output_dir=output_dir,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return JDTrainingArguments(**values)


def finish_worker() -> None:
    """End a worker process once its results are saved: a barrier, then an immediate exit.

    ``destroy_process_group`` (and Accelerate's own clean-up at interpreter exit) can leave one gloo rank
    waiting for a peer that has already gone, which hangs the launch; ``os._exit`` skips both.
    """
    import os
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
