"""DeBERTa-v2 (relative attention) and Swin (window attention) crashed the Gramian engine's first forward.

``auto`` must recover on its own (re-running the micro-batch without broadcast expansion, which the
first step's self-check then verifies) and take the same step as the explicit-Jacobian engine.
"""

from __future__ import annotations

import pytest
import torch
from _trainer_fixtures import base_args, classification_dataset
from datasets import Dataset
from transformers import (
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    SwinConfig,
    SwinForImageClassification,
)

from hf_jd import JDTrainer, JDTrainingArguments


def _deberta():
    config = DebertaV2Config(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3, relative_attention=True, pos_att_type=["p2c", "c2p"],
        position_buckets=8, max_relative_positions=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return DebertaV2ForSequenceClassification(config), classification_dataset(8)


def _swin():
    config = SwinConfig(
        image_size=16, patch_size=4, num_channels=3, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2,
        num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {
            "pixel_values": torch.randn(8, 3, 16, 16, generator=generator).tolist(),
            "labels": torch.randint(0, 3, (8,), generator=generator).tolist(),
        }
    )
    return SwinForImageClassification(config), data


@pytest.mark.parametrize("make", [_deberta, _swin], ids=["deberta_v2", "swin"])
def test_auto_recovers_and_matches_the_jacobian_engine(tmp_path, make):
    results = {}
    for engine in ("jacobian", "auto"):
        model, data = make()
        args = JDTrainingArguments(
            **base_args(
                tmp_path, output_dir=str(tmp_path / engine), max_steps=2, learning_rate=0.1, optim="sgd"
            )
        )
        args.jd_engine = engine
        trainer = JDTrainer(model=model, args=args, train_dataset=data)
        if engine == "auto":
            with pytest.warns(RuntimeWarning, match="failed on the first step"):
                trainer.train()
            assert trainer.jd_engine.name == "gramian"
        else:
            trainer.train()
        results[engine] = model
    for (name, actual), (_, expected) in zip(
        results["auto"].named_parameters(), results["jacobian"].named_parameters()
    ):
        torch.testing.assert_close(actual, expected, atol=2e-5, rtol=1e-4, msg=name)
