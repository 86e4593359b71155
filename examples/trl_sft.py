"""Supervised fine-tuning with TRL's ``SFTTrainer`` by Jacobian descent: one objective per conversation.

``JDSFTTrainer`` is TRL's ``SFTTrainer`` with hf_jd's step: each sequence (here a conversation, learned on
its assistant turns only with ``--assistant_only_loss``) is one objective, and ``--aggregator`` combines
their gradients. Every ``SFTConfig`` flag works (``--packing``, ``--padding_free``, ``--max_length``,
``--completion_only_loss`` …), next to hf_jd's (``--aggregator``, ``--jd_engine``,
``--jd_sft_objective_weighting``: ``sequence`` weighs every sequence the same, ``tokens`` makes
``--aggregator mean`` exactly TRL's token-weighted step).

    python examples/trl_sft.py --help
    python examples/trl_sft.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name trl-lib/Capybara \\
        --max_train_samples 2000 --output_dir outputs/trl_sft
    python examples/trl_sft.py --offline_smoke --output_dir outputs/trl_sft   # no network: tiny model, own data
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from datasets import Dataset, load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    set_seed,
)

from hf_jd.cli import (
    hub_access,
    offline_environment,
    parse_args_with_config,
    run_example,
    smoke_data,
    tiny_config,
    word_tokenizer,
)
from hf_jd.trl import JDSFTConfig, JDSFTTrainer

# A chat template with generation markers, so that TRL's assistant_only_loss can mask everything else.
SMOKE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }} </s>{% endgeneration %}"
    "{% else %}{{ message['content'] }} </s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


@dataclass
class ScriptArguments:
    """Which model and which conversations."""

    model_name_or_path: str = field(
        default="Qwen/Qwen2.5-0.5B-Instruct", metadata={"help": "Hub name or local path of a causal LM."}
    )
    dataset_name: str = field(
        default="trl-lib/Capybara",
        metadata={"help": "Hub dataset in a TRL format (e.g. a `messages` column)."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "The split to train on."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    offline_smoke: bool = field(
        default=False,
        metadata={
            "help": "Offline smoke run: a tiny model of the same family, in-memory conversations, a few steps."
        },
    )


SMOKE_DEFAULTS = {"max_length": 64, "assistant_only_loss": True}


def smoke_conversations() -> tuple[Dataset, PreTrainedTokenizerFast]:
    """In-memory conversations (a user instruction, the assistant's answer) and a word-level tokenizer with a
    chat template."""
    rows = smoke_data.instructions()["train"]
    messages = [
        [
            {"role": "user", "content": f"{row['instruction']} {row['input']}".strip()},
            {"role": "assistant", "content": row["output"]},
        ]
        for row in rows
    ]
    texts = [turn["content"] for conversation in messages for turn in conversation] + ["user assistant :"]
    tokenizer = word_tokenizer(texts)
    tokenizer.chat_template = SMOKE_CHAT_TEMPLATE
    return Dataset.from_dict({"messages": messages}), tokenizer


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Fine-tune and save; return the train metrics."""
    parser = HfArgumentParser((ScriptArguments, JDSFTConfig))
    argv = list(sys.argv[1:] if argv is None else argv)
    script_args, training_args = parse_args_with_config(parser, argv, SMOKE_DEFAULTS)
    set_seed(training_args.seed)
    if script_args.offline_smoke:
        offline_environment()
        train, tokenizer = smoke_conversations()
        model = AutoModelForCausalLM.from_config(tiny_config(script_args.model_name_or_path, tokenizer))
    else:
        with hub_access(f"the data set {script_args.dataset_name!r}"):
            train = load_dataset(script_args.dataset_name, split=script_args.dataset_train_split)
        with hub_access(f"the model {script_args.model_name_or_path!r}"):
            tokenizer = AutoTokenizer.from_pretrained(script_args.model_name_or_path)
            model = AutoModelForCausalLM.from_pretrained(script_args.model_name_or_path)
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))

    trainer = JDSFTTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer)
    metrics = dict(trainer.train().metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_model()
    return metrics


if __name__ == "__main__":
    raise SystemExit(run_example(main))
