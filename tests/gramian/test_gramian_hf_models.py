"""Gramian and weighted gradient of Hugging Face models against the row-by-row brute force.

Every case checks both ``G = J Jᵀ`` and ``.grad = scale · Jᵀ w`` at relative error ≤ 1e-5 (float32).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gramian_oracles import VOCAB, assert_exact, causal_lm_losses, labels, padded, tiny_bert_config, token_ids
from transformers import (
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

BATCH, LENGTH = 4, 10
LENGTHS = [10, 6, 8, 3]  # right padding of the padded cases


def bert(**overrides) -> BertForSequenceClassification:
    dropout = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return BertForSequenceClassification(tiny_bert_config(**{**dropout, **overrides}))


def gpt2() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
        )
    )


def _classifier_forward(model, padding: bool, pad: int):
    ids = token_ids(BATCH, LENGTH, low=2)
    kwargs = {"input_ids": ids}
    if padding:
        ids, mask = padded(ids, LENGTHS, pad)
        kwargs = {"input_ids": ids, "attention_mask": mask}
    y = labels(BATCH)
    return lambda: F.cross_entropy(model(**kwargs).logits, y, reduction="none")


@pytest.mark.parametrize("padding", [False, True])
def test_bert_default_position_ids(padding):
    # BERT's default position_ids / token_type_ids are [1, T]: broadcast over the batch.
    model = bert()
    assert_exact(model, _classifier_forward(model, padding, pad=0))


@pytest.mark.parametrize("padding", [False, True])
def test_roberta(padding):
    config = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=20,
        num_labels=3,
        pad_token_id=1,
    )
    model = RobertaForSequenceClassification(config)
    assert_exact(model, _classifier_forward(model, padding, pad=1))


@pytest.mark.parametrize("padding", [False, True])
def test_distilbert(padding):
    config = DistilBertConfig(
        vocab_size=VOCAB,
        dim=32,
        n_layers=2,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=20,
        num_labels=3,
    )
    model = DistilBertForSequenceClassification(config)
    assert_exact(model, _classifier_forward(model, padding, pad=0))


@pytest.mark.parametrize("padding", [False, True])
def test_gpt2_with_tied_embeddings(padding):
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = token_ids(BATCH, LENGTH)
    kwargs = {"input_ids": ids}
    if padding:
        ids, mask = padded(ids, LENGTHS, pad=0)
        kwargs = {"input_ids": ids, "attention_mask": mask}
    assert_exact(model, lambda: causal_lm_losses(model(**kwargs).logits, ids))


@pytest.mark.parametrize("padding", [False, True])
def test_llama(padding):
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    ids = token_ids(BATCH, LENGTH)
    kwargs = {"input_ids": ids}
    if padding:
        ids, mask = padded(ids, LENGTHS, pad=0)
        kwargs = {"input_ids": ids, "attention_mask": mask}
    assert_exact(model, lambda: causal_lm_losses(model(**kwargs).logits, ids))


@pytest.mark.parametrize("length", [BATCH, 7])
def test_t5_encoder_decoder(length):
    # length == batch: the relative-attention-bias embedding sees a [q_len, k_len] bucket matrix
    # whose leading dimension equals the batch size without being the batch.
    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    model = T5ForConditionalGeneration(config)
    ids = token_ids(BATCH, length)
    targets = token_ids(BATCH, length, seed=3)

    def forward():
        logits = model(input_ids=ids, labels=targets).logits
        return (
            F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none")
            .view(BATCH, -1)
            .mean(1)
        )

    assert_exact(model, forward)


def test_vit_with_dropout():
    # cls_token / position_embeddings are used functionally by ViTEmbeddings (generic rule), whose
    # dropout must be replayed exactly; the patch projection is a Conv2d.
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        hidden_dropout_prob=0.2,
        attention_probs_dropout_prob=0.1,
    )
    model = ViTForImageClassification(config)
    pixels = torch.randn(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = labels(BATCH)
    assert_exact(model, lambda: F.cross_entropy(model(pixel_values=pixels).logits, y, reduction="none"))


@pytest.mark.parametrize(
    "engine_kwargs",
    [{"linear_strategy": "ghost"}, {"linear_strategy": "materialize"}, {"memory_budget_mb": 1e-3}],
    ids=["ghost", "materialize", "tiny-chunks"],
)
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_layer_strategies_agree(family, engine_kwargs):
    if family == "bert":
        model = bert()
        forward = _classifier_forward(model, padding=True, pad=0)
    else:
        model = gpt2()
        ids = token_ids(BATCH, LENGTH)
        forward = lambda: causal_lm_losses(model(input_ids=ids).logits, ids)  # noqa: E731
    assert_exact(model, forward, **engine_kwargs)
