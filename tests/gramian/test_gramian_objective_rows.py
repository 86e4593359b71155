"""Objectives over groups of batch rows (``ObjectiveLosses`` / ``row_objective``) in the Gramian engine.

The oracle is the brute-force Jacobian of the ``K`` objective losses (one ``torch.autograd.grad`` per loss
on the captured graph); the engine forms ``G = P G_rows Pᵀ`` and ``Jᵀw = J_rowsᵀ Pᵀ w`` from one backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gramian_oracles import jacobian, rel_err, token_ids
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hf_jd import ObjectiveLosses
from hf_jd.aggregation import UPGrad
from hf_jd.gramian import GramianEngine, GramianEngineError, GramianMismatchError, default_rows

BETA = 1.7
TOL = 1e-5


class Scorer(nn.Module):
    """A per-row score ``temperature · head(tanh(body(x)))``; ``temperature`` is owned by the root, so the
    engine serves it with its exact fallback (per objective), the layers with their rules (per row)."""

    def __init__(self, features: int = 5, hidden: int = 8, mix: bool = False) -> None:
        super().__init__()
        self.body = nn.Linear(features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 1)
        self.temperature = nn.Parameter(torch.tensor(1.3))
        self.mix = mix  # batch-norm-like: centre the hidden layer by its batch mean (couples every row)

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.tanh(self.norm(self.body(x)))
        if self.mix:
            hidden = torch.tanh(hidden - hidden.mean(dim=0, keepdim=True))
        return self.temperature * self.head(hidden).squeeze(-1)


def dpo_losses(scores: Tensor) -> Tensor:
    """``L_k = -log σ(β (s_k - s_{B+k}))`` for ``2B`` scores (chosen rows first)."""
    half = scores.shape[0] // 2
    return -F.logsigmoid(BETA * (scores[:half] - scores[half:]))


def group_losses(scores: Tensor, row_objective: Tensor, groups: int) -> Tensor:
    """A GRPO-like nonlinear group loss: ``L_g = -log softmax(s_{rows of g})[first row of g] + ½ mean(s²)``."""
    losses = []
    for group in range(groups):
        member = scores[row_objective == group]
        losses.append(-torch.log_softmax(member, dim=0)[0] + 0.5 * member.pow(2).mean())
    return torch.stack(losses)


def flat_grads(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def run(
    model: nn.Module,
    forward,
    row_objective: Tensor,
    weights: Tensor | None = None,
    scale: float = 0.6,
    **kwargs,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(G, J, weights, written update)`` of the engine on ``forward()`` with the row map, and the oracle ``J``."""
    engine = GramianEngine(model, **kwargs)
    params = engine.params
    with engine.capture():
        losses = forward()
    J = jacobian(losses, params)
    G = engine.gramian(losses, row_objective=row_objective, verify_rows=default_rows(losses.numel()))
    if weights is None:
        weights = torch.rand(losses.numel(), generator=torch.Generator().manual_seed(3)) + 0.1
    engine.accumulate_grad(weights, scale)
    return G, J, weights, flat_grads(params) / scale


def assert_matches(G: Tensor, J: Tensor, weights: Tensor, update: Tensor) -> None:
    assert G.shape == (J.shape[0], J.shape[0])
    assert rel_err(G, J @ J.T) <= TOL, rel_err(G, J @ J.T)
    expected = weights.to(J.dtype) @ J
    assert rel_err(update, expected) <= TOL, rel_err(update, expected)


def pairs_batch(pairs: int = 4, features: int = 5) -> Tensor:
    return torch.randn(2 * pairs, features, generator=torch.Generator().manual_seed(0))


def test_pairs_gramian_and_update_equal_brute_force():
    torch.manual_seed(0)
    model = Scorer()
    x = pairs_batch()
    row_objective = ObjectiveLosses.paired(torch.zeros(4)).row_objective
    assert row_objective.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    G, J, weights, update = run(model, lambda: dpo_losses(model(x)), row_objective)
    assert_matches(G, J, weights, update)
    assert not torch.allclose(G, torch.diag(G.diagonal()))  # the pairs' gradients do interact


def test_unequal_groups_in_any_row_order():
    """GRPO-like groups of 1, 2, 3 and 4 rows, their rows interleaved in the batch."""
    torch.manual_seed(1)
    model = Scorer()
    row_objective = torch.tensor([3, 1, 0, 3, 2, 1, 3, 2, 3, 2])
    x = torch.randn(10, 5, generator=torch.Generator().manual_seed(2))
    G, J, weights, update = run(model, lambda: group_losses(model(x), row_objective, 4), row_objective)
    assert_matches(G, J, weights, update)


@pytest.mark.parametrize("strategy", ["ghost", "materialize"])
def test_both_linear_strategies(strategy):
    torch.manual_seed(2)
    model = Scorer()
    x = pairs_batch(3)
    row_objective = torch.arange(3).repeat(2)
    G, J, weights, update = run(model, lambda: dpo_losses(model(x)), row_objective, linear_strategy=strategy)
    assert_matches(G, J, weights, update)


def test_upgrad_update_equals_upgrad_on_the_explicit_jacobian():
    torch.manual_seed(3)
    model = Scorer()
    x = pairs_batch(5)
    engine = GramianEngine(model)
    with engine.capture():
        losses = dpo_losses(model(x))
    J = jacobian(losses, engine.params)
    expected = UPGrad()(J)
    G = engine.gramian(losses, row_objective=torch.arange(5).repeat(2))
    engine.accumulate_grad(UPGrad().gramian_weighting(G), 1.0)
    update = flat_grads(engine.params)
    assert rel_err(update, expected) <= TOL, rel_err(update, expected)


def test_identity_map_equals_the_per_example_gramian():
    """One row per objective: the row map changes nothing (to rounding)."""
    torch.manual_seed(4)
    model = Scorer()
    x = torch.randn(6, 5)
    y = torch.randn(6)
    engine = GramianEngine(model)
    with engine.capture():
        losses = (model(x) - y) ** 2
    plain = engine.gramian(losses)
    engine.release()
    with engine.capture():
        losses = (model(x) - y) ** 2
    mapped = engine.gramian(losses, row_objective=torch.arange(6))
    torch.testing.assert_close(mapped, plain, rtol=1e-5, atol=1e-7)


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    return GPT2LMHeadModel(config)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    return LlamaForCausalLM(config)


def sequence_scores(model: nn.Module, ids: Tensor) -> Tensor:
    """Per-row score: the mean log-probability of the sequence's next tokens (a DPO log-ratio stand-in)."""
    logits = model(input_ids=ids).logits[:, :-1]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logp.mean(dim=1)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_language_model_pairs(build):
    model = build()
    ids = token_ids(6, 7)  # 3 pairs: chosen rows 0..2, rejected rows 3..5
    row_objective = torch.arange(3).repeat(2)
    G, J, weights, update = run(model, lambda: dpo_losses(sequence_scores(model, ids)), row_objective)
    assert_matches(G, J, weights, update)


def test_self_check_catches_a_loss_that_couples_objectives():
    """Scores scaled by the batch's standard deviation: L_k reads every row, so P G_rows Pᵀ misses cross terms."""
    torch.manual_seed(5)
    model = Scorer()
    x = pairs_batch(4)
    engine = GramianEngine(model)
    with engine.capture():
        scores = model(x)
        losses = dpo_losses(scores / scores.std())
    with pytest.raises(GramianMismatchError, match="row_objective"):
        engine.gramian(losses, row_objective=torch.arange(4).repeat(2), verify_rows=default_rows(4))


def test_self_check_catches_a_model_that_mixes_rows():
    torch.manual_seed(6)
    model = Scorer(mix=True)
    x = pairs_batch(4)
    engine = GramianEngine(model)
    with engine.capture():
        losses = dpo_losses(model(x))
    with pytest.raises(GramianMismatchError, match="groups of rows"):
        engine.gramian(losses, row_objective=torch.arange(4).repeat(2), verify_rows=default_rows(4))


def captured(model: nn.Module, x: Tensor, per_task: bool = False) -> tuple[GramianEngine, Tensor]:
    engine = GramianEngine(model, objectives="per_task" if per_task else "per_example")
    with engine.capture():
        losses = dpo_losses(model(x))
    return engine, losses


@pytest.mark.parametrize(
    ("row_objective", "error", "match"),
    [
        (torch.arange(4).repeat(2).float(), GramianEngineError, "integer"),
        (torch.arange(4).repeat(2).view(2, 4), GramianEngineError, "1-D"),
        (torch.tensor([0, 1, 2, 4, 0, 1, 2, 3]), GramianEngineError, r"\[0, 4\)"),
        (torch.tensor([0, 1, 2, 2, 0, 1, 2, 0]), GramianEngineError, r"objectives \[3\] have no row"),
        (torch.arange(4), GramianEngineError, "batch of 8 rows"),
        (torch.arange(4).repeat(3), GramianEngineError, "batch of 8 rows"),
    ],
)
def test_bad_maps_are_refused(row_objective, error, match):
    torch.manual_seed(7)
    model = Scorer()
    engine, losses = captured(model, pairs_batch(4))
    with pytest.raises(error, match=match):
        engine.gramian(losses, row_objective=row_objective)
    assert engine.step_state is None  # released
    assert all(p.grad is None for p in model.parameters())


def test_per_task_and_global_scope_refuse_row_groups():
    model = Scorer()
    engine, losses = captured(model, pairs_batch(2), per_task=True)
    with pytest.raises(GramianEngineError, match="per_example"):
        engine.gramian(losses, row_objective=torch.arange(2).repeat(2))
    engine, losses = captured(model, pairs_batch(2))
    with pytest.raises(GramianEngineError, match="jd_engine='jacobian'"):
        engine.global_gramian(losses, row_objective=torch.arange(2).repeat(2))


def test_weights_are_one_per_objective():
    model = Scorer()
    engine, losses = captured(model, pairs_batch(3))
    engine.gramian(losses, row_objective=torch.arange(3).repeat(2))
    with pytest.raises(GramianEngineError, match="Expected 3 weights, got 6"):
        engine.accumulate_grad(torch.ones(6), 1.0)


def test_objective_losses_validation():
    losses = torch.zeros(3)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        ObjectiveLosses(torch.zeros(()), torch.zeros(1, dtype=torch.long))
    with pytest.raises(TypeError, match="LongTensor"):
        ObjectiveLosses(losses, [0, 1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"objectives \[1\] have no row"):
        ObjectiveLosses(losses, torch.tensor([0, 2, 2, 0]))
    with pytest.raises(ValueError, match="at least one row"):
        ObjectiveLosses.grouped(losses, [2, 0, 1])
    grouped = ObjectiveLosses.grouped(losses, [1, 3, 2])
    assert grouped.row_objective.tolist() == [0, 1, 1, 1, 2, 2]
    assert (grouped.num_objectives, grouped.num_rows) == (3, 6)
    P = grouped.incidence()
    assert P.shape == (3, 6) and P.sum(dim=0).tolist() == [1.0] * 6
    G_rows = torch.randn(6, 6)
    torch.testing.assert_close(grouped.objective_gramian(G_rows), P @ G_rows @ P.T)
    w = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(grouped.row_weights(w), P.T @ w)
    assert (
        ObjectiveLosses(losses, torch.tensor([2, 1, 0], dtype=torch.int32)).row_objective.dtype == torch.long
    )
