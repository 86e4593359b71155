"""The stand-in for TRL's fused LM head (hf_jd.trl._logits_head) against TRL's own kernel, and what it buys.

Oracle: TRL's ``add_fused_lm_head`` forward on the same model (every field, the loss and the parameter
gradients of a weighted sum of the log-probabilities). What it buys — the Gramian engine serves the LM head with
its linear rule instead of the per-objective fallback — is checked on each trainer's step (``served_by``).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from _tiny_llama import tiny_llama  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from hf_jd.trl._logits_head import OPTIONAL_FIELDS, LogitsHead, LogitsHeadSteps  # noqa: E402

FIELDS = ("log_probs", *OPTIONAL_FIELDS)


def llama() -> LlamaForCausalLM:
    return tiny_llama(LlamaForCausalLM, vocab_size=40)


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 40, (3, 9), generator=generator)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[2, 6:] = -100  # padding
    return input_ids, labels


def fields_and_grads(model, input_ids, labels, weights, **call) -> tuple[dict[str, torch.Tensor], list]:
    model.zero_grad()
    out = model(input_ids=input_ids, labels=labels, fused_lm_head=True, **call)
    (out.log_probs * weights).sum().backward()
    values = {name: getattr(out, name).detach() for name in (*FIELDS, "label_mask", "loss")}
    return values, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_stand_in_gives_the_fields_loss_and_gradients_of_trls_fused_head(temperature):
    model = llama()
    add_fused_lm_head(model, temperature=temperature, outputs=FIELDS)
    input_ids, labels = batch()
    weights = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    fused, fused_grads = fields_and_grads(model, input_ids, labels, weights)
    fused_forward = vars(model)["forward"]
    head = LogitsHead(model)
    assert head.temperature == temperature and head.fields == frozenset(FIELDS)
    with head.serving():
        assert vars(model)["forward"] is head
        ours, our_grads = fields_and_grads(model, input_ids, labels, weights)
        call = head.only_call("test")
    assert vars(model)["forward"] is fused_forward  # restored: evaluation and generation keep TRL's head
    for name in (*FIELDS, "label_mask", "loss"):
        torch.testing.assert_close(ours[name], fused[name], rtol=1e-5, atol=1e-5, msg=name)
    assert bool(ours["label_mask"].equal(labels[:, 1:] != -100))
    assert float(ours["log_probs"][0, :3].abs().sum()) == 0.0  # zero where the label is -100, as TRL
    for ours_grad, fused_grad in zip(our_grads, fused_grads, strict=True):
        torch.testing.assert_close(ours_grad, fused_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(call.token_losses.detach(), -ours["log_probs"])
    assert call.outputs.logits.shape == (3, 9, 40)  # the ordinary forward's logits, recorded


def test_only_the_fields_trl_asked_for_are_computed_and_calls_without_gradient_are_not_recorded():
    model = llama()
    add_fused_lm_head(model, outputs=("log_probs", "is_top1"))
    input_ids, labels = batch()
    with LogitsHead(model).serving() as head:
        with torch.no_grad():
            out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        assert head.calls == []
        assert out.is_top1 is not None and out.entropy is None and out.mean_logits is None
        with pytest.raises(RuntimeError, match="once with gradient, got 0"):
            head.only_call("JDXTrainer")
        plain = model(input_ids=input_ids)  # without fused_lm_head: the model's own forward, logits
        assert plain.logits.shape == (3, 9, 40)


def test_pre_shifted_labels_are_scored_as_they_are():
    model = llama()
    add_fused_lm_head(model, outputs=FIELDS)
    input_ids, labels = batch()
    shift_labels = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    fused = model(input_ids=input_ids, shift_labels=shift_labels, fused_lm_head=True)
    with LogitsHead(model).serving():
        ours = model(input_ids=input_ids, shift_labels=shift_labels, fused_lm_head=True)
    assert ours.log_probs.shape == (3, 9)
    for name in FIELDS:
        torch.testing.assert_close(getattr(ours, name), getattr(fused, name), rtol=1e-5, atol=1e-5)


def test_a_float32_head_keeps_trls_kernel_during_the_step():
    """TRL's cast_lm_head_to_fp32 (GRPO) has no counterpart in the model's own forward: no stand-in then."""
    model = llama()
    add_fused_lm_head(model, cast_lm_head_to_fp32=True)
    seen = []

    class Parent:
        def training_step(self, model, inputs, num_items_in_batch=None):
            seen.append(vars(model)["forward"])
            return torch.zeros(())

    class Steps(LogitsHeadSteps, Parent):
        pass

    assert LogitsHead(model).float32_head
    Steps().training_step(model, {})
    assert not isinstance(seen[0], LogitsHead)

    plain = llama()
    add_fused_lm_head(plain)
    Steps().training_step(plain, {})
    assert isinstance(seen[1], LogitsHead)


def test_a_model_without_trls_head_is_refused_clearly():
    with pytest.raises(RuntimeError, match="no TRL fused LM head on LlamaForCausalLM"):
        LogitsHead(llama())
