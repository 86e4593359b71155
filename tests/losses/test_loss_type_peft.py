"""Loss-type inference sees through PEFT wrappers: a plain ``PeftModel`` (LoRA without ``task_type``) is
looked up by its base model, as is a ``PeftModel`` under ``torch.compile``'s wrapper."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from hf_jd.losses import infer_loss_type, unwrapped_model

peft = pytest.importorskip("peft")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def test_a_plain_peft_model_is_looked_up_by_its_base_model():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert type(model) is peft.PeftModel  # no task_type: the plain wrapper whose name says nothing
    assert unwrapped_model(model) is model.get_base_model()
    assert infer_loss_type(model) == "causal_lm"


def test_a_plain_peft_classifier_keeps_its_problem_type():
    config = BertConfig(
        vocab_size=32,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=1,
    )
    model = peft.get_peft_model(
        BertForSequenceClassification(config), peft.LoraConfig(r=2, target_modules=["query"])
    )
    assert infer_loss_type(model) == "regression"  # num_labels=1, read from the base model's config


def test_a_compiled_peft_model_is_unwrapped_both_ways():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    compiled = torch.compile(model)
    assert unwrapped_model(compiled) is model.get_base_model()
    assert infer_loss_type(compiled) == "causal_lm"


def test_a_model_without_wrapper_is_itself():
    model = tiny_llama()
    assert unwrapped_model(model) is model


def test_jdtrainer_trains_lora_without_task_type(tmp_path):
    """Issue 22, point 3: ``peft_config=LoraConfig(...)`` without ``task_type`` used to stop with "cannot tell
    how to compute per-example losses for PeftModel"; the per-example losses are now the base model's."""
    from datasets import Dataset

    from hf_jd import JDTrainer, JDTrainingArguments

    ids = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    trainer = JDTrainer(
        model=tiny_llama(),
        args=JDTrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            max_steps=1,
            report_to="none",
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
        ),
        train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
        peft_config=peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    )
    assert type(trainer.model) is peft.PeftModel
    lora_b = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_B" in name}
    trainer.train()
    changed = [
        name
        for name, p in trainer.model.named_parameters()
        if name in lora_b and not torch.equal(p, lora_b[name])
    ]
    assert changed  # the adapters were trained (lora_B starts at zero)
