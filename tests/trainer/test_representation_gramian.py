"""``jd_gramian="representation"``: task weights from the Gramian of the task gradients with respect to the
shared representation, checked against brute force (row-by-row autograd at the representation and at the
parameters), for every Gramian-weighted aggregator."""

from __future__ import annotations

import pytest
import torch
from _trainer_fixtures import base_args, classification_dataset, tiny_bert_config
from torch import nn
from transformers import BertModel

from hf_jd import JDTrainer, JDTrainingArguments
from hf_jd.aggregation import GramianWeightedAggregator, aggregator_class, aggregator_names, get_aggregator
from hf_jd.gramian import GramianEngineError, RepresentationEngine

GRAMIAN_WEIGHTED = [
    n for n in aggregator_names() if issubclass(aggregator_class(n), GramianWeightedAggregator)
]
#: aggregators whose first weights depend on more than the Gramian (a random draw)
RANDOM = {"random"}
#: aggregators that need constructor arguments
KWARGS = {"constant": {"weights": [1.0, 2.0, 0.5]}}
LR = 0.1


class ThreeTasks(nn.Module):
    """A shared tiny BERT encoder; three heads on the first token (classification and two regressions)."""

    def __init__(self, bias_shared_by_heads: bool = False) -> None:
        super().__init__()
        self.encoder = BertModel(tiny_bert_config(), add_pooling_layer=False)
        self.head_a = nn.Linear(16, 3)
        self.head_b = nn.Linear(16, 1)
        self.head_c = nn.Linear(16, 1)
        # a parameter the heads share AFTER the representation: breaks the representation's premise
        self.offset = nn.Parameter(torch.zeros(16)) if bias_shared_by_heads else None

    def forward(self, input_ids, labels=None, targets=None):
        features = self.encoder(input_ids=input_ids).last_hidden_state[:, 0]
        if self.offset is not None:
            features = features + self.offset
        losses = {
            "a": nn.functional.cross_entropy(self.head_a(features), labels),
            "b": nn.functional.mse_loss(self.head_b(features).squeeze(-1), targets[:, 0]),
            "c": nn.functional.mse_loss(self.head_c(features).squeeze(-1), targets[:, 1] ** 2),
        }
        return {"loss": losses}


def _dataset(n: int = 8):
    dataset = classification_dataset(n, seed=5)
    generator = torch.Generator().manual_seed(7)
    return dataset.add_column("targets", torch.randn(n, 2, generator=generator).tolist())


def _batch(dataset) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(dataset[name]) for name in ("input_ids", "labels", "targets")}


def _heads(model: ThreeTasks, hidden: torch.Tensor, batch: dict) -> list[torch.Tensor]:
    features = hidden[:, 0]
    targets = batch["targets"]
    return [
        nn.functional.cross_entropy(model.head_a(features), batch["labels"]),
        nn.functional.mse_loss(model.head_b(features).squeeze(-1), targets[:, 0]),
        nn.functional.mse_loss(model.head_c(features).squeeze(-1), targets[:, 1] ** 2),
    ]


def brute_force(
    model: ThreeTasks, batch: dict
) -> tuple[torch.Tensor, torch.Tensor, list[dict], torch.Tensor]:
    """The representation Gramian ``C Cᵀ`` (``C``: each task's gradient at ``last_hidden_state``, row by row),
    the shared parameters' Jacobian ``J`` (row by row), each head's plain gradient and the task losses."""
    hidden = model.encoder(input_ids=batch["input_ids"]).last_hidden_state
    leaf = hidden.detach().requires_grad_()
    C = torch.stack([torch.autograd.grad(loss, leaf)[0].reshape(-1) for loss in _heads(model, leaf, batch)])
    shared = list(model.encoder.parameters())
    losses = _heads(model, hidden, batch)
    J = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            for loss in losses
        ]
    )
    heads = [
        dict(zip(("weight", "bias"), torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)))
        for loss, head in zip(losses, (model.head_a, model.head_b, model.head_c))
    ]
    return C @ C.T, J, heads, torch.stack(losses).detach()


class WeightSpy:
    """Records the Gramian an aggregator's weighting was given and the weights it returned (a forward hook)."""

    def __init__(self, aggregator) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        aggregator.gramian_weighting.register_forward_hook(self._record)

    def _record(self, module, inputs, weights) -> None:
        self.calls.append((inputs[0].detach().clone(), weights.detach().clone()))


def _one_sgd_step(tmp_path, batch: int = 8, accumulation: int = 1, **jd: object) -> JDTrainingArguments:
    """One plain-SGD step (rate ``LR``, no clipping, micro-batches in order) with the representation Gramian."""
    settings = dict(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=1)
    settings.update(learning_rate=LR, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0)
    return JDTrainingArguments(
        **base_args(tmp_path, **settings, train_sampling_strategy="sequential"),
        jd_objectives="per_task",
        jd_gramian="representation",
        **jd,
    )


def _train_one_step(tmp_path, model, aggregator: str, **jd: object) -> WeightSpy:
    args = _one_sgd_step(tmp_path, aggregator=aggregator, aggregator_kwargs=KWARGS.get(aggregator), **jd)
    trainer = JDTrainer(model=model, args=args, train_dataset=_dataset())
    spy = WeightSpy(trainer.aggregator)
    trainer.train()
    return spy


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("aggregator", GRAMIAN_WEIGHTED)
def test_the_step_takes_the_aggregators_weights_of_the_representation_gramian(tmp_path, float64, aggregator):
    """Every Gramian-weighted aggregator: the Gramian it is given is ``C Cᵀ``, its weights (for a fresh instance
    of the aggregator on that Gramian, except random draws) drive ``Jᵀw`` into the encoder, and each head takes
    its own task's plain gradient."""
    torch.manual_seed(0)
    model = ThreeTasks()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    gramian, J, heads, losses = brute_force(model, _batch(_dataset()))
    spy = _train_one_step(tmp_path, model, aggregator, jd_representation="encoder")

    ((given, weights),) = spy.calls
    torch.testing.assert_close(given, gramian, rtol=1e-9, atol=1e-12)
    if aggregator not in RANDOM:
        fresh = get_aggregator(aggregator, **KWARGS.get(aggregator, {}))
        if hasattr(fresh, "set_losses"):
            fresh.set_losses(losses)
        torch.testing.assert_close(weights, fresh.gramian_weighting(gramian), rtol=1e-6, atol=1e-9)
    expected = torch.split(weights @ J, [p.numel() for p in model.encoder.parameters()])
    for (name, param), update in zip(model.encoder.named_parameters(), expected):
        step = (initial[f"encoder.{name}"] - param.detach()) / LR
        torch.testing.assert_close(step, update.view_as(param), rtol=1e-6, atol=1e-9, msg=name)
    for head_name, grads in zip(("head_a", "head_b", "head_c"), heads):
        for suffix, grad in grads.items():
            name = f"{head_name}.{suffix}"
            step = (initial[name] - dict(model.named_parameters())[name].detach()) / LR
            torch.testing.assert_close(step, grad, rtol=1e-6, atol=1e-9, msg=name)


def test_the_inferred_representation_is_the_encoder_and_takes_the_same_step(tmp_path, float64):
    steps = []
    for name in ("encoder", None):
        torch.manual_seed(0)
        model = ThreeTasks()
        _train_one_step(tmp_path, model, "upgrad", jd_representation=name)
        steps.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, value in steps[0].items():
        torch.testing.assert_close(steps[1][name], value, rtol=0, atol=0, msg=name)


def test_the_engine_infers_the_encoder():
    torch.manual_seed(0)
    model = ThreeTasks()
    engine = RepresentationEngine(model)
    with engine.capture():
        losses = torch.stack(list(model(**_batch(_dataset()))["loss"].values()))
    engine.gramian(losses)
    engine.release()
    assert engine.representation == "encoder"


def test_a_parameter_shared_around_the_representation_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(GramianEngineError, match=r"offset.*reached by several task losses"):
        _train_one_step(
            tmp_path, ThreeTasks(bias_shared_by_heads=True), "upgrad", jd_representation="encoder"
        )


def test_without_a_name_a_model_with_no_separating_module_is_refused(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(GramianEngineError, match="No module's output separates"):
        _train_one_step(tmp_path, ThreeTasks(bias_shared_by_heads=True), "upgrad")


def test_an_unknown_module_name_is_refused_at_construction(tmp_path):
    args = JDTrainingArguments(
        **base_args(tmp_path),
        jd_objectives="per_task",
        jd_gramian="representation",
        jd_representation="encoderr",
    )
    with pytest.raises(ValueError, match=r"'encoderr' is not a submodule of ThreeTasks.*encoder, head_a"):
        JDTrainer(model=ThreeTasks(), args=args, train_dataset=_dataset())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({}, "Set jd_objectives='per_task'"),
        ({"jd_objectives": "per_task", "jd_engine": "jacobian"}, "Use jd_engine='auto'"),
        ({"jd_objectives": "per_task", "aggregator": "trimmed_mean"}, "needs the Jacobian itself"),
        ({"jd_objectives": "per_task", "aggregator": None, "scalarizer": "mean"}, "Remove --scalarizer"),
    ],
)
def test_settings_the_representation_gramian_cannot_serve_are_refused(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        JDTrainingArguments(**base_args(tmp_path), jd_gramian="representation", **settings)


def test_a_representation_without_the_representation_gramian_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Add --jd_gramian representation"):
        JDTrainingArguments(**base_args(tmp_path), jd_objectives="per_task", jd_representation="encoder")


def test_gradient_accumulation_sums_the_micro_batch_updates(tmp_path, float64):
    """Two micro-batches of 4 (in order): each takes its own weights; the step is the mean of their updates."""
    torch.manual_seed(0)
    model = ThreeTasks()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    dataset = _dataset()
    expected = torch.zeros(sum(p.numel() for p in model.encoder.parameters()))
    aggregator = get_aggregator("upgrad")
    for half in (dataset.select(range(4)), dataset.select(range(4, 8))):
        gramian, J, _, _ = brute_force(model, _batch(half))
        expected += aggregator.gramian_weighting(gramian) @ J / 2
    JDTrainer(
        model=model, args=_one_sgd_step(tmp_path, batch=4, accumulation=2), train_dataset=dataset
    ).train()
    steps = [
        (initial[f"encoder.{n}"] - p.detach()).reshape(-1) / LR for n, p in model.encoder.named_parameters()
    ]
    torch.testing.assert_close(torch.cat(steps), expected, rtol=1e-6, atol=1e-9)


def test_the_model_card_says_the_weights_come_from_the_representation_gramian(tmp_path):
    from hf_jd.trainer._model_card import jd_section

    args = JDTrainingArguments(
        **base_args(tmp_path),
        jd_objectives="per_task",
        jd_gramian="representation",
        jd_representation="encoder",
    )
    section = jd_section(args)
    assert "Gramian of the task gradients at the shared representation" in section
    assert (
        "| `jd_gramian` | `'representation'` |" in section
        and "| `jd_representation` | `'encoder'` |" in section
    )
    assert "jd_gramian" not in jd_section(
        JDTrainingArguments(**base_args(tmp_path), jd_objectives="per_task")
    )


class SharedAroundOneTask(nn.Module):
    """``offset`` lies behind the encoder's output for both tasks, and task ``a`` also reads it directly."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.offset = nn.Parameter(torch.zeros(4))
        self.head_a, self.head_b = nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x + self.offset)
        return torch.stack([self.head_a(z + self.offset).pow(2).mean(), self.head_b(z).pow(2).mean()])


def test_a_shared_parameter_one_task_reaches_around_the_representation_is_refused():
    """The direct path would give ``offset`` an unweighted gradient the Gramian never saw."""
    torch.manual_seed(0)
    model = SharedAroundOneTask()
    engine = RepresentationEngine(model, "encoder")
    with engine.capture():
        losses = model(torch.randn(6, 4))
    with pytest.raises(GramianEngineError, match=r"offset.*at least one without passing through"):
        engine.gramian(losses, verify_rows=[0])
    inferring = RepresentationEngine(model)
    with inferring.capture():
        losses = model(torch.randn(6, 4))
    with pytest.raises(GramianEngineError, match="No module's output separates"):
        inferring.gramian(losses)
