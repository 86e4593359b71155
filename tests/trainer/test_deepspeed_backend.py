"""DeepSpeedBackend without DeepSpeed running: what it refuses (by name), what it serves, how it writes.

The end-to-end checks (ZeRO-1/2/3 on two gloo processes against the stock Trainer and against one process)
are in ``tests/distributed/test_deepspeed.py``.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_jd import JDTrainingArguments
from hf_jd.aggregation import UPGrad
from hf_jd.trainer._backends import DeepSpeedBackend, select_backend
from hf_jd.trainer._backends._deepspeed import UNSERVED_ZERO_SETTINGS, Zero3BackwardCounters


def arguments(tmp_path, **overrides) -> JDTrainingArguments:
    values = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none", aggregator="upgrad")
    values.update(overrides)
    return JDTrainingArguments(**values)


def test_the_plugin_is_detected_with_its_stage_and_zero_settings():
    plugin = SimpleNamespace(
        zero_stage=3, deepspeed_config={"zero_optimization": {"stage": 3, "reduce_bucket_size": 9}}
    )
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=plugin))
    backend = select_backend(accelerator, nn.Linear(2, 2))
    assert isinstance(backend, DeepSpeedBackend)
    assert backend.zero_stage == 3 and backend.zero == {"stage": 3, "reduce_bucket_size": 9}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("offload_param", {"device": "cpu"}),
        ("offload_optimizer", {"device": "cpu"}),
        ("zero_quantized_weights", True),
        ("zero_quantized_gradients", True),
        ("zero_hpz_partition_size", 2),
    ],
)
def test_unserved_zero_settings_are_refused_by_name(tmp_path, name, value):
    backend = DeepSpeedBackend(3, {name: value})
    with pytest.raises(
        ValueError,
        match=f"does not support {re.escape(UNSERVED_ZERO_SETTINGS[name])}.*zero_optimization.{name}",
    ):
        backend.check(arguments(tmp_path), None)


def test_settings_that_leave_a_feature_off_are_served(tmp_path):
    zero = {"offload_param": {"device": "none"}, "offload_optimizer": None, "zero_hpz_partition_size": 1}
    DeepSpeedBackend(2, zero).check(arguments(tmp_path), UPGrad())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"jd_engine": "jacobian"}, "jd_engine='jacobian'.*explicit-Jacobian engine"),
        ({"aggregator": "graddrop"}, "--aggregator graddrop.*Jacobian itself"),
        ({"aggregator": None, "scalarizer": "mean"}, "--scalarizer mean"),
    ],
)
def test_jd_settings_it_cannot_serve_are_refused_by_name(tmp_path, overrides, match):
    args = arguments(tmp_path, **overrides)
    aggregator = args.build_aggregator() if args.aggregator is not None else None
    with pytest.raises(ValueError, match=f"JD under DeepSpeed ZeRO does not support {match}"):
        DeepSpeedBackend(2).check(args, aggregator)


def test_only_the_gramian_engine_is_offered_and_it_keeps_the_graph(tmp_path):
    args = arguments(tmp_path)
    backend = DeepSpeedBackend(2)
    choices = backend.engine_choices(args, UPGrad(), 2)
    assert [choice.kind for choice in choices] == ["gramian", "gramian"]
    engine = backend.build_engine(choices[0], nn.Linear(3, 2), args, 1)
    assert engine.name == "gramian" and engine.keeps_graph


def test_the_update_is_one_backward_of_the_weighted_losses_with_the_stock_keywords(tmp_path):
    """The update goes through the bound accelerator.backward, once, with scale · wᵀL and the stock kwargs."""
    args = arguments(tmp_path)
    backend = DeepSpeedBackend(2)
    backend.check(args, UPGrad())
    model = nn.Linear(3, 2)
    engine = backend.build_engine(backend.engine_choices(args, UPGrad(), 1)[0], model, args, 1)
    x = torch.randn(4, 3)
    with engine.capture():
        losses = model(x).pow(2).sum(dim=1)
    engine.gramian(losses)
    calls = []

    def accelerator_backward(loss, **kwargs):
        calls.append((float(loss), kwargs))
        loss.backward()

    backend.bind_backward(accelerator_backward, {"scale_wrt_gas": False}, model)  # not an engine: no hooks
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    backend.write_update(engine, losses, weights, 0.5, per_task=False)
    assert len(calls) == 1 and calls[0][1] == {"scale_wrt_gas": False}
    assert calls[0][0] == pytest.approx(0.5 * float((weights * losses.detach()).sum()))
    expected = torch.autograd.grad(0.5 * (weights * model(x).pow(2).sum(dim=1)).sum(), model.weight)[0]
    torch.testing.assert_close(model.weight.grad, expected)


def test_the_backward_refuses_to_run_unbound(tmp_path):
    with pytest.raises(RuntimeError, match="needs the stock step's accelerator.backward"):
        DeepSpeedBackend(2).backward(torch.ones((), requires_grad=True), [], False)


def test_zero3_counters_used_up_by_a_backward_are_put_back():
    """ZeRO-3's per-module counters (set by its forward hooks) as the forward left them, after a backward."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    counters = Zero3BackwardCounters(model)

    def count_forward(module, *unused):
        module.applied_pre_backward_ref_cnt = getattr(module, "applied_pre_backward_ref_cnt", 0) + 1
        module.ds_grads_remaining = 1

    for layer in model:
        layer.register_forward_hook(count_forward)
    model(torch.ones(1, 2))
    for layer in model:  # what the Gramian pass leaves
        layer.applied_pre_backward_ref_cnt, layer.ds_grads_remaining = 0, 0
    counters.restore()
    assert [(layer.applied_pre_backward_ref_cnt, layer.ds_grads_remaining) for layer in model] == [
        (1, 1),
        (1, 1),
    ]
    assert not hasattr(model, "applied_pre_backward_ref_cnt")  # modules without them are left alone


def test_per_task_writes_jtw_to_shared_parameters_and_plain_task_gradients_to_heads(tmp_path):
    """One backward (the bound accelerator.backward) with hooks on the heads; a zero weight included, which a
    division of the head's gradient by its task weight could not undo."""
    args = arguments(tmp_path, jd_objectives="per_task")
    backend = DeepSpeedBackend(2)
    backend.check(args, UPGrad())
    torch.manual_seed(0)
    encoder, head_a, head_b = nn.Linear(3, 4), nn.Linear(4, 1), nn.Linear(4, 1)
    model = nn.ModuleDict({"encoder": encoder, "a": head_a, "b": head_b})
    engine = backend.build_engine(backend.engine_choices(args, UPGrad(), 1)[0], model, args, 1)
    x = torch.randn(5, 3)

    def task_losses() -> torch.Tensor:
        features = torch.tanh(encoder(x))
        return torch.stack([head_a(features).pow(2).mean(), (head_b(features) - 1).abs().mean()])

    with engine.capture():
        losses = task_losses()
    engine.gramian(losses)
    calls = []

    def accelerator_backward(loss, **kwargs):
        calls.append(kwargs)
        loss.backward()

    backend.bind_backward(accelerator_backward, {"scale_wrt_gas": False}, model)
    weights, scale = torch.tensor([0.0, 0.7]), 0.5
    backend.write_update(engine, losses, weights, scale, per_task=True)
    assert calls == [{"scale_wrt_gas": False}]  # one backward through DeepSpeed's
    written = {name: p.grad.clone() for name, p in model.named_parameters()}
    reference = task_losses()
    shared = list(encoder.parameters())
    jtw = torch.autograd.grad(scale * (weights * reference).sum(), shared, retain_graph=True)
    for name, expected in zip(("encoder.weight", "encoder.bias"), jtw):
        torch.testing.assert_close(written[name], expected)
    for key, head, loss in (("a", head_a, reference[0]), ("b", head_b, reference[1])):
        plain = torch.autograd.grad(scale * loss, list(head.parameters()), retain_graph=True)
        for (name, _), expected in zip(head.named_parameters(), plain):
            torch.testing.assert_close(written[f"{key}.{name}"], expected)
    assert float(written["a.weight"].abs().max()) > 0  # task a's weight is 0: its head still learns
