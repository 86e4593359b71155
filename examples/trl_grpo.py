"""Group Relative Policy Optimization with TRL's GRPOTrainer by Jacobian descent: one loss per completion.

GRPO (Shao et al., 2024, DeepSeekMath, arXiv:2402.03300) samples ``--num_generations`` completions per prompt,
scores them with reward functions and raises the log-probability of the completions that beat their
prompt's mean reward (a clipped, advantage-weighted surrogate, optionally with a KL penalty ``--beta``
against a reference model). TRL's loss is a mean over completions; ``JDGRPOTrainer`` keeps one loss per
completion (``--jd_grpo_objectives prompt``: one per prompt group), and ``--aggregator`` combines their
gradients (UPGrad by default); ``--aggregator mean`` takes TRL's own step. ``--loss_type`` takes ``grpo``,
``bnpo``, ``dr_grpo`` (Liu et al., 2025, arXiv:2503.20783) or ``dapo`` (Yu et al., 2025, arXiv:2503.14476).

The reward here is a toy: the completion's count of the words of ``--reward_words`` (a real run passes its own
reward functions, or a reward model, to ``reward_funcs``).

    python examples/trl_grpo.py --help
    python examples/trl_grpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/tldr --max_train_samples 512 --output_dir outputs/grpo
    python examples/trl_grpo.py --offline_smoke   # no network: a tiny Llama, hand-made prompts
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed

from hf_jd.cli import (
    hub_access,
    offline_environment,
    parse_args_with_config,
    run_example,
    tiny_config,
    word_tokenizer,
)
from hf_jd.trl import JDGRPOConfig, JDGRPOTrainer


@dataclass
class ModelArguments:
    """The policy to train."""

    model_name_or_path: str = field(
        default="Qwen/Qwen2.5-0.5B-Instruct", metadata={"help": "Hub name or local path."}
    )
    offline_smoke: bool = field(
        default=False,
        metadata={
            "help": "Offline smoke run: a tiny model of the same family, in-memory prompts, a few steps."
        },
    )


@dataclass
class DataArguments:
    """Prompts (a ``prompt`` column) and the toy reward."""

    dataset_name: str = field(default="trl-lib/tldr", metadata={"help": "Hub dataset name."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    reward_words: str = field(
        default="good,great",
        metadata={"help": "Comma-separated words; the reward is how many of them a completion holds."},
    )


SMOKE_DEFAULTS = {"num_generations": 2, "max_completion_length": 8}

_THINGS = ["movie", "film", "story", "plot", "cast", "ending"]
_ANSWER_WORDS = ["good", "great", "bad", "dull", "fine", "the", "was", "</s>"]


def smoke_prompts(n: int = 24) -> DatasetDict:
    """Hand-made prompts asking about a thing."""
    full = Dataset.from_dict({"prompt": [f"how was the {_THINGS[i % len(_THINGS)]} ?" for i in range(n)]})
    return DatasetDict(train=full.select(range(n - 4)), validation=full.select(range(n - 4, n)))


def load_data(model_args: ModelArguments, data_args: DataArguments) -> DatasetDict:
    if model_args.offline_smoke:
        return smoke_prompts()
    with hub_access(f"the data set {data_args.dataset_name!r}"):
        raw = load_dataset(data_args.dataset_name)
    return DatasetDict(train=raw["train"], validation=raw["test"]) if "test" in raw else raw


def word_count_reward(words: list[str]) -> Callable[..., list[float]]:
    """A reward function counting the given words in each (plain-text) completion."""
    wanted = {word.strip().lower() for word in words if word.strip()}

    def reward(completions: list[Any], **kwargs: Any) -> list[float]:
        texts = [c if isinstance(c, str) else " ".join(m.get("content", "") for m in c) for c in completions]
        return [float(sum(word.strip(".,!?").lower() in wanted for word in text.split())) for text in texts]

    reward.__name__ = "word_count"
    return reward


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train the policy by GRPO, evaluate it and save it; return the train and eval metrics."""
    parser = HfArgumentParser((ModelArguments, DataArguments, JDGRPOConfig))
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args = parse_args_with_config(parser, argv, SMOKE_DEFAULTS)
    if model_args.offline_smoke:
        offline_environment()
    set_seed(training_args.seed)

    raw = load_data(model_args, data_args)
    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(data_args.max_train_samples, len(raw["train"]))))
    if model_args.offline_smoke:
        texts = [row["prompt"] for split in raw.values() for row in split] + [" ".join(_ANSWER_WORDS)]
        tokenizer = word_tokenizer(texts)
        model = AutoModelForCausalLM.from_config(tiny_config(model_args.model_name_or_path, tokenizer))
    else:
        with hub_access(f"the model {model_args.model_name_or_path!r}"):
            tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
            model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    trainer = JDGRPOTrainer(
        model=model,
        reward_funcs=word_count_reward(data_args.reward_words.split(",")),
        args=training_args,
        train_dataset=raw["train"],
        eval_dataset=raw.get("validation"),
        processing_class=tokenizer,
    )
    metrics = dict(trainer.train().metrics)
    if "validation" in raw:
        metrics.update(trainer.evaluate())
    trainer.log_metrics("all", metrics)
    trainer.save_model()
    return metrics


if __name__ == "__main__":
    raise SystemExit(run_example(main))
