"""A zoo of Hugging Face architectures the engine's rules were not written for (tiny configurations,
float64): the Gramian and the weighted gradient equal row-by-row autograd, whichever rules, broadcast
points, regions or fallbacks serve each model. With ``expand_broadcast=True`` first, as ``JDTrainer``
does, and without it when the model's code cannot take an expanded ``[1, ...]`` output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from gramian_oracles import rel_err, run_engine

V, B, L = 100, 4, 9
IDS = torch.randint(3, V, (B, L), generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (B,), generator=torch.Generator().manual_seed(1))


def pixels(side: int, channels: int = 3) -> torch.Tensor:
    return torch.randn(B, channels, side, side, generator=torch.Generator().manual_seed(2))


def seqcls(cls, cfg, **kw):
    model = cls(cfg(num_labels=3, **kw))
    return model, lambda: F.cross_entropy(model(input_ids=IDS).logits, Y, reduction="none")


def causal(cls, cfg, **kw):
    model = cls(cfg(**kw))

    def losses():
        logits = model(input_ids=IDS).logits
        token = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), IDS[:, 1:].reshape(-1), reduction="none"
        )
        return token.view(B, -1).mean(1)

    return model, losses


def imgcls(cls, cfg, side, **kw):
    model = cls(cfg(num_labels=3, **kw))
    return model, lambda: F.cross_entropy(
        model(pixel_values=pixels(side).double()).logits, Y, reduction="none"
    )


def s2s(cls, cfg, **kw):
    model = cls(cfg(**kw))

    def losses():
        logits = model(input_ids=IDS, labels=IDS).logits
        token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), IDS.reshape(-1), reduction="none")
        return token.view(B, -1).mean(1)

    return model, losses


SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
#: GPT-J and CodeGen sizes (partial rotary embeddings).
ROTARY = dict(vocab_size=V, n_embd=16, n_layer=2, n_head=2, rotary_dim=4, n_positions=32)
#: BART-family encoder-decoder sizes (BART, mBART, Pegasus).
SEQ2SEQ = dict(
    vocab_size=V,
    d_model=16,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    max_position_embeddings=32,
)
CASES = {
    "roberta": lambda: seqcls(
        T.RobertaForSequenceClassification, T.RobertaConfig, vocab_size=V, max_position_embeddings=20, **SMALL
    ),
    "albert": lambda: seqcls(
        T.AlbertForSequenceClassification,
        T.AlbertConfig,
        vocab_size=V,
        embedding_size=8,
        max_position_embeddings=20,
        **SMALL,
    ),
    "distilbert": lambda: seqcls(
        T.DistilBertForSequenceClassification,
        T.DistilBertConfig,
        vocab_size=V,
        dim=16,
        n_layers=2,
        n_heads=2,
        hidden_dim=32,
        max_position_embeddings=20,
    ),
    "electra": lambda: seqcls(
        T.ElectraForSequenceClassification,
        T.ElectraConfig,
        vocab_size=V,
        embedding_size=8,
        max_position_embeddings=20,
        **SMALL,
    ),
    "xlnet": lambda: seqcls(
        T.XLNetForSequenceClassification,
        T.XLNetConfig,
        vocab_size=V,
        d_model=16,
        n_layer=2,
        n_head=2,
        d_inner=32,
    ),
    "funnel": lambda: seqcls(
        T.FunnelForSequenceClassification,
        T.FunnelConfig,
        vocab_size=V,
        block_sizes=[1, 1],
        d_model=16,
        n_head=2,
        d_head=8,
        d_inner=32,
    ),
    "mistral": lambda: causal(
        T.MistralForCausalLM,
        T.MistralConfig,
        vocab_size=V,
        num_key_value_heads=1,
        max_position_embeddings=32,
        **SMALL,
    ),
    "qwen2": lambda: causal(
        T.Qwen2ForCausalLM,
        T.Qwen2Config,
        vocab_size=V,
        num_key_value_heads=1,
        max_position_embeddings=32,
        **SMALL,
    ),
    "phi": lambda: causal(T.PhiForCausalLM, T.PhiConfig, vocab_size=V, max_position_embeddings=32, **SMALL),
    "gpt_neox": lambda: causal(
        T.GPTNeoXForCausalLM, T.GPTNeoXConfig, vocab_size=V, max_position_embeddings=32, **SMALL
    ),
    "bloom": lambda: causal(
        T.BloomForCausalLM, T.BloomConfig, vocab_size=V, hidden_size=16, n_layer=2, n_head=2
    ),
    "falcon": lambda: causal(
        T.FalconForCausalLM,
        T.FalconConfig,
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
    ),
    "gptj": lambda: causal(
        T.GPTJForCausalLM,
        T.GPTJConfig,
        **ROTARY,
    ),
    "codegen": lambda: causal(
        T.CodeGenForCausalLM,
        T.CodeGenConfig,
        **ROTARY,
    ),
    "bart": lambda: s2s(
        T.BartForConditionalGeneration,
        T.BartConfig,
        **SEQ2SEQ,
    ),
    "mbart": lambda: s2s(
        T.MBartForConditionalGeneration,
        T.MBartConfig,
        **SEQ2SEQ,
    ),
    "pegasus": lambda: s2s(
        T.PegasusForConditionalGeneration,
        T.PegasusConfig,
        **SEQ2SEQ,
    ),
    "deit": lambda: imgcls(
        T.DeiTForImageClassification, T.DeiTConfig, 16, image_size=16, patch_size=4, **SMALL
    ),
    "beit": lambda: imgcls(
        T.BeitForImageClassification,
        T.BeitConfig,
        16,
        image_size=16,
        patch_size=4,
        use_relative_position_bias=True,
        **SMALL,
    ),
    "dinov2": lambda: imgcls(
        T.Dinov2ForImageClassification, T.Dinov2Config, 16, image_size=16, patch_size=4, **SMALL
    ),
    "convnextv2": lambda: imgcls(
        T.ConvNextV2ForImageClassification,
        T.ConvNextV2Config,
        32,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_stages=2,
    ),
    "swinv2": lambda: imgcls(
        T.Swinv2ForImageClassification,
        T.Swinv2Config,
        32,
        image_size=32,
        patch_size=4,
        embed_dim=8,
        depths=[2, 1],
        num_heads=[2, 2],
        window_size=4,
    ),
    "segformer": lambda: imgcls(
        T.SegformerForImageClassification,
        T.SegformerConfig,
        32,
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        patch_sizes=[7, 3],
        strides=[4, 2],
        downsampling_rates=[1, 4],
    ),
    "poolformer": lambda: imgcls(
        T.PoolFormerForImageClassification,
        T.PoolFormerConfig,
        32,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_encoder_blocks=2,
        patch_sizes=[7, 3],
        strides=[4, 2],
        padding=[2, 1],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_exact_on_unseen_architectures(name):
    errors = []
    for expand in (True, False):
        torch.manual_seed(0)
        model, forward = CASES[name]()
        model.double()
        try:
            outcome = run_engine(model, forward, expand_broadcast=expand)
        except RuntimeError as error:  # the model's code refused the expanded output: retry without
            errors.append(error)
            continue
        assert rel_err(outcome.gramian, outcome.expected_gramian) <= 1e-10
        assert rel_err(outcome.grad, outcome.expected_grad) <= 1e-10
        return
    pytest.fail(f"{name}: {errors}")
