"""Text classification (GLUE-style) with Jacobian descent: Hugging Face's ``run_classification.py`` with
``Trainer`` → ``JDTrainer`` and ``TrainingArguments`` → ``JDTrainingArguments``.

Every example of a batch is one objective (instance-wise risk minimisation): the step aggregates the
per-example gradients with ``--aggregator`` (UPGrad by default) instead of averaging the losses.

    python examples/text_classification.py --help
    python examples/text_classification.py --model_name_or_path google-bert/bert-base-uncased \\
        --dataset_name nyu-mll/glue --dataset_config_name sst2 --output_dir outputs/sst2
    python examples/text_classification.py --config text_classification --learning_rate 3e-5
    python examples/text_classification.py --config text_classification --offline_smoke   # no network
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
from datasets import DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    set_seed,
)

from hf_jd import JDTrainer, JDTrainingArguments
from hf_jd.cli import (
    hub_access,
    offline_environment,
    parse_args_with_config,
    run_example,
    smoke_data,
    smoke_tokenizer,
    tiny_config,
)


@dataclass
class ModelArguments:
    """Which model to fine-tune."""

    model_name_or_path: str = field(
        default="google-bert/bert-base-uncased", metadata={"help": "Hub name or local path of the model."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store downloads."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub."})
    offline_smoke: bool = field(
        default=False,
        metadata={"help": "Offline smoke run: a tiny model of the same family, in-memory data, a few steps."},
    )


@dataclass
class DataTrainingArguments:
    """What to train and evaluate on."""

    dataset_name: str = field(default="nyu-mll/glue", metadata={"help": "Hub dataset name."})
    dataset_config_name: str | None = field(default="sst2", metadata={"help": "Dataset configuration."})
    text_column_names: str = field(
        default="sentence", metadata={"help": "Comma-separated text columns (two for sentence pairs)."}
    )
    label_column_name: str = field(default="label", metadata={"help": "The label column."})
    validation_split_name: str = field(default="validation", metadata={"help": "Split used for evaluation."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})


# What --offline_smoke shrinks (the recipe's training schedule is shrunk by hf_jd.cli).
SMOKE_DEFAULTS = {"max_seq_length": 16}


def load_data(
    model_args: ModelArguments, data_args: DataTrainingArguments, text_columns: list[str]
) -> DatasetDict:
    if model_args.offline_smoke:  # in-memory data with the requested columns
        return smoke_data.text_classification(
            text_columns=text_columns,
            label_column=data_args.label_column_name,
            eval_split=data_args.validation_split_name,
        )
    with hub_access(f"the data set {data_args.dataset_name!r}"):
        return load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir
        )


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Fine-tune, evaluate and save; return the train and eval metrics."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, JDTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args = parse_args_with_config(parser, argv, SMOKE_DEFAULTS)
    if model_args.offline_smoke:
        offline_environment()
    set_seed(training_args.seed)

    text_columns = [name.strip() for name in data_args.text_column_names.split(",")]
    raw = load_data(model_args, data_args, text_columns)
    label_feature = raw["train"].features[data_args.label_column_name]
    labels = getattr(label_feature, "names", None) or sorted(set(raw["train"][data_args.label_column_name]))

    if model_args.offline_smoke:
        tokenizer = smoke_tokenizer(raw, text_columns)
        config = tiny_config(model_args.model_name_or_path, tokenizer, num_labels=len(labels))
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        with hub_access(f"the model {model_args.model_name_or_path!r}"):
            tokenizer = AutoTokenizer.from_pretrained(
                model_args.tokenizer_name or model_args.model_name_or_path, cache_dir=model_args.cache_dir
            )
            config = AutoConfig.from_pretrained(
                model_args.model_name_or_path, num_labels=len(labels), cache_dir=model_args.cache_dir
            )
            model = AutoModelForSequenceClassification.from_pretrained(
                model_args.model_name_or_path,
                config=config,
                cache_dir=model_args.cache_dir,
                trust_remote_code=model_args.trust_remote_code,
            )
    model.config.label2id = {str(label): index for index, label in enumerate(labels)}
    model.config.id2label = {index: str(label) for index, label in enumerate(labels)}
    if tokenizer.pad_token is None:  # decoder-only models (GPT-2, Llama) have none
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id

    def preprocess(batch: dict) -> dict:
        texts = [batch[column] for column in text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)
        encoded["labels"] = batch[data_args.label_column_name]
        return encoded

    with training_args.main_process_first(desc="tokenisation"):
        tokenized = raw.map(preprocess, batched=True, remove_columns=raw["train"].column_names)
    train_dataset, eval_dataset = tokenized["train"], tokenized.get(data_args.validation_split_name)
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(data_args.max_train_samples, len(train_dataset))))
    if eval_dataset is not None and data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))

    def compute_metrics(prediction) -> dict[str, float]:
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = JDTrainer(  # the only change from the stock script: Trainer → JDTrainer
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    metrics = dict(trainer.train().metrics)
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.log_metrics("all", metrics)
    trainer.save_model()
    return metrics


if __name__ == "__main__":
    raise SystemExit(run_example(main))
