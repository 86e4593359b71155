"""Per-example losses equal the model's own loss computed on each example alone."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

from hf_jd.losses import infer_loss_type, per_example_losses, task_losses

B, T, V = 3, 6, 40


def bert_config(**kw):
    return BertConfig(
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **kw,
    )


def _cases():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    token_labels = torch.randint(0, V, (B, T), generator=g)
    token_labels[0, :2] = -100
    token_labels[2, 3:] = -100
    yield (
        "sequence_classification",
        BertForSequenceClassification(bert_config(num_labels=3)),
        {"input_ids": ids, "labels": torch.tensor([0, 2, 1])},
    )
    yield (
        "multi_label_classification",
        BertForSequenceClassification(bert_config(num_labels=4, problem_type="multi_label_classification")),
        {"input_ids": ids, "labels": torch.randint(0, 2, (B, 4), generator=g).float()},
    )
    yield (
        "regression",
        BertForSequenceClassification(bert_config(num_labels=1)),
        {"input_ids": ids, "labels": torch.randn(B, generator=g)},
    )
    yield (
        "token_classification",
        BertForTokenClassification(bert_config(num_labels=5)),
        {"input_ids": ids, "labels": token_labels % 5 - 100 * (token_labels < 0)},
    )
    yield "masked_lm", BertForMaskedLM(bert_config()), {"input_ids": ids, "labels": token_labels}
    yield (
        "causal_lm",
        GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=16)),
        {"input_ids": ids, "labels": token_labels},
    )
    yield (
        "seq2seq_lm",
        T5ForConditionalGeneration(
            T5Config(
                vocab_size=V, d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2, decoder_start_token_id=0
            )
        ),
        {"input_ids": ids, "labels": token_labels},
    )
    yield (
        "image_classification",
        ViTForImageClassification(
            ViTConfig(
                image_size=8,
                patch_size=4,
                num_channels=1,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=16,
                num_labels=3,
            )
        ),
        {"pixel_values": torch.randn(B, 1, 8, 8, generator=g), "labels": torch.tensor([1, 0, 2])},
    )


CASES = list(_cases())


@pytest.mark.parametrize(("loss_type", "model", "batch"), CASES, ids=[case[0] for case in CASES])
def test_losses_equal_single_example_model_loss(loss_type, model, batch):
    model.eval()
    assert infer_loss_type(model) == loss_type
    with torch.no_grad():
        losses = per_example_losses(model(**batch), batch, loss_type)
        assert losses.shape == (B,)
        for i in range(B):
            single = {key: value[i : i + 1] for key, value in batch.items()}
            expected = model(**single).loss
            torch.testing.assert_close(losses[i], expected.float(), atol=1e-5, rtol=1e-5)


def test_task_losses_from_dict_tuple_and_vector():
    a, b = torch.tensor(1.0), torch.tensor(2.0)
    vector, names = task_losses({"loss": {"x": a, "y": b}})
    assert vector.tolist() == [1.0, 2.0] and names == ["x", "y"]
    vector, names = task_losses({"losses": (a, b)})
    assert vector.tolist() == [1.0, 2.0] and names == ["task_0", "task_1"]
    with pytest.raises(ValueError, match="one loss per task"):
        task_losses({"loss": a})
    with pytest.raises(ValueError, match="must be a scalar"):
        task_losses({"loss": {"x": torch.ones(2)}})
