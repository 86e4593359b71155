"""Token classification (NER) with Jacobian descent: Hugging Face's ``run_ner.py`` with ``Trainer`` →
``JDTrainer`` and ``TrainingArguments`` → ``JDTrainingArguments``.

Each *sentence* is one objective: its loss is the mean cross-entropy over its own labelled tokens
(``-100`` positions ignored), and the step aggregates the per-sentence gradients with ``--aggregator``.

    python examples/token_classification.py --help
    python examples/token_classification.py --model_name_or_path google-bert/bert-base-cased \\
        --dataset_name eriktks/conll2003 --output_dir outputs/conll2003
    python examples/token_classification.py --config token_classification --offline_smoke   # no network
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
from datasets import DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
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
        default="google-bert/bert-base-cased", metadata={"help": "Hub name or local path of the model."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store downloads."})
    offline_smoke: bool = field(
        default=False,
        metadata={"help": "Offline smoke run: a tiny model of the same family, in-memory data, a few steps."},
    )


@dataclass
class DataTrainingArguments:
    """What to train and evaluate on."""

    dataset_name: str = field(default="eriktks/conll2003", metadata={"help": "Hub dataset name."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration."})
    text_column_name: str = field(default="tokens", metadata={"help": "Column of pre-split words."})
    label_column_name: str = field(default="ner_tags", metadata={"help": "Column of word labels."})
    max_seq_length: int = field(default=256, metadata={"help": "Longer inputs are truncated."})
    label_all_tokens: bool = field(
        default=False, metadata={"help": "Label every sub-word of a word (else only the first one)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})


SMOKE_DEFAULTS = {"max_seq_length": 16}


def load_data(model_args: ModelArguments, data_args: DataTrainingArguments) -> DatasetDict:
    if model_args.offline_smoke:  # in-memory data with the requested columns
        return smoke_data.token_classification(
            text_column=data_args.text_column_name, label_column=data_args.label_column_name
        )
    with hub_access(f"the data set {data_args.dataset_name!r}"):
        return load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir
        )


def align_labels(word_ids: list[int | None], word_labels: list[int], label_all_tokens: bool) -> list[int]:
    """One label per token: the word's label on its first sub-word (every sub-word with
    ``label_all_tokens``), ``-100`` on special tokens and the other sub-words (ignored by the loss)."""
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(-100)
        elif word != previous or label_all_tokens:
            labels.append(word_labels[word])
        else:
            labels.append(-100)
        previous = word
    return labels


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Fine-tune, evaluate and save; return the train and eval metrics."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, JDTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args = parse_args_with_config(parser, argv, SMOKE_DEFAULTS)
    if model_args.offline_smoke:
        offline_environment()
    set_seed(training_args.seed)

    raw = load_data(model_args, data_args)
    label_names = raw["train"].features[data_args.label_column_name].feature.names
    id2label = dict(enumerate(label_names))
    label2id = {label: index for index, label in id2label.items()}
    if model_args.offline_smoke:
        tokenizer = smoke_tokenizer(raw, [data_args.text_column_name])
        config = tiny_config(model_args.model_name_or_path, tokenizer, num_labels=len(label_names))
        config.id2label, config.label2id = id2label, label2id
        model = AutoModelForTokenClassification.from_config(config)
    else:
        with hub_access(f"the model {model_args.model_name_or_path!r}"):
            tokenizer = AutoTokenizer.from_pretrained(
                model_args.model_name_or_path, cache_dir=model_args.cache_dir, add_prefix_space=True
            )
            config = AutoConfig.from_pretrained(
                model_args.model_name_or_path,
                num_labels=len(label_names),
                id2label=id2label,
                label2id=label2id,
            )
            model = AutoModelForTokenClassification.from_pretrained(
                model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir
            )

    def preprocess(batch: dict) -> dict:
        encoded = tokenizer(
            batch[data_args.text_column_name],
            truncation=True,
            max_length=data_args.max_seq_length,
            is_split_into_words=True,
        )
        encoded["labels"] = [
            align_labels(encoded.word_ids(index), word_labels, data_args.label_all_tokens)
            for index, word_labels in enumerate(batch[data_args.label_column_name])
        ]
        return encoded

    with training_args.main_process_first(desc="tokenisation"):
        tokenized = raw.map(preprocess, batched=True, remove_columns=raw["train"].column_names)
    train_dataset, eval_dataset = tokenized["train"], tokenized.get("validation")
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(data_args.max_train_samples, len(train_dataset))))
    if eval_dataset is not None and data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))

    def compute_metrics(prediction) -> dict[str, float]:
        predicted, gold = np.argmax(prediction.predictions, -1), prediction.label_ids
        labelled = gold != -100
        return {"token_accuracy": float((predicted[labelled] == gold[labelled]).mean())}

    trainer = JDTrainer(  # the only change from the stock script: Trainer → JDTrainer
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorForTokenClassification(tokenizer),
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
