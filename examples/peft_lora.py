"""LoRA fine-tuning with Jacobian descent on the adapter parameters only (``JDTrainer(peft_config=...)``).

The base model is frozen; ``peft_config`` wraps it in LoRA adapters (as TRL's trainers do), so the
Jacobian has one column per *adapter* parameter (and per parameter of the classifier head, kept
trainable through ``modules_to_save``): JD aggregates the per-example gradients of a few hundred
thousand parameters instead of the whole model. Needs ``pip install peft`` (``pip install 'hf-jd[peft]'``).

    python examples/peft_lora.py --help
    python examples/peft_lora.py --model_name_or_path FacebookAI/roberta-base --dataset_config_name mrpc \\
        --output_dir outputs/mrpc-lora
    python examples/peft_lora.py --config peft_lora --offline_smoke   # no network
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
from datasets import DatasetDict, load_dataset
from transformers import (
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
    """The base model and its adapters."""

    model_name_or_path: str = field(
        default="FacebookAI/roberta-base", metadata={"help": "Hub name or local path."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module names to adapt (default: PEFT's choice for the model family)."
        },
    )
    offline_smoke: bool = field(
        default=False,
        metadata={"help": "Offline smoke run: a tiny model of the same family, in-memory data, a few steps."},
    )


@dataclass
class DataTrainingArguments:
    """GLUE-style classification data."""

    dataset_name: str = field(default="nyu-mll/glue", metadata={"help": "Hub dataset name."})
    dataset_config_name: str | None = field(default="mrpc", metadata={"help": "Dataset configuration."})
    text_column_names: str = field(
        default="sentence1,sentence2", metadata={"help": "Comma-separated text columns."}
    )
    label_column_name: str = field(default="label", metadata={"help": "The label column."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})


SMOKE_DEFAULTS = {"max_seq_length": 16}


def load_data(model_args: ModelArguments, data_args: DataTrainingArguments) -> tuple[DatasetDict, list[str]]:
    """The splits and the text columns."""
    columns = [name.strip() for name in data_args.text_column_names.split(",")]
    if model_args.offline_smoke:  # in-memory data with the requested columns
        data = smoke_data.text_classification(text_columns=columns, label_column=data_args.label_column_name)
        return data, columns
    with hub_access(f"the data set {data_args.dataset_name!r}"):
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name), columns


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Fine-tune the adapters, evaluate and save them; return the metrics and the parameter counts."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, JDTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args = parse_args_with_config(parser, argv, SMOKE_DEFAULTS)
    from peft import LoraConfig, TaskType  # after the arguments: --help works without PEFT

    if model_args.offline_smoke:
        offline_environment()
    set_seed(training_args.seed)

    raw, text_columns = load_data(model_args, data_args)
    labels = raw["train"].features[data_args.label_column_name].names
    if model_args.offline_smoke:
        tokenizer = smoke_tokenizer(raw, text_columns)
        config = tiny_config(model_args.model_name_or_path, tokenizer, num_labels=len(labels))
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        with hub_access(f"the model {model_args.model_name_or_path!r}"):
            tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(
                model_args.model_name_or_path, num_labels=len(labels)
            )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id

    def preprocess(batch: dict) -> dict:
        encoded = tokenizer(
            *[batch[c] for c in text_columns], truncation=True, max_length=data_args.max_seq_length
        )
        encoded["labels"] = batch[data_args.label_column_name]
        return encoded

    with training_args.main_process_first(desc="tokenisation"):
        tokenized = raw.map(preprocess, batched=True, remove_columns=raw["train"].column_names)

    targets = model_args.lora_target_modules
    peft_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # keeps the new classifier head trainable (modules_to_save)
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=[name.strip() for name in targets.split(",")] if targets else None,
    )

    def compute_metrics(prediction) -> dict[str, float]:
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = JDTrainer(
        model=model,
        args=training_args,
        peft_config=peft_config,  # JD on the adapters (and the head) only; the base stays frozen
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    print(f"trainable parameters: {trainable} of {total} ({100 * trainable / total:.2f} %)")
    metrics = dict(trainer.train().metrics)
    metrics.update(trainer.evaluate())
    metrics.update(trainable_parameters=trainable, total_parameters=total)
    trainer.log_metrics("all", metrics)
    trainer.save_model()  # the adapters only (adapter_model.safetensors), with the model card
    return metrics


if __name__ == "__main__":
    raise SystemExit(run_example(main))
