"""Brute-force oracles and tiny models for the Gramian-engine tests.

The oracle differentiates the *same* forward graph the engine captured, one loss at a time
(``torch.autograd.grad`` row by row), so dropout and other randomness are shared with the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import BertConfig
from transformers.utils import logging as hf_logging

from hf_jd.gramian import GramianEngine

hf_logging.set_verbosity_error()

VOCAB = 100


def tiny_bert_config(**overrides) -> BertConfig:
    """The 2-layer, 32-wide BERT configuration the Gramian tests share (``overrides`` replace fields)."""
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
    )
    return BertConfig(**{**values, **overrides})


def jacobian(losses: Tensor, params: list[nn.Parameter]) -> Tensor:
    """``J`` (``[m, n_params]``) by one ``torch.autograd.grad`` per loss; writes no ``.grad``."""
    rows = []
    for i in range(losses.numel()):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
            )
        )
    return torch.stack(rows)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


@dataclass
class Outcome:
    gramian: Tensor
    jacobian: Tensor
    weights: Tensor
    scale: float
    grad: Tensor  # concatenated p.grad after accumulate_grad
    before: Tensor  # concatenated p.grad before (zeros when None)

    @property
    def expected_gramian(self) -> Tensor:
        return self.jacobian @ self.jacobian.T

    @property
    def expected_grad(self) -> Tensor:
        return self.before + self.scale * (self.weights.to(self.jacobian.dtype) @ self.jacobian)


def run_engine(
    model: nn.Module, forward: Callable[[], Tensor], *, scale: float = 0.7, seed: int = 0, **engine_kwargs
) -> Outcome:
    """Capture ``forward()`` (a loss vector), compare nothing, return the engine's results and the oracle's."""
    engine = GramianEngine(model, **engine_kwargs)
    engine.check_supported()
    params = engine.params
    before = torch.cat(
        [(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )
    grads_before = [p.grad for p in params]
    with engine.capture():
        losses = forward()
    J = jacobian(losses, params)
    reached = [
        g is not None for g in torch.autograd.grad(losses.sum(), params, retain_graph=True, allow_unused=True)
    ]
    G = engine.gramian(losses)
    for p, g in zip(params, grads_before):
        assert p.grad is g, "gramian() must not write .grad"
    weights = torch.rand(losses.numel(), generator=torch.Generator().manual_seed(seed)) + 0.1
    engine.accumulate_grad(weights, scale)
    for p, g, hit in zip(params, grads_before, reached):
        if not hit:  # as after loss.backward(): an unreached parameter keeps its .grad (None stays None)
            assert p.grad is g, "accumulate_grad() wrote into a parameter the losses do not reach"
    grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    return Outcome(G, J, weights, scale, grad, before)


def assert_exact(
    model: nn.Module, forward: Callable[[], Tensor], tol: float = 1e-5, **engine_kwargs
) -> Outcome:
    outcome = run_engine(model, forward, **engine_kwargs)
    assert outcome.gramian.shape == outcome.expected_gramian.shape
    assert rel_err(outcome.gramian, outcome.expected_gramian) <= tol, rel_err(
        outcome.gramian, outcome.expected_gramian
    )
    assert rel_err(outcome.grad, outcome.expected_grad) <= tol, rel_err(outcome.grad, outcome.expected_grad)
    return outcome


def token_ids(batch: int, length: int, seed: int = 0, low: int = 1) -> Tensor:
    return torch.randint(low, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def labels(batch: int, classes: int = 3, seed: int = 1) -> Tensor:
    return torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed))


def causal_lm_losses(logits: Tensor, ids: Tensor) -> Tensor:
    """Per-example mean next-token cross-entropy."""
    batch, _, vocab = logits.shape
    token = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="none"
    )
    return token.view(batch, -1).mean(dim=1)


def padded(ids: Tensor, lengths: list[int], pad: int) -> tuple[Tensor, Tensor]:
    """Right-pad ``ids`` to the given lengths; returns ``(ids, attention_mask)``."""
    ids = ids.clone()
    mask = torch.ones_like(ids)
    for row, length in enumerate(lengths):
        ids[row, length:] = pad
        mask[row, length:] = 0
    return ids, mask


def window_partition(x: Tensor, window: int) -> Tensor:
    """Swin's window partition: ``[B, H, W, C]`` → ``[B·windows, window², C]``, each example's windows
    contiguous."""
    batch, height, width, dim = x.shape
    parts = x.view(batch, height // window, window, width // window, window, dim).permute(0, 1, 3, 2, 4, 5)
    return parts.contiguous().view(-1, window * window, dim)
