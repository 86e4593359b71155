"""Reward modelling with TRL's RewardTrainer by Jacobian descent: one Bradley–Terry loss per preference pair.

A reward model scores the chosen and the rejected answer of each pair; TRL's loss is the mean over pairs of
``-log σ(r_chosen − r_rejected − margin)`` (plus ``center_rewards_coefficient · (r_chosen + r_rejected)²``).
``JDRewardTrainer`` keeps one loss per pair, and ``--aggregator`` combines the per-pair gradients (UPGrad by
default: no pair's loss goes up to first order); ``--aggregator mean`` takes TRL's own step.

    python examples/trl_reward.py --help
    python examples/trl_reward.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/ultrafeedback_binarized --max_train_samples 2000 --output_dir outputs/reward
    python examples/trl_reward.py --offline_smoke   # no network: a tiny Llama, hand-made pairs
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict, load_dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    HfArgumentParser,
    set_seed,
)

from hf_jd.cli import (
    hub_access,
    offline_environment,
    parse_args_with_config,
    run_example,
    tiny_config,
    word_tokenizer,
)
from hf_jd.trl import JDRewardConfig, JDRewardTrainer


@dataclass
class ModelArguments:
    """Which model to train as a reward model (a sequence classifier with one output)."""

    model_name_or_path: str = field(
        default="Qwen/Qwen2.5-0.5B-Instruct", metadata={"help": "Hub name or local path."}
    )
    offline_smoke: bool = field(
        default=False,
        metadata={
            "help": "Offline smoke run: a tiny model of the same family, in-memory pairs, a few steps."
        },
    )


@dataclass
class DataArguments:
    """Preference data: ``chosen`` / ``rejected`` columns (and optionally ``prompt``, ``margin``)."""

    dataset_name: str = field(
        default="trl-lib/ultrafeedback_binarized", metadata={"help": "Hub dataset name."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})


SMOKE_DEFAULTS = {"max_length": 32}

_GOOD = ["good", "great", "fine", "lovely", "superb", "pleasant"]
_BAD = ["bad", "awful", "poor", "dull", "boring", "terrible"]
_THINGS = ["movie", "film", "story", "plot", "cast", "ending"]


def smoke_pairs(n: int = 32) -> DatasetDict:
    """Hand-made pairs: the chosen answer praises, the rejected one complains (a learnable preference), with
    a margin that grows with the praise's length."""
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "margin": []}
    for i in range(n):
        thing = _THINGS[i % len(_THINGS)]
        praise = [_GOOD[(i + j) % len(_GOOD)] for j in range(1 + i % 3)]
        rows["prompt"].append(f"how was the {thing} ?")
        rows["chosen"].append(" the " + thing + " was " + " and ".join(praise) + " </s>")
        rows["rejected"].append(" it was " + _BAD[i % len(_BAD)] + " </s>")
        rows["margin"].append(0.25 * len(praise))
    full = Dataset.from_dict(rows)
    return DatasetDict(train=full.select(range(n - 8)), validation=full.select(range(n - 8, n)))


def load_data(model_args: ModelArguments, data_args: DataArguments) -> DatasetDict:
    if model_args.offline_smoke:
        return smoke_pairs()
    with hub_access(f"the data set {data_args.dataset_name!r}"):
        raw = load_dataset(data_args.dataset_name)
    return DatasetDict(train=raw["train"], validation=raw["test"]) if "test" in raw else raw


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train the reward model, evaluate it and save it; return the train and eval metrics."""
    parser = HfArgumentParser((ModelArguments, DataArguments, JDRewardConfig))
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args = parse_args_with_config(parser, argv, SMOKE_DEFAULTS)
    if model_args.offline_smoke:
        offline_environment()
    set_seed(training_args.seed)

    raw = load_data(model_args, data_args)
    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(data_args.max_train_samples, len(raw["train"]))))
    if model_args.offline_smoke:
        texts = [
            row["prompt"] + row[key]
            for split in raw.values()
            for row in split
            for key in ("chosen", "rejected")
        ]
        tokenizer = word_tokenizer(texts)
        config = tiny_config(model_args.model_name_or_path, tokenizer, num_labels=1)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        with hub_access(f"the model {model_args.model_name_or_path!r}"):
            tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(
                model_args.model_name_or_path, num_labels=1
            )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    trainer = JDRewardTrainer(
        model=model,
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
