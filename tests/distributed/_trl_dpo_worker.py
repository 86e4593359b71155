"""Worker of ``test_trl_dpo.py``: ``JDDPOTrainer`` on a tiny Llama and its frozen copy as the reference,
launched with ``torch.distributed.run``.

``--runs`` as in ``_trl_sft_worker.py`` (``batch`` counts preference pairs per device). Data: the pairs of
:data:`PAIRS` in order (sequential sampling), prompts and completions of different lengths (padded
batches). Writes ``<out>/rank<r>.pt``: name -> {params, identical, engine, global_step}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets import Dataset  # noqa: E402
from distributed._fixtures import finish_worker  # noqa: E402
from distributed._trl_sft_worker import common_settings, results_of  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402
from trl_trainers._tiny_llama import tiny_llama as llama_of  # noqa: E402

from hf_jd.cli import word_tokenizer  # noqa: E402
from hf_jd.distributed import rank  # noqa: E402

PAIRS = {
    "prompt": [
        "the movie was",
        "tell me about the plot",
        "the cast",
        "was the ending good",
        "how was the music",
        "the story",
        "was it long",
        "would you watch it again",
    ],
    "chosen": [
        " good and fine </s>",
        " it was lovely </s>",
        " was superb and great too </s>",
        " yes </s>",
        " fine </s>",
        " moving and kind </s>",
        " not at all </s>",
        " yes gladly </s>",
    ],
    "rejected": [
        " bad </s>",
        " dull and boring and poor </s>",
        " awful </s>",
        " no it was terrible </s>",
        " loud and poor </s>",
        " dull </s>",
        " far too long and slow </s>",
        " never </s>",
    ],
}


def tokenizer():
    return word_tokenizer([p + c for p, c in zip(PAIRS["prompt"], PAIRS["chosen"])] + PAIRS["rejected"])


def tiny_llama() -> LlamaForCausalLM:
    return llama_of(LlamaForCausalLM, 0, tokenizer=tokenizer())


def train(out: str, run: dict) -> dict:
    from hf_jd.trl import JDDPOConfig, JDDPOTrainer

    model = tiny_llama()
    reference = copy.deepcopy(model)
    with torch.no_grad():  # a policy away from its reference: the log-ratios (and the pair gradients) differ
        generator = torch.Generator().manual_seed(1)
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    args = JDDPOConfig(**common_settings(os.path.join(out, run["name"]), run), beta=0.5)
    trainer = JDDPOTrainer(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_dict({key: list(values) for key, values in PAIRS.items()}),
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
