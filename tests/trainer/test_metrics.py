"""JD metrics: values from the Gramian, logged at logging_steps only."""

from __future__ import annotations

import math

import torch
from _trainer_fixtures import base_args, classification_dataset, tiny_bert

from hf_jd import JDTrainer, JDTrainingArguments
from hf_jd.trainer import _mixin
from hf_jd.trainer._metrics import MetricsAccumulator, step_metrics


def test_step_metrics_match_direct_computation():
    torch.manual_seed(0)
    J = torch.randn(5, 7, dtype=torch.float64)
    J[1] = -J[0]  # a fully conflicting pair
    w = torch.rand(5, dtype=torch.float64)
    losses = torch.tensor([0.1, 0.7, 0.3, 0.2, 0.5])
    metrics = step_metrics(J @ J.T, w, losses)
    cosines = torch.nn.functional.cosine_similarity(J[:, None], J[None], dim=-1)
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    assert math.isclose(metrics["jd/min_cosine"], -1.0, abs_tol=1e-9)
    assert math.isclose(
        metrics["jd/conflict_fraction"], sum(cosines[i, j] < 0 for i, j in pairs).item() / len(pairs)
    )
    assert math.isclose(metrics["jd/update_norm"], (w @ J).norm().item(), rel_tol=1e-9)
    assert math.isclose(metrics["jd/mean_grad_norm"], J.mean(0).norm().item(), rel_tol=1e-9)
    assert math.isclose(metrics["jd/weight_min"], w.min().item() * 5, rel_tol=1e-9)
    assert math.isclose(metrics["jd/weight_max"], w.max().item() * 5, rel_tol=1e-9)
    assert math.isclose(metrics["jd/max_loss"], 0.7, rel_tol=1e-6)
    scaled = step_metrics((8 * J) @ (8 * J).T, w, losses, grad_scale=8.0)
    assert math.isclose(scaled["jd/update_norm"], metrics["jd/update_norm"], rel_tol=1e-9)


def test_accumulator_combines_micro_batches():
    accumulator = MetricsAccumulator()
    accumulator.add({"jd/weight_min": 0.5, "jd/weight_max": 2.0, "jd/conflict_fraction": 0.2})
    accumulator.add({"jd/weight_min": 0.1, "jd/weight_max": 3.0, "jd/conflict_fraction": 0.4})
    assert accumulator.pop() == {"jd/weight_min": 0.1, "jd/weight_max": 3.0, "jd/conflict_fraction": 0.3}
    assert not accumulator


def _count_metric_calls(tmp_path, monkeypatch, **logging) -> tuple[int, JDTrainer]:
    calls = []
    original = _mixin.step_metrics
    monkeypatch.setattr(_mixin, "step_metrics", lambda *a, **k: calls.append(1) or original(*a, **k))
    args = JDTrainingArguments(**base_args(tmp_path, max_steps=4, **logging), jd_engine="jacobian")
    trainer = JDTrainer(model=tiny_bert(), args=args, train_dataset=classification_dataset(16))
    trainer.train()
    return len(calls), trainer


def test_metrics_only_on_logging_steps(tmp_path, monkeypatch):
    calls, trainer = _count_metric_calls(tmp_path, monkeypatch, logging_strategy="steps", logging_steps=2)
    assert calls == 2
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert all("jd/update_to_mean_grad_norm" in entry and "jd/max_loss" in entry for entry in logged)


def test_no_metrics_when_logging_is_off(tmp_path, monkeypatch):
    calls, _ = _count_metric_calls(tmp_path, monkeypatch, logging_strategy="no")
    assert calls == 0
