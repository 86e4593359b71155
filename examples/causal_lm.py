"""Causal-LM fine-tuning on instructions with Jacobian descent: one loss per sequence.

Each example is a prompt and a response; only the response is learned (the prompt's labels are
``-100``), batches are padded (never packed: packing would merge several examples into one row, hence
into one objective). hf_jd's per-example loss of a sequence is the mean cross-entropy over *its own*
response tokens, and the step aggregates the per-sequence gradients with ``--aggregator``.

Why the logged ``loss`` differs from the stock ``Trainer``'s: the stock loss is the mean over all
response tokens of the batch (a long response weighs more), hf_jd logs the mean of the per-sequence
means (every sequence weighs the same, whatever its length). They agree only when every response has
the same number of tokens; even ``--aggregator mean`` optimises the per-sequence mean.

    python examples/causal_lm.py --help
    python examples/causal_lm.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name tatsu-lab/alpaca \\
        --max_train_samples 2000 --output_dir outputs/alpaca
    python examples/causal_lm.py --config causal_lm --offline_smoke   # no network
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from datasets import DatasetDict, load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
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

PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass
class ModelArguments:
    """Which model to fine-tune."""

    model_name_or_path: str = field(default="Qwen/Qwen2.5-0.5B", metadata={"help": "Hub name or local path."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store downloads."})
    offline_smoke: bool = field(
        default=False,
        metadata={"help": "Offline smoke run: a tiny model of the same family, in-memory data, a few steps."},
    )


@dataclass
class DataTrainingArguments:
    """Instruction data: ``instruction`` / ``input`` / ``output`` columns (Alpaca's layout)."""

    dataset_name: str = field(default="tatsu-lab/alpaca", metadata={"help": "Hub dataset name."})
    instruction_column: str = field(default="instruction", metadata={"help": "The instruction column."})
    input_column: str = field(default="input", metadata={"help": "Optional context column ('' if none)."})
    output_column: str = field(default="output", metadata={"help": "The response column."})
    max_seq_length: int = field(default=512, metadata={"help": "Prompt + response are truncated to this."})
    validation_fraction: float = field(
        default=0.02, metadata={"help": "Held-out fraction when the dataset has no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})


SMOKE_DEFAULTS = {"max_seq_length": 48}


def load_data(model_args: ModelArguments, data_args: DataTrainingArguments, seed: int) -> DatasetDict:
    if model_args.offline_smoke:  # in-memory data with the requested columns
        return smoke_data.instructions(
            instruction_column=data_args.instruction_column,
            input_column=data_args.input_column,
            output_column=data_args.output_column,
        )
    with hub_access(f"the data set {data_args.dataset_name!r}"):
        raw = load_dataset(data_args.dataset_name, cache_dir=model_args.cache_dir)
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=data_args.validation_fraction, seed=seed)
        raw = DatasetDict(train=split["train"], validation=split["test"])
    return raw


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Fine-tune, evaluate and save; return the train and eval metrics."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, JDTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args = parse_args_with_config(parser, argv, SMOKE_DEFAULTS)
    if model_args.offline_smoke:
        offline_environment()
    set_seed(training_args.seed)

    raw = load_data(model_args, data_args, training_args.seed)
    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(data_args.max_train_samples, len(raw["train"]))))

    def format_example(row: dict) -> dict:
        context = row.get(data_args.input_column) if data_args.input_column else None
        template = PROMPT if context else PROMPT_NO_INPUT
        prompt = template.format(instruction=row[data_args.instruction_column], input=context)
        return {"prompt": prompt, "completion": row[data_args.output_column]}

    texts = raw.map(format_example, remove_columns=raw["train"].column_names)
    if model_args.offline_smoke:
        tokenizer = smoke_tokenizer(texts, ["prompt", "completion"])
        model = AutoModelForCausalLM.from_config(tiny_config(model_args.model_name_or_path, tokenizer))
    else:
        with hub_access(f"the model {model_args.model_name_or_path!r}"):
            tokenizer = AutoTokenizer.from_pretrained(
                model_args.model_name_or_path, cache_dir=model_args.cache_dir
            )
            model = AutoModelForCausalLM.from_pretrained(
                model_args.model_name_or_path, cache_dir=model_args.cache_dir
            )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"

    def tokenize(row: dict) -> dict:
        """Prompt tokens get label -100: only the response (and the end-of-sequence token) is learned."""
        prompt = tokenizer(row["prompt"])["input_ids"]
        response = tokenizer(" " + row["completion"], add_special_tokens=False)["input_ids"]
        response = response + [tokenizer.eos_token_id]
        input_ids = (prompt + response)[: data_args.max_seq_length]
        labels = ([-100] * len(prompt) + response)[: data_args.max_seq_length]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}

    with training_args.main_process_first(desc="tokenisation"):
        tokenized = texts.map(tokenize, remove_columns=["prompt", "completion"])
    # A prompt longer than max_seq_length leaves no response token: that sequence has no loss.
    tokenized = tokenized.filter(lambda row: any(label != -100 for label in row["labels"]))

    trainer = JDTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized.get("validation"),
        processing_class=tokenizer,
        # pads input_ids with the pad token and labels with -100; no packing
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    metrics = dict(trainer.train().metrics)
    if "validation" in tokenized:
        metrics.update(trainer.evaluate())
    trainer.log_metrics("all", metrics)
    trainer.save_model()
    return metrics


if __name__ == "__main__":
    raise SystemExit(run_example(main))
