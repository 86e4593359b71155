"""The engine's contract: API, no .grad / no AccumulateGrad during gramian(), refusals, small models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gramian_oracles import assert_exact, labels, tiny_bert_config
from torch import nn

from hf_jd.gramian import GramianEngine, GramianEngineError


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))


def test_name_and_params_in_model_order():
    model = mlp()
    model[0].bias.requires_grad_(False)
    engine = GramianEngine(model)
    assert engine.name == "gramian"
    assert engine.params == [p for p in model.parameters() if p.requires_grad]
    assert len(engine.params) == 3


def test_small_mlp_regression():
    model = mlp()
    x, y = torch.randn(7, 4), torch.randn(7)
    outcome = assert_exact(model, lambda: (model(x).squeeze(-1) - y) ** 2)
    assert outcome.gramian.shape == (7, 7)


def test_mean_weights_give_the_stock_gradient():
    model = mlp()
    x, y = torch.randn(6, 4), torch.randn(6)
    (model(x).squeeze(-1) - y).pow(2).mean().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    engine = GramianEngine(model)
    with engine.capture():
        losses = (model(x).squeeze(-1) - y) ** 2
    engine.gramian(losses)
    engine.accumulate_grad(torch.full((6,), 1 / 6), 1.0)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, dilation=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, groups=2, padding=1),  # grouped: generic rule
        )
        self.head = nn.Linear(6 * 3 * 3, 3)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def test_small_cnn_with_eval_batch_norm():
    model = SmallCNN()
    model.features[4].eval()  # running statistics: examples stay independent
    x, y = torch.randn(5, 3, 8, 8), labels(5)
    assert_exact(model, lambda: F.cross_entropy(model(x), y, reduction="none"))


def test_batch_norm_in_train_mode_is_refused():
    model = SmallCNN()
    with pytest.raises(GramianEngineError, match="batch statistics") as error:
        GramianEngine(model).check_supported()
    assert "jd_engine='jacobian'" in str(error.value) and "jd_freeze_batch_norm=True" in str(error.value)
    assert "eval mode" in str(error.value)
    GramianEngine(model, objectives="per_task").check_supported()  # tasks over the whole batch: fine


def test_torch_rms_norm_and_a_custom_module_owning_parameters():
    class Scaled(nn.Module):  # no specialised rule: exact generic torch.func rule
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.randn(8))
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(x) * self.gain + x.pow(2).mean(dim=-1, keepdim=True) * self.gain

    model = nn.Sequential(nn.Linear(5, 8), nn.RMSNorm(8), Scaled(), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(4, 3, 5)
    assert_exact(model, lambda: model(x).pow(2).mean(dim=(1, 2)))


def test_gramian_writes_no_grad_and_runs_no_accumulate_grad():
    model = mlp()
    fired = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda param: fired.append(param))
    engine = GramianEngine(model)
    x = torch.randn(5, 4)
    with engine.capture():
        losses = model(x).squeeze(-1).pow(2)
    engine.gramian(losses)
    assert fired == [] and all(p.grad is None for p in model.parameters())
    engine.accumulate_grad(torch.ones(5), 1.0)
    assert all(p.grad is not None for p in model.parameters())


def test_hooks_only_inside_capture_and_release():
    model = mlp()
    engine = GramianEngine(model)
    with engine.capture():
        assert model[0]._forward_hooks
        losses = model(torch.randn(3, 4)).squeeze(-1)
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks
    engine.gramian(losses)
    engine.release()
    with pytest.raises(GramianEngineError, match="gramian"):
        engine.accumulate_grad(torch.ones(3), 1.0)
    assert all(p.grad is None for p in model.parameters())


def test_misuse_errors():
    model = mlp()
    with pytest.raises(ValueError, match="objectives"):
        GramianEngine(model, objectives="per_token")
    engine = GramianEngine(model)
    with engine.capture():
        losses = model(torch.randn(3, 4)).squeeze(-1)
    with pytest.raises(GramianEngineError, match="1-D"):
        engine.gramian(losses.sum())
    engine.gramian(losses)
    with pytest.raises(GramianEngineError, match="3 weights"):
        engine.accumulate_grad(torch.ones(4), 1.0)


def test_compiled_model_is_refused():
    model = torch.compile(mlp())
    with pytest.raises(GramianEngineError, match="torch.compile"):
        GramianEngine(model).check_supported()


def test_unused_parameter_keeps_no_gradient():
    """As after ``loss.backward()``: a parameter no loss reaches keeps ``.grad = None`` (AdamW skips it)."""
    model = nn.ModuleDict({"used": nn.Linear(3, 1), "unused": nn.Linear(3, 1)})
    engine = GramianEngine(model)
    x = torch.randn(4, 3)
    with engine.capture():
        losses = model["used"](x).squeeze(-1).pow(2)
    engine.gramian(losses)
    engine.accumulate_grad(torch.ones(4), 1.0)
    assert model["unused"].weight.grad is None and model["unused"].bias.grad is None
    assert model["used"].weight.grad is not None


def test_one_backward_pass_for_bert_and_gpt2(monkeypatch):
    from transformers import BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    bert = BertForSequenceClassification(tiny_bert_config())
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
        )
    )
    ids = torch.randint(1, 100, (4, 8))
    for model, loss in (
        (bert, lambda out: F.cross_entropy(out.logits, labels(4), reduction="none")),
        (gpt2, lambda out: out.logits.logsumexp(-1).mean(-1)),
    ):
        engine = GramianEngine(model)
        with engine.capture():
            losses = loss(model(input_ids=ids))
        calls: list[dict] = []
        grad = torch.autograd.grad

        def counting(*args, _calls=calls, _grad=grad, **kwargs):
            _calls.append(kwargs)
            return _grad(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, "grad", counting)
        engine.gramian(losses)
        monkeypatch.setattr(torch.autograd, "grad", grad)
        # Broadcast position embeddings and tied weights handled without any extra (batched) backward.
        assert len(calls) == 1 and not calls[0].get("is_grads_batched", False)
        engine.release()


def test_coverage_names_the_rule_of_every_trainable_parameter():
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1), nn.Linear(3, 3))
    model[0].bias.requires_grad_(False)
    engine = GramianEngine(model)
    with pytest.raises(GramianEngineError, match="coverage"):
        engine.coverage()
    x = torch.randn(5, 4)
    with engine.capture():
        losses = model[2](model[1](model[0](x))).squeeze(-1) ** 2
    engine.gramian(losses)
    assert engine.coverage() == {
        "0.weight": "linear",
        "2.weight": "linear",
        "2.bias": "linear",
        "3.weight": "unreached",
        "3.bias": "unreached",
    }
    engine.release()
