"""Offline smoke runs: a tiny model of the same family, a tokenizer built from the in-memory data, few steps.

``--offline_smoke`` makes every example (and ``hf-jd train`` on every recipe) run without the Hub: the
model comes from :func:`tiny_config` (the model family read from the name, e.g. ``bert-base-uncased`` →
a 2-layer BERT of width 32), the tokenizer from :func:`word_tokenizer` (a word-level tokenizer over the
smoke data), the data from :mod:`._smoke_data`, and the schedule from :data:`SMOKE_TRAINING_OVERRIDES`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from transformers import CONFIG_MAPPING, AutoConfig, PretrainedConfig, PreTrainedTokenizerFast

# A few optimizer steps, nothing written but the final model, no reporting: seconds on a CPU.
SMOKE_TRAINING_OVERRIDES: dict[str, Any] = {
    "max_steps": 3,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "logging_steps": 1,
    "save_strategy": "no",
    "eval_strategy": "no",
    "report_to": "none",
    "push_to_hub": False,
    "bf16": False,
    "fp16": False,
    "activation_checkpointing": False,
    "dataloader_num_workers": 0,
    "disable_tqdm": True,
}

# Width and depth of every tiny config; only the names a config class has are passed to it.
TINY_SIZES: dict[str, int] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 64,
    "hidden_dim": 64,  # DistilBERT's feed-forward width
    "ffn_dim": 64,  # OPT's
    "n_inner": 64,  # GPT-2's
    "max_position_embeddings": 128,
}
SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "cls_token": "<cls>",
    "sep_token": "<sep>",
    "mask_token": "<mask>",
}


def cpu_defaults() -> dict[str, Any]:
    """Defaults that only make sense without CUDA: no pinned memory (its warning is noise on a CPU)."""
    return {} if torch.cuda.is_available() else {"dataloader_pin_memory": False}


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def model_type_of(model_name_or_path: str) -> str:
    """The ``model_type`` of a Hub name or local path, without downloading weights.

    A local or cached ``config.json`` is read when there is one; otherwise the family is read from the
    name: the longest ``model_type`` contained in it (``Qwen/Qwen2.5-0.5B`` → ``qwen2``,
    ``google-bert/bert-base-uncased`` → ``bert``).
    """
    try:
        return AutoConfig.from_pretrained(model_name_or_path, local_files_only=True).model_type
    except (OSError, ValueError):
        pass
    base = _normalise(model_name_or_path.rsplit("/", 1)[-1])
    matches = [key for key in CONFIG_MAPPING if _normalise(key) and _normalise(key) in base]
    if not matches:
        raise ValueError(
            f"--offline_smoke cannot tell the model family of {model_name_or_path!r}; pass a name containing one "
            "of transformers' model types (bert, gpt2, llama, qwen2, ...) or a local folder with a config.json."
        )
    return max(matches, key=lambda key: len(_normalise(key)))


def tiny_config(
    model_name_or_path: str, tokenizer: PreTrainedTokenizerFast | None = None, **overrides: Any
) -> PretrainedConfig:
    """A small randomly initialisable config of ``model_name_or_path``'s family (2 layers, width 32).

    With ``tokenizer``, the vocabulary size and the special token ids are the tokenizer's.
    """
    model_type = model_type_of(model_name_or_path)
    reference = CONFIG_MAPPING[model_type]()
    values: dict[str, Any] = {
        key: value
        for key, value in TINY_SIZES.items()
        if hasattr(reference, key) and _settable(reference, key)
    }
    if tokenizer is not None:
        values["vocab_size"] = len(tokenizer)
        for token in ("pad", "bos", "eos", "cls", "sep", "unk", "mask"):
            key = f"{token}_token_id"
            token_id = getattr(tokenizer, key, None)
            if hasattr(reference, key) or token in ("pad", "bos", "eos"):
                values[key] = token_id
    values.update(overrides)
    return AutoConfig.for_model(model_type, **values)


def _settable(config: PretrainedConfig, key: str) -> bool:
    """Whether ``key`` can be passed to the config: not a read-only property (Falcon's ``head_dim``,
    derived from the width and the heads)."""
    attribute = getattr(type(config), key, None)
    return not (isinstance(attribute, property) and attribute.fset is None)


def word_tokenizer(texts: Iterable[str | list[str]], model_max_length: int = 128) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer whose vocabulary is every word of ``texts`` (lists are words already).

    It behaves like a Hub tokenizer for the examples: padding, truncation, ``word_ids()`` for
    pre-split words, and the special tokens of :data:`SPECIAL_TOKENS`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS.values())}
    for text in texts:
        words = text if isinstance(text, list) else pre_tokenizers.WhitespaceSplit().pre_tokenize_str(text)
        for word in words:
            word = word if isinstance(word, str) else word[0]
            vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=model_max_length, **SPECIAL_TOKENS
    )


def smoke_tokenizer(data: Mapping[str, Any], columns: Iterable[str]) -> PreTrainedTokenizerFast:
    """:func:`word_tokenizer` over ``columns`` of every split of ``data`` (a ``DatasetDict``)."""
    columns = list(columns)
    return word_tokenizer(text for split in data.values() for column in columns for text in split[column])


def offline_environment() -> None:
    """Make sure nothing tries the network (smoke runs are offline by definition)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
