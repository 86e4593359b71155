"""Where a naive Gramian engine is silently wrong: broadcast inputs, non-batch leading dimensions,
shared parameters, parameters used outside their module, activation checkpointing, dropout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gramian_oracles import (
    VOCAB,
    assert_exact,
    causal_lm_losses,
    jacobian,
    labels,
    rel_err,
    tiny_bert_config,
    token_ids,
)
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from hf_jd.gramian import GramianEngine, GramianEngineError


class BroadcastPositions(nn.Module):
    """Token + position embeddings with positions ``[1, T]`` broadcast over the batch (as BERT / GPT-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(20, 6)
        self.positions = nn.Embedding(12, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        hidden = torch.tanh(self.tokens(ids) + self.positions(positions))
        return self.head(hidden).mean(dim=1)


def test_broadcast_position_embeddings_are_per_example():
    model = BroadcastPositions()
    ids = torch.randint(0, 20, (5, 7))
    y = labels(5)
    outcome = assert_exact(model, lambda: F.cross_entropy(model(ids), y, reduction="none"))
    # The position table's per-example gradients differ across examples: summing them over the batch
    # (what a dim-0-is-the-batch engine captures) would give a visibly different Gramian.
    n_tokens = model.tokens.weight.numel()
    n_positions = model.positions.weight.numel()
    block = outcome.jacobian[:, n_tokens : n_tokens + n_positions]
    assert rel_err(block[0], block[1]) > 0.1


class Shared(nn.Module):
    """One weight in two modules, one module applied twice, a root-owned parameter and an embedding
    table read outside its own module."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 8)
        self.lin2 = nn.Linear(8, 8)
        self.lin2.weight = self.lin.weight
        self.scale = nn.Parameter(torch.randn(8))
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)

    def forward(self, ids):
        hidden = torch.tanh(self.lin(self.emb(ids)))
        hidden = torch.tanh(self.lin(hidden))
        hidden = self.lin2(hidden) * self.scale
        hidden = F.linear(hidden, self.emb.weight[:8])  # the table, used outside nn.Embedding.forward
        return self.out(self.norm(hidden)).mean(dim=1)


@pytest.mark.parametrize("strategy", ["auto", "ghost"])
def test_parameters_used_by_several_modules_and_outside_their_module(strategy):
    model = Shared()
    ids = torch.randint(0, 20, (5, 6))
    y = labels(5)
    assert_exact(model, lambda: F.cross_entropy(model(ids), y, reduction="none"), linear_strategy=strategy)


def test_gpt2_tied_head_matches_brute_force_in_small_chunks():
    # lm_head.weight IS wte.weight: per-example gradients are summed over both modules, chunk by chunk.
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
        )
    )
    ids = token_ids(3, 8)
    assert_exact(model, lambda: causal_lm_losses(model(input_ids=ids).logits, ids), memory_budget_mb=2e-4)


def _tiny_bert() -> BertForSequenceClassification:
    config = tiny_bert_config()
    return BertForSequenceClassification(config)


def test_hugging_face_activation_checkpointing():
    model = _tiny_bert()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, y = token_ids(4, 9), labels(4)
    assert_exact(model, lambda: F.cross_entropy(model(input_ids=ids).logits, y, reduction="none"))


def test_gpt2_activation_checkpointing():
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
        )
    )
    model.gradient_checkpointing_enable()
    ids = token_ids(4, 9)
    assert_exact(model, lambda: causal_lm_losses(model(input_ids=ids).logits, ids))


class CheckpointedBroadcast(nn.Module):
    """A broadcast position embedding and dropout *inside* a checkpointed block: recomputation during
    the engine's backward must see the same expanded shapes and the same dropout masks."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.pos = nn.Embedding(16, 8)
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(8, 3)

    def block(self, hidden):
        positions = self.pos(torch.arange(hidden.shape[1]).unsqueeze(0))
        return self.drop(torch.tanh(self.lin(hidden + positions)))

    def forward(self, ids):
        return self.out(checkpoint(self.block, self.emb(ids), use_reentrant=False)).mean(dim=1)


def test_broadcast_inside_checkpointed_block():
    model = CheckpointedBroadcast()
    ids, y = torch.randint(0, 20, (5, 6)), labels(5)
    assert_exact(model, lambda: F.cross_entropy(model(ids), y, reduction="none"))


def test_reentrant_checkpointing_is_refused_clearly():
    model = _tiny_bert()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(GramianEngineError, match="use_reentrant"):
        GramianEngine(model).check_supported()


def test_accumulates_into_existing_grad():
    model = _tiny_bert()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    ids, y = token_ids(4, 9), labels(4)
    outcome = assert_exact(model, lambda: F.cross_entropy(model(input_ids=ids).logits, y, reduction="none"))
    assert outcome.before.abs().sum() > 0


def test_in_place_modified_input_is_reported():
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4)
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            hidden = x * 1.0
            out = self.norm(hidden)  # keeps `hidden` as its input
            hidden.mul_(2.0)  # autograd does not need it, but the engine does
            return self.lin(out + hidden).sum(dim=1)

    model = InPlace()
    engine = GramianEngine(model)
    with engine.capture():
        losses = model(torch.randn(3, 4))
    with pytest.raises(GramianEngineError, match="modified in place"):
        engine.gramian(losses)


def test_loss_vector_must_match_the_batch():
    model = _tiny_bert()
    engine = GramianEngine(model)
    ids = token_ids(4, 9)
    with engine.capture():
        logits = model(input_ids=ids).logits
    with pytest.raises(GramianEngineError, match="one loss per example"):
        engine.gramian(logits.reshape(-1))


def test_batch_of_one():
    model = _tiny_bert()
    ids, y = token_ids(1, 9), labels(1)
    outcome = assert_exact(model, lambda: F.cross_entropy(model(input_ids=ids).logits, y, reduction="none"))
    assert outcome.gramian.shape == (1, 1)
    torch.testing.assert_close(
        outcome.gramian, outcome.jacobian.square().sum().reshape(1, 1), rtol=1e-5, atol=0
    )


def test_oracle_agrees_with_itself():
    # Sanity check of the oracle used everywhere: J from autograd rows equals torch.func.jacrev.
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    losses = model(x).pow(2).sum(dim=1)
    J = jacobian(losses, list(model.parameters()))
    params = dict(model.named_parameters())
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)).pow(2).sum(dim=1))(params)
    expected = torch.cat([jac[name].reshape(4, -1) for name in params], dim=1)
    torch.testing.assert_close(J, expected)


def test_module_that_modifies_its_own_input_in_place():
    class Doubler(nn.Module):  # generic rule; its captured input would hold the doubled values
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.randn(6))

        def forward(self, x):
            x.mul_(2.0)
            return torch.tanh(x * self.gain)

    model = nn.Sequential(nn.Linear(4, 6), Doubler(), nn.Linear(6, 2))
    x = torch.randn(5, 4)
    assert_exact(model, lambda: model(x).pow(2).sum(dim=1))


def test_without_broadcast_expansion_the_fallback_stays_exact():
    model = BroadcastPositions()
    ids, y = torch.randint(0, 20, (5, 7)), labels(5)
    assert_exact(model, lambda: F.cross_entropy(model(ids), y, reduction="none"), expand_broadcast=False)


def test_forward_errors_mention_the_expansion():
    class NeedsLeadingOne(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Embedding(8, 4)

        def forward(self, x):
            positions = self.pos(torch.arange(x.shape[1]).unsqueeze(0))
            return x + positions.view(1, x.shape[1], 4)  # assumes the unexpanded [1, T, d]

    model = NeedsLeadingOne()
    engine = GramianEngine(model)
    with pytest.raises(RuntimeError) as error, engine.capture():
        model(torch.randn(3, 5, 4))
    assert "expand_broadcast=False" in "".join(getattr(error.value, "__notes__", []))
    x = torch.randn(3, 5, 4)
    assert_exact(model, lambda: model(x).pow(2).sum(dim=(1, 2)), expand_broadcast=False)


class _NoVmap(torch.autograd.Function):
    """A custom op without a vmap rule: a batched backward through it fails, the row loop does not."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if grad.abs().sum().item() == 0.0:  # data-dependent control flow: not vmappable
            return torch.zeros_like(grad)
        return grad * x.cos()


class RootParameter(nn.Module):
    """A parameter owned by the root model (no module-local rule): batched-autograd fallback."""

    def __init__(self, custom: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.temperature = nn.Parameter(torch.tensor(1.5))
        self.custom = custom

    def forward(self, x):
        hidden = self.lin(x) * self.temperature
        return (_NoVmap.apply(hidden) if self.custom else hidden.tanh()).pow(2).sum(dim=1)


@pytest.mark.parametrize("custom", [False, True], ids=["batched", "row-loop"])
def test_root_parameter_fallback_in_row_chunks(custom):
    model = RootParameter(custom)
    x = torch.randn(11, 4)  # 11 rows: the batched fallback runs in chunks of 8
    assert_exact(model, lambda: model(x))


@pytest.mark.parametrize("tokens", [None, 3], ids=["rows", "tokens"])
def test_output_modified_in_place_by_the_next_module(tokens):
    # On [B, T, H] a linear layer returns a view; ReLU(inplace=True) then replaces its graph node, so
    # the gradient captured at the layer's output edge would be lost (zero rows, silently).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 1)).double()
    shape = (4, 5) if tokens is None else (4, tokens, 5)
    x = torch.randn(*shape, dtype=torch.float64)
    assert_exact(model, lambda: model(x).reshape(4, -1).pow(2).sum(dim=1), tol=1e-10)


def test_swinv2_continuous_position_bias():
    # Swinv2's position-bias MLP runs on a batch-free table and its ReLU is in place: exact (its
    # parameters take the fallback), never a vacuous broadcast plan with no broadcast point.
    from transformers import Swinv2Config, Swinv2ForImageClassification

    torch.manual_seed(0)
    config = Swinv2Config(
        image_size=32, patch_size=4, embed_dim=8, depths=[2, 1], num_heads=[2, 2], window_size=4, num_labels=3
    )
    model = Swinv2ForImageClassification(config).double()
    pixels = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = labels(4)
    forward = lambda: F.cross_entropy(model(pixel_values=pixels).logits, y, reduction="none")  # noqa: E731
    assert_exact(model, forward, tol=1e-10, expand_broadcast=False)
    engine = GramianEngine(model, expand_broadcast=False)
    with engine.capture():
        losses = forward()
    engine.gramian(losses)
    served = engine.coverage()
    engine.release()
    # The cosine attention (F.normalize) keeps the window rows provable; the bias MLP is batch-free.
    assert "fallback" not in served.values(), [n for n, how in served.items() if how == "fallback"]
