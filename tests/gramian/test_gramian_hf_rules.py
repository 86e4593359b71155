"""Hugging Face models whose layers used to take the generic path or the fallback: exact against
row-by-row autograd in float64 and float32, and none of their parameter tensors left on the fallback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gramian_oracles import VOCAB, assert_exact, labels, token_ids
from test_gramian_new_rules import DTYPES, rule_names
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
    OPTConfig,
    OPTForSequenceClassification,
    SwinConfig,
    SwinForImageClassification,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

BATCH = 4


def _image(model, side):
    pixels = torch.randn(BATCH, 3, side, side, generator=torch.Generator().manual_seed(0))
    y = labels(BATCH)
    return lambda: F.cross_entropy(model(pixel_values=pixels.to(model.dtype)).logits, y, reduction="none")


def convnext():
    config = ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3)
    model = ConvNextForImageClassification(config)
    return model, lambda: _image(model, 32)


def vit():
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    model = ViTForImageClassification(config)
    return model, lambda: _image(model, 16)


def t5():
    config = T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    model = T5ForConditionalGeneration(config)

    def forward():
        ids, targets = token_ids(BATCH, 7), token_ids(BATCH, 7, seed=3)

        def losses():
            logits = model(input_ids=ids, labels=targets).logits
            token = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), reduction="none")
            return token.view(BATCH, -1).mean(1)

        return losses

    return model, forward


def mpnet():
    config = MPNetConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        num_labels=3,
    )
    model = MPNetForSequenceClassification(config)

    def forward():
        ids, y = token_ids(BATCH, 9, low=2), labels(BATCH)
        return lambda: F.cross_entropy(model(input_ids=ids).logits, y, reduction="none")

    return model, forward


def _text(model):
    ids, y = token_ids(BATCH, 9, low=2), labels(BATCH)
    return lambda: F.cross_entropy(model(input_ids=ids).logits, y, reduction="none")


def opt():
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        ffn_dim=32,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
        num_labels=3,
        pad_token_id=1,
    )
    model = OPTForSequenceClassification(config)
    return model, lambda: _text(model)


def swin():
    # Two blocks in the first stage: the second one shifts its windows and masks across them.
    config = SwinConfig(
        image_size=32, patch_size=4, embed_dim=8, depths=[2, 1], num_heads=[2, 2], window_size=4, num_labels=3
    )
    model = SwinForImageClassification(config)
    return model, lambda: _image(model, 32)


def deberta_v2(**attention):
    config = DebertaV2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        relative_attention=True,
        position_buckets=8,
        max_relative_positions=16,
        pos_att_type=["p2c", "c2p"],
        num_labels=3,
        **attention,
    )
    model = DebertaV2ForSequenceClassification(config)
    return model, lambda: _text(model)


def deberta_v3():
    """DeBERTa-v3's settings: the attention's own key/query projections read the relative embeddings
    (``share_att_key``), which are layer-normed, and no absolute positions."""
    return deberta_v2(share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False)


#: Models that need ``expand_broadcast=False`` (Swin adds a ``[1, heads, N, N]`` bias to ``B·windows``
#: attention scores; DeBERTa-v2's relative embeddings are read by the encoder).
NO_EXPANSION = {"swin", "deberta-v2", "deberta-v3"}

#: model → the parameter-name fragments that must be served by a rule (not the fallback, not generic).
CASES = {
    "convnext": (convnext, ["layer_scale_parameter", "dwconv", "layernorm"]),
    "vit": (vit, ["cls_token", "embeddings.position_embeddings"]),
    "t5": (t5, ["relative_attention_bias", "layer_norm"]),
    "mpnet": (mpnet, ["relative_attention_bias"]),
    "opt": (opt, ["fc1", "fc2", "final_layer_norm", "embed_positions"]),
    "swin": (swin, ["q_proj", "k_proj", "v_proj", "o_proj", "relative_position_bias_table"]),
    "deberta-v2": (deberta_v2, ["intermediate.dense", "pos_key_proj", "pos_query_proj", "rel_embeddings"]),
    "deberta-v3": (deberta_v3, ["query_proj", "key_proj", "rel_embeddings", "encoder.LayerNorm"]),
}


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_exact(name, dtype, tol):
    torch.manual_seed(0)
    build, _ = CASES[name]
    model, forward = build()
    model.to(dtype)
    assert_exact(model, forward(), tol=tol, expand_broadcast=name not in NO_EXPANSION)


@pytest.mark.parametrize("name", list(CASES))
def test_off_the_fallback_and_the_generic_rule(name):
    torch.manual_seed(0)
    build, fragments = CASES[name]
    model, forward = build()
    served = rule_names(model, forward(), expand_broadcast=name not in NO_EXPANSION)
    left = [n for n, how in served.items() if how == "fallback"]
    assert not left, left
    for fragment in fragments:
        picked = {how for n, how in served.items() if fragment in n}
        assert picked and "generic" not in picked, (fragment, picked)
