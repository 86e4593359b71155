"""Direct Preference Optimization with TRL's DPOTrainer by Jacobian descent: one DPO loss per preference pair.

DPO (Rafailov et al., 2023, arXiv:2305.18290) raises the policy's log-probability of the chosen answer
relative to the rejected one, measured against a frozen reference model. TRL's loss is the mean over pairs;
``JDDPOTrainer`` keeps one loss per pair, and ``--aggregator`` combines the per-pair gradients (UPGrad by
default); ``--aggregator mean`` takes TRL's own step. ``--loss_type`` takes any per-pair loss type of TRL
(``sigmoid``, ``ipo``, ``hinge``, ``robust``, ``apo_zero``, …, or a list with ``--loss_weights``); those
that couple the pairs of a batch (``aot``, ``aot_unpaired``) are refused.

    python examples/trl_dpo.py --help
    python examples/trl_dpo.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/ultrafeedback_binarized --max_train_samples 2000 --output_dir outputs/dpo
    python examples/trl_dpo.py --offline_smoke   # no network: a tiny Llama, hand-made pairs
    python examples/trl_dpo.py --offline_smoke --use_peft   # LoRA: the reference is the frozen initial adapter
"""

from __future__ import annotations

import copy
import sys
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
from hf_jd.trl import JDDPOConfig, JDDPOTrainer


@dataclass
class ModelArguments:
    """The policy to train (its frozen copy is the reference)."""

    model_name_or_path: str = field(
        default="Qwen/Qwen2.5-0.5B-Instruct", metadata={"help": "Hub name or local path."}
    )
    use_peft: bool = field(
        default=False,
        metadata={
            "help": "Train LoRA adapters (r=8 on the attention projections); the reference is the initial adapter."
        },
    )
    offline_smoke: bool = field(
        default=False,
        metadata={
            "help": "Offline smoke run: a tiny model of the same family, in-memory pairs, a few steps."
        },
    )


@dataclass
class DataArguments:
    """Preference data: ``prompt`` / ``chosen`` / ``rejected`` columns."""

    dataset_name: str = field(
        default="trl-lib/ultrafeedback_binarized", metadata={"help": "Hub dataset name."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})


SMOKE_DEFAULTS = {"max_length": 32}

_GOOD = ["good", "great", "fine", "lovely", "superb", "pleasant"]
_BAD = ["bad", "awful", "poor", "dull", "boring", "terrible"]
_THINGS = ["movie", "film", "story", "plot", "cast", "ending"]


def smoke_pairs(n: int = 32) -> DatasetDict:
    """Hand-made pairs: the chosen answer praises the thing asked about, the rejected one complains."""
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        thing = _THINGS[i % len(_THINGS)]
        rows["prompt"].append(f"how was the {thing} ?")
        rows["chosen"].append(f" the {thing} was {_GOOD[i % len(_GOOD)]} </s>")
        rows["rejected"].append(
            " it was " + " and ".join(_BAD[(i + j) % len(_BAD)] for j in range(1 + i % 3)) + " </s>"
        )
    full = Dataset.from_dict(rows)
    return DatasetDict(train=full.select(range(n - 8)), validation=full.select(range(n - 8, n)))


def load_data(model_args: ModelArguments, data_args: DataArguments) -> DatasetDict:
    if model_args.offline_smoke:
        return smoke_pairs()
    with hub_access(f"the data set {data_args.dataset_name!r}"):
        raw = load_dataset(data_args.dataset_name)
    return DatasetDict(train=raw["train"], validation=raw["test"]) if "test" in raw else raw


def lora_config() -> Any:
    """LoRA on the attention projections (needs ``pip install peft``; ``run_example`` turns its absence into one line)."""
    from peft import LoraConfig

    return LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train the policy by DPO, evaluate it and save it; return the train and eval metrics."""
    parser = HfArgumentParser((ModelArguments, DataArguments, JDDPOConfig))
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
        model = AutoModelForCausalLM.from_config(tiny_config(model_args.model_name_or_path, tokenizer))
    else:
        with hub_access(f"the model {model_args.model_name_or_path!r}"):
            tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
            model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    peft_config = lora_config() if model_args.use_peft else None
    trainer = JDDPOTrainer(
        model=model,
        # with LoRA the reference is the frozen initial adapter; otherwise a frozen copy of the policy
        ref_model=None if peft_config is not None else copy.deepcopy(model).eval(),
        args=training_args,
        train_dataset=raw["train"],
        eval_dataset=raw.get("validation"),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    metrics = dict(trainer.train().metrics)
    if "validation" in raw:
        metrics.update(trainer.evaluate())
    trainer.log_metrics("all", metrics)
    trainer.save_model()
    return metrics


if __name__ == "__main__":
    raise SystemExit(run_example(main))
