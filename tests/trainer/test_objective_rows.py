"""``compute_losses`` returning ``ObjectiveLosses``: one loss per preference pair over a batch of ``2B`` rows.

The trainer's update is compared with brute force: the Jacobian of the ``K`` pair losses by one
``torch.autograd.grad`` per loss, aggregated by the same aggregator; ``mean`` with the stock ``Trainer``
step on the mean of the pair losses.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _trainer_fixtures import base_args
from datasets import Dataset
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from hf_jd import JDTrainer, JDTrainingArguments, ObjectiveLosses
from hf_jd.aggregation import UPGrad
from hf_jd.gramian import GramianEngine, GramianEngineError, GramianMismatchError
from hf_jd.trainer._backends import DdpBackend
from hf_jd.trainer._jacobian_backend import JacobianBackend
from hf_jd.trainer._jd_step import StepSettings, jd_update
from hf_jd.trainer._loss_vector import JDInputError

ENGINES = ["jacobian", "gramian"]
FEATURES, BETA = 5, 1.5


class PairScorer(nn.Module):
    """A per-row score; its root-owned ``temperature`` takes the Gramian engine's exact fallback."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(FEATURES, 8)
        self.head = nn.Linear(8, 1)
        self.temperature = nn.Parameter(torch.tensor(1.2))

    def forward(self, x: Tensor) -> Tensor:
        return self.temperature * self.head(torch.tanh(self.body(x))).squeeze(-1)


def pair_losses(scores: Tensor, couple: bool = False) -> Tensor:
    """``-log σ(β (s_chosen - s_rejected))`` per pair; ``couple``: scores scaled by the batch's standard
    deviation (a loss that couples every pair, which the Gramian engine's self-check must catch)."""
    if couple:
        scores = scores / scores.std()
    half = scores.shape[0] // 2
    return -F.logsigmoid(BETA * (scores[:half] - scores[half:]))


def forward_pairs(model: nn.Module, inputs: dict[str, Tensor], couple: bool = False) -> Tensor:
    """One forward of the ``2B`` rows ``[chosen…, rejected…]`` (as TRL's DPO concatenates them)."""
    return pair_losses(model(x=torch.cat([inputs["chosen"], inputs["rejected"]])), couple)


class PairJD(JDTrainer):
    couple = False
    bad_map = False

    def compute_losses(self, model, inputs):
        losses = forward_pairs(model, inputs, self.couple)
        if self.bad_map:  # a map of B rows for a batch of 2B
            return ObjectiveLosses(losses, torch.arange(losses.numel()))
        return ObjectiveLosses.paired(losses)


class PairStock(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = forward_pairs(model, inputs).mean()
        return (loss, None) if return_outputs else loss


def pairs_dataset(n: int, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict(
        {
            "chosen": torch.randn(n, FEATURES, generator=generator).tolist(),
            "rejected": torch.randn(n, FEATURES, generator=generator).tolist(),
        }
    )


def common_args(tmp_path, **overrides) -> dict:
    return base_args(
        tmp_path,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        remove_unused_columns=False,
        **overrides,
    )


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def brute_jacobian(losses: Tensor, params: list[nn.Parameter]) -> Tensor:
    rows = []
    for k in range(losses.numel()):
        grads = torch.autograd.grad(losses[k], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
            )
        )
    return torch.stack(rows)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


@pytest.mark.parametrize("engine", ENGINES)
def test_mean_equals_the_stock_step_on_the_mean_pair_loss(tmp_path, engine):
    dataset = pairs_dataset(16)
    common = common_args(
        tmp_path, num_train_epochs=1, gradient_accumulation_steps=2, logging_strategy="steps", logging_steps=1
    )
    stock_model = PairScorer()
    stock = PairStock(model=stock_model, args=TrainingArguments(**common), train_dataset=dataset)
    stock.train()
    jd_model = PairScorer()
    jd = PairJD(
        model=jd_model,
        args=JDTrainingArguments(**common, aggregator="mean", jd_engine=engine),
        train_dataset=dataset,
    )
    jd.train()
    assert jd.jd_engine is not None and jd.jd_engine.name == engine
    assert jd.state.global_step == stock.state.global_step == 2
    assert not torch.allclose(flat(stock_model), flat(PairScorer()))
    torch.testing.assert_close(flat(jd_model), flat(stock_model), rtol=1e-5, atol=1e-6)
    # the logged loss is the mean of the K pair losses, as the stock step's
    stock_losses = [h["loss"] for h in stock.state.log_history if "loss" in h]
    jd_logs = [h for h in jd.state.log_history if "loss" in h]
    assert [h["loss"] for h in jd_logs] == pytest.approx(stock_losses, rel=1e-4)
    assert all(
        "jd/max_loss" in h and "jd/mean_grad_norm" in h for h in jd_logs
    )  # metrics over the K objectives


def one_step_update(
    trainer_class, model: nn.Module, tmp_path, engine: str, dataset: Dataset, **kwargs
) -> Tensor:
    """``(θ_before - θ_after) / lr`` of one SGD step on the whole dataset as one batch."""
    before = flat(model)
    args = JDTrainingArguments(
        **common_args(tmp_path, max_steps=1, per_device_train_batch_size=len(dataset)),
        aggregator="upgrad",
        jd_engine=engine,
    )
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, **kwargs)
    trainer.train()
    assert trainer.jd_engine is not None and trainer.jd_engine.name == engine
    return (before - flat(model)) / 0.5


def all_pairs(dataset: Dataset) -> dict[str, Tensor]:
    return {key: torch.tensor(dataset[key]) for key in ("chosen", "rejected")}


@pytest.mark.parametrize("engine", ENGINES)
def test_upgrad_step_equals_upgrad_on_the_brute_force_jacobian(tmp_path, engine):
    dataset = pairs_dataset(5)
    reference = PairScorer()
    losses = forward_pairs(reference, all_pairs(dataset))
    expected = UPGrad()(brute_jacobian(losses, list(reference.parameters())))
    update = one_step_update(PairJD, PairScorer(), tmp_path, engine, dataset)
    assert rel_err(update, expected) <= 1e-5, rel_err(update, expected)


def test_gramian_engine_self_check_catches_a_coupled_loss(tmp_path):
    class Coupled(PairJD):
        couple = True

    args = JDTrainingArguments(**common_args(tmp_path, max_steps=1), aggregator="upgrad", jd_engine="gramian")
    trainer = Coupled(model=PairScorer(), args=args, train_dataset=pairs_dataset(8))
    with pytest.raises(GramianMismatchError, match="row_objective"):
        trainer.train()


def test_auto_falls_back_to_the_explicit_jacobian_on_a_coupled_loss(tmp_path):
    class Coupled(PairJD):
        couple = True

    dataset = pairs_dataset(5)
    reference = PairScorer()
    losses = forward_pairs(reference, all_pairs(dataset), couple=True)
    expected = UPGrad()(brute_jacobian(losses, list(reference.parameters())))
    with pytest.warns(RuntimeWarning, match="GramianMismatchError"):
        model = PairScorer()
        before = flat(model)
        args = JDTrainingArguments(
            **common_args(tmp_path, max_steps=1, per_device_train_batch_size=5),
            aggregator="upgrad",
            jd_engine="auto",
        )
        trainer = Coupled(model=model, args=args, train_dataset=dataset)
        trainer.train()
        update = (before - flat(model)) / 0.5
    assert trainer.jd_engine is not None and trainer.jd_engine.name == "jacobian"
    assert rel_err(update, expected) <= 1e-5, rel_err(update, expected)


def test_a_map_that_does_not_fit_the_batch_is_refused_by_the_gramian_engine(tmp_path):
    class BadMap(PairJD):
        bad_map = True

    args = JDTrainingArguments(**common_args(tmp_path, max_steps=1), aggregator="upgrad", jd_engine="gramian")
    trainer = BadMap(model=PairScorer(), args=args, train_dataset=pairs_dataset(8))
    with pytest.raises(
        GramianEngineError, match="row_objective maps 4 rows, but the captured forward has a batch of 8"
    ):
        trainer.train()


def test_objective_losses_need_per_example_objectives(tmp_path):
    args = JDTrainingArguments(
        **common_args(tmp_path, max_steps=1),
        aggregator="upgrad",
        jd_engine="jacobian",
        jd_objectives="per_task",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = PairJD(model=PairScorer(), args=args, train_dataset=pairs_dataset(8))
    with pytest.raises(JDInputError, match="jd_objectives='per_example'"):
        trainer.train()


class GPT2Pairs(JDTrainer):
    """DPO-like pairs on a language model: the score of a row is its mean next-token log-probability."""

    def compute_losses(self, model, inputs):
        return ObjectiveLosses.paired(gpt2_pair_losses(model, inputs))


def gpt2_pair_losses(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    ids = torch.cat([inputs["chosen_ids"], inputs["rejected_ids"]])
    logits = model(input_ids=ids).logits[:, :-1]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return pair_losses(logp.mean(dim=1))


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("engine", ENGINES)
def test_gpt2_pairs_upgrad_step_equals_brute_force(tmp_path, engine):
    generator = torch.Generator().manual_seed(0)
    dataset = Dataset.from_dict(
        {
            "chosen_ids": torch.randint(0, 64, (3, 7), generator=generator).tolist(),
            "rejected_ids": torch.randint(0, 64, (3, 7), generator=generator).tolist(),
        }
    )
    reference = tiny_gpt2()
    batch = {key: torch.tensor(dataset[key]) for key in ("chosen_ids", "rejected_ids")}
    params = [p for p in reference.parameters() if p.requires_grad]
    expected = UPGrad()(brute_jacobian(gpt2_pair_losses(reference, batch), params))
    model = tiny_gpt2()
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    args = JDTrainingArguments(
        **common_args(tmp_path, max_steps=1, per_device_train_batch_size=3),
        aggregator="upgrad",
        jd_engine=engine,
    )
    GPT2Pairs(model=model, args=args, train_dataset=dataset).train()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
    update = (before - after) / 0.5
    assert rel_err(update, expected) <= 1e-5, rel_err(update, expected)


@pytest.mark.parametrize("engine", ["jacobian", "gramian"])
def test_engine_gramian_and_update_against_brute_force(engine):
    """Both engines directly: ``G`` of the K pair losses and ``Jᵀw`` for K weights, the map given."""
    model = PairScorer()
    jd = JacobianBackend(model, per_task=False) if engine == "jacobian" else GramianEngine(model)
    batch = all_pairs(pairs_dataset(4))
    with jd.capture():
        losses = forward_pairs(model, batch)
    J = brute_jacobian(losses, jd.params)
    G = jd.gramian(losses, row_objective=torch.arange(4).repeat(2))
    assert rel_err(G, J @ J.T) <= 1e-5, rel_err(G, J @ J.T)
    weights = torch.tensor([0.4, 1.3, 0.2, 0.9])
    jd.accumulate_grad(weights, 0.5)
    update = torch.cat([p.grad.reshape(-1) for p in jd.params])
    assert rel_err(update, 0.5 * weights @ J) <= 1e-5, rel_err(update, 0.5 * weights @ J)


def test_a_scalarizer_reads_the_objective_losses(tmp_path):
    """``--scalarizer mean`` on ObjectiveLosses: one ordinary backward of the mean of the K losses."""
    dataset = pairs_dataset(8)
    common = common_args(tmp_path, num_train_epochs=1)
    stock_model = PairScorer()
    PairStock(model=stock_model, args=TrainingArguments(**common), train_dataset=dataset).train()
    jd_model = PairScorer()
    PairJD(
        model=jd_model, args=JDTrainingArguments(**common, scalarizer="mean"), train_dataset=dataset
    ).train()
    torch.testing.assert_close(flat(jd_model), flat(stock_model), rtol=1e-5, atol=1e-6)


def test_famo_updates_its_task_logits_from_objective_losses(tmp_path):
    """FAMO's post-step update re-evaluates the losses of the step's last micro-batch: with ObjectiveLosses it
    reads the K objective losses (one logit per pair), and trains."""
    dataset = pairs_dataset(8)
    common = common_args(tmp_path, num_train_epochs=1)
    args = JDTrainingArguments(**common, scalarizer="famo", scalarizer_kwargs={"shape": 4})
    trainer = PairJD(model=PairScorer(), args=args, train_dataset=dataset)
    before = [p.detach().clone() for p in trainer.scalarizer.parameters()] + [
        b.detach().clone() for b in trainer.scalarizer.buffers()
    ]
    trainer.train()
    after = list(trainer.scalarizer.parameters()) + list(trainer.scalarizer.buffers())
    assert any(not torch.equal(x, y) for x, y in zip(before, after))


@pytest.mark.parametrize("engine", ["jacobian", "gramian"])
def test_the_generic_update_path_with_a_row_map(engine):
    """The backends' generic path (the engine's Gramian, then the backend's own backward of ``s·wᵀL`` over the
    K losses) writes the same update as the engine's writer."""
    settings = StepSettings(per_task=False, global_scope=False, row_objective=torch.arange(4).repeat(2))
    batch = all_pairs(pairs_dataset(4))
    written = []
    for backend in (None, DdpBackend(update="backward")):
        model = PairScorer()
        keep = backend is not None
        jd = (
            JacobianBackend(model, per_task=False, keep_graph=keep)
            if engine == "jacobian"
            else GramianEngine(model, keep_graph=keep)
        )
        with jd.capture():
            losses = forward_pairs(model, batch)
        jd_update(jd, UPGrad(), losses, 0.5, settings, backend)
        written.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert float(written[0].abs().max()) > 1e-3
    torch.testing.assert_close(written[1], written[0], rtol=1e-5, atol=1e-7)
