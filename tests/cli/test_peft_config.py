"""``JDTrainer(peft_config=...)``: JD trains the adapters only; a clear message without PEFT."""

from __future__ import annotations

import sys

import pytest
import torch
from _cli_fixtures import tiny_args, tiny_bert, tiny_dataset

from hf_jd import JDTrainer
from hf_jd.trainer._peft import PEFT_MISSING


def test_adapters_only_receive_the_update(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        task_type=peft.TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"]
    )
    trainer = JDTrainer(
        model=tiny_bert(), args=tiny_args(str(tmp_path)), train_dataset=tiny_dataset(), peft_config=config
    )
    assert isinstance(trainer.model, peft.PeftModel)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "classifier" in name for name in trainable)
    trainer.train()
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed & {name for name in trainable if "lora_B" in name}  # the adapters moved
    assert changed <= trainable  # nothing frozen moved
    assert any("word_embeddings" in name for name in before) and not any(
        "word_embeddings" in n for n in changed
    )


def test_positional_model_and_peft_model_twice(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=2, target_modules=["query"])
    trainer = JDTrainer(
        tiny_bert(), tiny_args(str(tmp_path)), train_dataset=tiny_dataset(), peft_config=config
    )
    assert isinstance(trainer.model, peft.PeftModel)
    with pytest.raises(ValueError, match="already a PeftModel"):
        JDTrainer(trainer.model, tiny_args(str(tmp_path)), train_dataset=tiny_dataset(), peft_config=config)


def test_missing_peft_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(ImportError, match="pip install peft") as error:
        JDTrainer(model=tiny_bert(), args=tiny_args(str(tmp_path)), peft_config=object())
    assert str(error.value) == PEFT_MISSING


def test_without_peft_config_nothing_changes(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    trainer = JDTrainer(model=tiny_bert(), args=tiny_args(str(tmp_path)), train_dataset=tiny_dataset())
    assert type(trainer.model).__name__ == "BertForSequenceClassification"
