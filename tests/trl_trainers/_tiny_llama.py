"""The tiny Llama of the TRL trainer tests (1 layer, width 16), built from a config with a given tokenizer's
special tokens; one definition for the tests, the stand-in tests and the two-process workers."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig


def tiny_llama_config(tokenizer: Any = None, vocab_size: int | None = None, **overrides: Any) -> LlamaConfig:
    """1 layer × hidden 16, 2 heads, intermediate 32, 64 positions; the vocabulary and special tokens of
    ``tokenizer`` (or ``vocab_size``); ``overrides`` set any other field (``num_labels``, ...)."""
    values: dict[str, Any] = dict(
        vocab_size=len(tokenizer) if tokenizer is not None else vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if tokenizer is not None:
        values.update(
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(model_class: type, seed: int = 0, **config: Any) -> Any:
    """``model_class`` (``LlamaForCausalLM``, ``LlamaForSequenceClassification``) on :func:`tiny_llama_config`,
    its weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return model_class(tiny_llama_config(**config))
