"""float64 (tight), bf16 autocast on CPU (loose: the reference itself runs in bf16)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gramian_oracles import VOCAB, assert_exact, causal_lm_losses, labels, tiny_bert_config, token_ids
from transformers import BertForSequenceClassification, GPT2Config, GPT2LMHeadModel


def test_float64_gpt2_is_exact_to_1e_10():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
        )
    ).double()
    ids = token_ids(4, 8)
    outcome = assert_exact(model, lambda: causal_lm_losses(model(input_ids=ids).logits, ids), tol=1e-10)
    assert outcome.gramian.dtype == torch.float64


def test_bf16_autocast_on_cpu():
    config = tiny_bert_config()
    model = BertForSequenceClassification(config)
    ids, y = token_ids(4, 9), labels(4)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        return F.cross_entropy(logits.float(), y, reduction="none")

    outcome = assert_exact(model, forward, tol=2e-2)
    assert outcome.gramian.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
