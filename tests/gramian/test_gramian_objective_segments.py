"""Objectives that are token segments of rows (``ObjectiveLosses.segments`` / ``token_objective``).

A packed batch holds several sequences in one row; objective ``s`` is sequence ``s``'s loss. The oracle is
the brute-force Jacobian of the ``K`` segment losses (one ``torch.autograd.grad`` per loss on the captured
graph); the engine forms ``G = P G_tokens Pᵀ`` and ``Jᵀw = J_tokensᵀ Pᵀ w`` from one backward, with every
token a row for the token-wise layers.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from gramian_oracles import jacobian, rel_err
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from hf_jd import ObjectiveLosses
from hf_jd.aggregation import UPGrad
from hf_jd.gramian import GramianEngine, GramianEngineError, GramianMismatchError, default_rows

TOL = 1e-5
VOCAB = 23


def segment_ids(lengths: list[int], pad: int = 0) -> Tensor:
    """``[1, Σ lengths + pad]``: the objective of each token of one packed row (``-1`` for the padding)."""
    ids = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)] + [torch.full((pad,), -1)])
    return ids.view(1, -1)


def block_causal(segments: Tensor, leak: bool = False) -> Tensor:
    """``[1, 1, T, T]`` boolean mask: token ``t`` attends to earlier tokens of its own segment (any earlier
    token with ``leak``)."""
    seg = segments[0]
    causal = torch.ones(seg.numel(), seg.numel(), dtype=torch.bool).tril()
    return (causal if leak else causal & (seg[:, None] == seg[None, :]))[None, None]


def position_ids(segments: Tensor) -> Tensor:
    """Positions restarting at 0 at every segment (and at the padding)."""
    seg = segments[0]
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[1:] = seg[1:] != seg[:-1]
    index = torch.arange(seg.numel())
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=0).values
    return (index - first).view(1, -1)


class ToyPacked(nn.Module):
    """Embedding, LayerNorm, one parameter-free attention (mask given), RMSNorm and a head: every module
    with parameters is token-wise, so the engine serves all of them from the one backward."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim, bias=False)
        self.rms = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        hidden = self.norm(self.embed(ids))
        scores = self.query(hidden) @ hidden.transpose(-1, -2) / math.sqrt(hidden.shape[-1])
        scores = scores.masked_fill(~mask[:, 0], float("-inf"))
        hidden = hidden + torch.softmax(scores, dim=-1) @ self.value(hidden)
        return self.head(torch.tanh(self.rms(hidden)))


def segment_losses(logits: Tensor, ids: Tensor, segments: Tensor, objectives: int) -> Tensor:
    """``L_s``: mean next-token cross-entropy over the tokens of segment ``s`` whose next token is in ``s``,
    plus a nonlinear term (the squared mean logit of the segment) so that ``L_s`` is not a token sum."""
    seg = segments[0]
    token_loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    same = (seg[:-1] == seg[1:]) & (seg[:-1] >= 0)
    losses = []
    for s in range(objectives):
        member = same & (seg[:-1] == s)
        losses.append(token_loss[member].mean() + logits[0, seg == s].mean().pow(2))
    return torch.stack(losses)


def flat_grads(params: list[nn.Parameter]) -> Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def packed_ids(segments: Tensor, seed: int = 0) -> Tensor:
    return torch.randint(1, VOCAB, segments.shape, generator=torch.Generator().manual_seed(seed))


def run(model: nn.Module, forward, segments: Tensor, objectives: int, **kwargs) -> tuple[Tensor, ...]:
    engine = GramianEngine(model, **kwargs)
    params = engine.params
    with engine.capture():
        losses = forward()
    J = jacobian(losses, params)
    G = engine.gramian(losses, token_objective=segments, verify_rows=default_rows(objectives))
    weights = torch.rand(objectives, generator=torch.Generator().manual_seed(3)) + 0.1
    engine.accumulate_grad(weights, 0.6)
    return G, J, weights, flat_grads(params) / 0.6


def assert_matches(G: Tensor, J: Tensor, weights: Tensor, update: Tensor) -> None:
    assert G.shape == (J.shape[0], J.shape[0])
    assert rel_err(G, J @ J.T) <= TOL, rel_err(G, J @ J.T)
    expected = weights.to(J.dtype) @ J
    assert rel_err(update, expected) <= TOL, rel_err(update, expected)
    assert not torch.allclose(G, torch.diag(G.diagonal()))  # the segments' gradients do interact


@pytest.mark.parametrize(
    ("lengths", "pad"), [([5, 3, 4], 0), ([4, 6], 2), ([2, 3, 4, 3], 1)], ids=["three", "two+pad", "four+pad"]
)
@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialize"])
def test_toy_packed_row_equals_brute_force(lengths, pad, strategy):
    torch.manual_seed(0)
    model = ToyPacked()
    segments = segment_ids(lengths, pad)
    ids, mask = packed_ids(segments), block_causal(segments)
    K = len(lengths)
    G, J, weights, update = run(
        model,
        lambda: segment_losses(model(ids, mask), ids, segments, K),
        segments,
        K,
        linear_strategy=strategy,
    )
    assert_matches(G, J, weights, update)


def test_two_packed_rows():
    """``[2, T]``: segments in both rows (objective 2 spans the end of row 0 only; row 1 holds 3 and 4)."""
    torch.manual_seed(1)
    model = ToyPacked()
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [3, 3, 3, 3, 4, 4, 4, -1]])
    ids = packed_ids(segments, seed=1)
    seg_mask = segments[:, :, None] == segments[:, None, :]
    mask = (seg_mask & torch.ones(8, 8, dtype=torch.bool).tril())[:, None]

    def forward() -> Tensor:
        logits = model(ids, mask)
        losses = [segment_losses(logits[r : r + 1], ids[r : r + 1], segments[r : r + 1], 5) for r in range(2)]
        # row 0 owns objectives 0..2, row 1 objectives 3, 4 (each loss on its own row: NaN-free means)
        return torch.cat([losses[0][:3], losses[1][3:]])

    G, J, weights, update = run(model, forward, segments, 5)
    assert_matches(G, J, weights, update)


def test_one_backward_and_every_parameter_on_its_rule():
    torch.manual_seed(2)
    model = ToyPacked()
    segments = segment_ids([4, 5, 3])
    ids, mask = packed_ids(segments), block_causal(segments)
    engine = GramianEngine(model)
    with engine.capture():
        losses = segment_losses(model(ids, mask), ids, segments, 3)
    calls = []
    original = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.autograd.grad = counting  # type: ignore[assignment]
    try:
        engine.gramian(losses, token_objective=segments)
    finally:
        torch.autograd.grad = original  # type: ignore[assignment]
    assert len(calls) == 1
    assert set(engine.coverage().values()) <= {"embedding", "layer_norm", "linear", "rms_norm", "norm"}
    engine.release()


def test_upgrad_update_equals_upgrad_on_the_explicit_jacobian():
    torch.manual_seed(3)
    model = ToyPacked()
    segments = segment_ids([3, 4, 2, 5], pad=1)
    ids, mask = packed_ids(segments, seed=3), block_causal(segments)
    engine = GramianEngine(model)
    with engine.capture():
        losses = segment_losses(model(ids, mask), ids, segments, 4)
    J = jacobian(losses, engine.params)
    expected = UPGrad()(J)
    G = engine.gramian(losses, token_objective=segments)
    engine.accumulate_grad(UPGrad().gramian_weighting(G), 1.0)
    update = flat_grads(engine.params)
    assert rel_err(update, expected) <= TOL, rel_err(update, expected)


def test_self_check_catches_attention_across_segments():
    torch.manual_seed(4)
    model = ToyPacked()
    segments = segment_ids([4, 4, 4])
    ids, mask = packed_ids(segments), block_causal(segments, leak=True)
    engine = GramianEngine(model)
    with engine.capture():
        losses = segment_losses(model(ids, mask), ids, segments, 3)
    with pytest.raises(GramianMismatchError):
        engine.gramian(losses, token_objective=segments, verify_rows=default_rows(3))


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def test_llama_packed_row_is_confined_by_the_block_causal_mask():
    """The premise of the Llama tests: with sdpa and the 4-D block-causal mask, or with ``position_ids``
    restarts and no cache (transformers 5 then builds the packed-sequence mask itself), the packed row's
    logits are those of the sequences run one by one; with a cache (``use_cache=True``) and no mask,
    the restarts alone do not confine attention."""
    model = tiny_llama().eval()
    segments = segment_ids([5, 3, 4])
    ids, positions = packed_ids(segments), position_ids(segments)
    alone = torch.cat([model(input_ids=ids[:, a:b]).logits for a, b in [(0, 5), (5, 8), (8, 12)]], dim=1)
    masked = model(input_ids=ids, position_ids=positions, attention_mask=block_causal(segments)).logits
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-5)
    restarts = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(restarts, alone, rtol=1e-5, atol=1e-5)
    cached = model(input_ids=ids, position_ids=positions, use_cache=True).logits
    assert (cached - alone).abs().max() > 1e-3


def test_llama_position_id_restarts_without_a_mask_equal_brute_force():
    model = tiny_llama()
    segments = segment_ids([4, 3, 5])
    ids, positions = packed_ids(segments, seed=2), position_ids(segments)

    def forward() -> Tensor:
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        return segment_losses(logits, ids, segments, 3)

    G, J, weights, update = run(model, forward, segments, 3)
    assert_matches(G, J, weights, update)


@pytest.mark.parametrize(("lengths", "pad"), [([5, 3, 4], 0), ([3, 6], 2)])
def test_llama_packed_row_equals_brute_force(lengths, pad):
    model = tiny_llama()
    segments = segment_ids(lengths, pad)
    ids, mask, positions = packed_ids(segments), block_causal(segments), position_ids(segments)
    K = len(lengths)

    def forward() -> Tensor:
        logits = model(input_ids=ids, position_ids=positions, attention_mask=mask).logits
        return segment_losses(logits, ids, segments, K)

    G, J, weights, update = run(model, forward, segments, K)
    assert_matches(G, J, weights, update)


def test_llama_attention_across_segments_fails_the_self_check():
    model = tiny_llama()
    segments = segment_ids([4, 4, 4])
    ids, positions = packed_ids(segments), position_ids(segments)
    engine = GramianEngine(model)
    with engine.capture():
        # sdpa, no mask, a cache: transformers does not build the packed mask, attention crosses segments
        logits = model(input_ids=ids, position_ids=positions, use_cache=True).logits
        losses = segment_losses(logits, ids, segments, 3)
    with pytest.raises(GramianMismatchError):
        engine.gramian(losses, token_objective=segments, verify_rows=default_rows(3))


def captured(per_task: bool = False) -> tuple[GramianEngine, Tensor, Tensor]:
    torch.manual_seed(5)
    model = ToyPacked()
    segments = segment_ids([3, 3])
    ids, mask = packed_ids(segments), block_causal(segments)
    engine = GramianEngine(model, objectives="per_task" if per_task else "per_example")
    with engine.capture():
        losses = segment_losses(model(ids, mask), ids, segments, 2)
    return engine, losses, segments


@pytest.mark.parametrize(
    ("token_objective", "match"),
    [
        (torch.tensor([[0.0, 0, 0, 1, 1, 1]]), "integer"),
        (torch.tensor([0, 0, 0, 1, 1, 1]), "2-D"),
        (torch.tensor([[0, 0, 0, 1, 1, 2]]), r"\[0, 2\)"),
        (torch.tensor([[0, 0, 0, -2, 1, 1]]), "-1"),
        (torch.tensor([[0, 0, 0, -1, -1, -1]]), r"objectives \[1\] have no token"),
        (torch.tensor([[0, 0, 0], [1, 1, 1]]), "batch of 1 rows"),
    ],
)
def test_bad_token_maps_are_refused(token_objective, match):
    engine, losses, _ = captured()
    with pytest.raises(GramianEngineError, match=match):
        engine.gramian(losses, token_objective=token_objective)
    assert engine.step_state is None


def test_refusals_per_task_global_and_both_maps():
    engine, losses, segments = captured(per_task=True)
    with pytest.raises(GramianEngineError, match="per_example"):
        engine.gramian(losses, token_objective=segments)
    engine, losses, segments = captured()
    with pytest.raises(GramianEngineError, match="jd_engine='jacobian'"):
        engine.global_gramian(losses, token_objective=segments)
    engine, losses, segments = captured()
    with pytest.raises(GramianEngineError, match="not both"):
        engine.gramian(losses, row_objective=torch.tensor([0]), token_objective=segments)


def test_objective_losses_segments():
    losses = torch.zeros(3)
    tokens = torch.tensor([[0, 0, 1, 1, 1, 2, -1]], dtype=torch.int32)
    packed = ObjectiveLosses.segments(losses, tokens)
    assert packed.row_objective is None and packed.token_objective is not None
    assert packed.token_objective.dtype == torch.long
    assert (packed.num_objectives, packed.num_rows) == (3, 1)
    P = packed.incidence()
    assert P.shape == (3, 7) and P.sum(dim=0).tolist() == [1.0] * 6 + [0.0]
    G_tokens = torch.randn(7, 7)
    torch.testing.assert_close(packed.objective_gramian(G_tokens), P @ G_tokens @ P.T)
    w = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(packed.row_weights(w), P.T @ w)
    with pytest.raises(ValueError, match="not both"):
        ObjectiveLosses(losses, torch.tensor([0, 1, 2]), tokens)
    with pytest.raises(ValueError, match="2-D"):
        ObjectiveLosses.segments(losses, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"objectives \[2\] have no token"):
        ObjectiveLosses.segments(losses, torch.tensor([[0, 1, -1]]))
    with pytest.raises(TypeError, match="LongTensor"):
        ObjectiveLosses(losses)
